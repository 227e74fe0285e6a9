//! Heatmaps drawn by `shaders/heatmap.wgsl` through an egui-wgpu paint callback.
//!
//! The values of a heatmap (one f32 per cell) go to the GPU once per version (a new snapshot):
//! an R32Float texture per heatmap id. Range, gamma, log scale and colour map are uniforms, so
//! dragging the colour range or switching the scale uploads nothing ([`uploads`] counts the
//! texture uploads). Every cell is drawn exactly, at any size: a pixel covering several cells
//! shows the strongest of them, and [`cell_at`] gives the exact cell under the pointer for
//! hover text.
//!
//! A heatmap may show its columns in another order than they are stored ([`Data::columns`]):
//! the order is a small index texture the shader reads through, so re-ordering the columns
//! (by density, cluster, Hungarian matching) uploads one integer per column, not the values.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use eframe::egui;
use eframe::egui_wgpu::{self, CallbackResources, CallbackTrait, ScreenDescriptor, wgpu};

/// Colour maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ColorMap {
    /// Viridis, for non-negative values (CI, co-activation).
    Sequential,
    /// Blue–white–red around the middle of the range, for signed values (U, V).
    Diverging,
}

/// How values become colours.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Style {
    /// Values at or below `lo` get the map's first colour, at or above `hi` its last.
    pub lo: f32,
    pub hi: f32,
    /// Applied to the normalised value (to the distance from the centre for diverging maps).
    pub gamma: f32,
    /// Logarithmic scale between `lo` and `hi` (both > 0).
    pub log: bool,
    pub map: ColorMap,
}

impl Style {
    pub fn sequential(lo: f32, hi: f32) -> Self {
        Style {
            lo,
            hi,
            gamma: 1.0,
            log: false,
            map: ColorMap::Sequential,
        }
    }
    /// A diverging map symmetric around 0 reaching ±`max_abs`.
    pub fn diverging(max_abs: f32) -> Self {
        let m = max_abs.max(1e-12);
        Style {
            lo: -m,
            hi: m,
            gamma: 1.0,
            log: false,
            map: ColorMap::Diverging,
        }
    }

    /// The colour of `v` as the shader draws it (legends, CPU fallbacks, tests).
    pub fn color(&self, v: f32) -> egui::Color32 {
        let t = if self.log {
            let (lo, hi) = (self.lo.max(1e-30).ln(), self.hi.max(1e-30).ln());
            (v.max(1e-30).ln() - lo) / (hi - lo).max(1e-12)
        } else {
            (v - self.lo) / (self.hi - self.lo).max(1e-12)
        };
        let c = match self.map {
            ColorMap::Sequential => viridis(t.clamp(0.0, 1.0).powf(self.gamma)),
            ColorMap::Diverging => {
                let d = t.clamp(0.0, 1.0) * 2.0 - 1.0;
                diverging(d.signum() * d.abs().powf(self.gamma) * 0.5 + 0.5)
            }
        };
        egui::Color32::from_rgb(
            (c[0] * 255.0).round() as u8,
            (c[1] * 255.0).round() as u8,
            (c[2] * 255.0).round() as u8,
        )
    }
}

const VIRIDIS: [[f32; 3]; 10] = [
    [0.267, 0.004, 0.329],
    [0.282, 0.157, 0.471],
    [0.243, 0.286, 0.537],
    [0.192, 0.408, 0.557],
    [0.149, 0.510, 0.557],
    [0.122, 0.620, 0.537],
    [0.208, 0.718, 0.475],
    [0.427, 0.804, 0.349],
    [0.706, 0.871, 0.173],
    [0.992, 0.906, 0.145],
];

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn viridis(t: f32) -> [f32; 3] {
    let x = t.clamp(0.0, 1.0) * 9.0;
    let i = (x.floor() as usize).min(8);
    mix(VIRIDIS[i], VIRIDIS[i + 1], x - i as f32)
}

fn diverging(t: f32) -> [f32; 3] {
    let (blue, white, red) = (
        [0.129, 0.400, 0.675],
        [0.969, 0.969, 0.969],
        [0.698, 0.094, 0.169],
    );
    let t = t.clamp(0.0, 1.0);
    if t < 0.5 {
        mix(blue, white, t * 2.0)
    } else {
        mix(white, red, (t - 0.5) * 2.0)
    }
}

/// The values of one heatmap, row-major (`rows × cols`), with a version that changes when
/// the values do (e.g. the snapshot number).
#[derive(Clone, Debug)]
pub struct Data {
    pub values: Arc<Vec<f32>>,
    pub rows: usize,
    pub cols: usize,
    pub version: u64,
    /// The stored column drawn at each position, if not the identity.
    pub columns: Option<Columns>,
}

/// A column order: `order[x]` is the stored column drawn at position `x`, with a version that
/// changes when the order does.
#[derive(Clone, Debug)]
pub struct Columns {
    pub order: Arc<Vec<u32>>,
    pub version: u64,
}

impl Data {
    pub fn new(values: Arc<Vec<f32>>, rows: usize, cols: usize, version: u64) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        Data {
            values,
            rows,
            cols,
            version,
            columns: None,
        }
    }
    /// Shows the stored columns in `order` (a permutation of `0..cols`; an order of another
    /// length is ignored).
    pub fn with_columns(mut self, order: Arc<Vec<u32>>, version: u64) -> Self {
        if order.len() == self.cols && order.iter().all(|&c| (c as usize) < self.cols) {
            self.columns = Some(Columns { order, version });
        }
        self
    }
    /// The stored column drawn at position `x`.
    pub fn column(&self, x: usize) -> usize {
        self.columns.as_ref().map_or(x, |c| c.order[x] as usize)
    }
    /// The value drawn at (`row`, position `x`).
    pub fn get(&self, row: usize, x: usize) -> Option<f32> {
        (row < self.rows && x < self.cols).then(|| self.values[row * self.cols + self.column(x)])
    }
}

static UPLOADS: AtomicU64 = AtomicU64::new(0);
static COLUMN_UPLOADS: AtomicU64 = AtomicU64::new(0);

/// Value-texture uploads since the start (every heatmap): changes only with new data.
pub fn uploads() -> u64 {
    UPLOADS.load(Ordering::Relaxed)
}

/// Column-order uploads since the start (one integer per column each).
pub fn column_uploads() -> u64 {
    COLUMN_UPLOADS.load(Ordering::Relaxed)
}

/// Registers the pipeline with egui's renderer (once, at start-up).
pub fn register(rs: &egui_wgpu::RenderState) {
    let res = Resources::new(&rs.device, rs.target_format);
    rs.renderer.write().callback_resources.insert(res);
}

/// The cell `(row, col)` under `pos` when the heatmap fills `rect`.
pub fn cell_at(
    rect: egui::Rect,
    rows: usize,
    cols: usize,
    pos: egui::Pos2,
) -> Option<(usize, usize)> {
    if !rect.contains(pos) || rows == 0 || cols == 0 {
        return None;
    }
    let fx = (pos.x - rect.left()) / rect.width();
    let fy = (pos.y - rect.top()) / rect.height();
    let col = ((fx * cols as f32) as usize).min(cols - 1);
    let row = ((fy * rows as f32) as usize).min(rows - 1);
    Some((row, col))
}

/// Draws `data` into `rect` with `style`; `id` names the heatmap's GPU texture (keep it
/// stable across frames).
pub fn paint(ui: &egui::Ui, rect: egui::Rect, id: egui::Id, data: &Data, style: Style) {
    if data.rows == 0 || data.cols == 0 {
        return;
    }
    let ppp = ui.ctx().pixels_per_point();
    let px = (rect.size() * ppp).max(egui::vec2(1.0, 1.0));
    let cb = Callback {
        id,
        data: data.clone(),
        style,
        cells_per_px: [data.cols as f32 / px.x, data.rows as f32 / px.y],
        frame: ui.ctx().cumulative_frame_nr(),
    };
    ui.painter()
        .add(egui_wgpu::Callback::new_paint_callback(rect, cb));
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    lo: f32,
    hi: f32,
    gamma: f32,
    flags: u32,
    cells_per_px: [f32; 2],
    _pad: [f32; 2],
}

struct Entry {
    texture: wgpu::Texture,
    /// The column order (R32Uint, `cols × 1`).
    columns: wgpu::Texture,
    uniform: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    /// What the textures hold: (values version, columns version when pooled on the CPU).
    version: (u64, u64),
    columns_version: u64,
    rows: usize,
    cols: usize,
    last_frame: u64,
}

struct Resources {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    srgb_target: bool,
    max_dim: u32,
    entries: HashMap<egui::Id, Entry>,
}

/// Frames a heatmap may go undrawn before its texture is freed.
const EVICT_AFTER_FRAMES: u64 = 600;

impl Resources {
    fn new(device: &wgpu::Device, target: wgpu::TextureFormat) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("heatmap.wgsl"),
            source: wgpu::ShaderSource::Wgsl(include_str!("../../shaders/heatmap.wgsl").into()),
        });
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("heatmap_bgl"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
                wgpu::BindGroupLayoutEntry {
                    binding: 1,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: false },
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    count: None,
                },
                wgpu::BindGroupLayoutEntry {
                    binding: 2,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Uint,
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    count: None,
                },
            ],
        });
        let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("heatmap_pl"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("heatmap_pipeline"),
            layout: Some(&pl),
            vertex: wgpu::VertexState {
                module: &module,
                entry_point: Some("vs_main"),
                buffers: &[],
                compilation_options: Default::default(),
            },
            fragment: Some(wgpu::FragmentState {
                module: &module,
                entry_point: Some("fs_main"),
                targets: &[Some(wgpu::ColorTargetState {
                    format: target,
                    blend: None,
                    write_mask: wgpu::ColorWrites::ALL,
                })],
                compilation_options: Default::default(),
            }),
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            multiview_mask: None,
            cache: None,
        });
        Resources {
            pipeline,
            layout,
            srgb_target: target.is_srgb(),
            max_dim: device.limits().max_texture_dimension_2d,
            entries: HashMap::new(),
        }
    }

    fn entry(
        &mut self,
        device: &wgpu::Device,
        id: egui::Id,
        rows: usize,
        cols: usize,
    ) -> &mut Entry {
        let fits = self
            .entries
            .get(&id)
            .is_some_and(|e| e.rows == rows && e.cols == cols);
        if !fits {
            let texture = device.create_texture(&wgpu::TextureDescriptor {
                label: Some("heatmap_values"),
                size: wgpu::Extent3d {
                    width: cols as u32,
                    height: rows as u32,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::R32Float,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            let columns = device.create_texture(&wgpu::TextureDescriptor {
                label: Some("heatmap_columns"),
                size: wgpu::Extent3d {
                    width: cols as u32,
                    height: 1,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::R32Uint,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            let uniform = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("heatmap_params"),
                size: std::mem::size_of::<Params>() as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let view = texture.create_view(&Default::default());
            let columns_view = columns.create_view(&Default::default());
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("heatmap_bg"),
                layout: &self.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: uniform.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: wgpu::BindingResource::TextureView(&view),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: wgpu::BindingResource::TextureView(&columns_view),
                    },
                ],
            });
            self.entries.insert(
                id,
                Entry {
                    texture,
                    columns,
                    uniform,
                    bind_group,
                    version: (u64::MAX, u64::MAX),
                    columns_version: u64::MAX,
                    rows,
                    cols,
                    last_frame: 0,
                },
            );
        }
        self.entries.get_mut(&id).expect("inserted above")
    }
}

struct Callback {
    id: egui::Id,
    data: Data,
    style: Style,
    cells_per_px: [f32; 2],
    frame: u64,
}

impl Callback {
    /// The data as uploaded: rows beyond the GPU's texture limit are max-pooled (only past
    /// 8192 rows or columns on common hardware), after the column order is applied (the
    /// index texture is then the identity).
    fn fitted(&self, max_dim: u32) -> (std::borrow::Cow<'_, [f32]>, usize, usize) {
        let (rows, cols) = (self.data.rows, self.data.cols);
        let max = max_dim as usize;
        let (fr, fc) = (rows.div_ceil(max).max(1), cols.div_ceil(max).max(1));
        if fr == 1 && fc == 1 {
            // Uploaded as stored, without a copy.
            return (
                std::borrow::Cow::Borrowed(&self.data.values[..]),
                rows,
                cols,
            );
        }
        let (r2, c2) = (rows.div_ceil(fr), cols.div_ceil(fc));
        let signed = self.style.map == ColorMap::Diverging;
        let mut out = vec![if signed { 0.0 } else { f32::NEG_INFINITY }; r2 * c2];
        for r in 0..rows {
            for c in 0..cols {
                let v = self.data.values[r * cols + self.data.column(c)];
                let o = &mut out[(r / fr) * c2 + c / fc];
                if (signed && v.abs() > o.abs()) || (!signed && v > *o) {
                    *o = v;
                }
            }
        }
        (std::borrow::Cow::Owned(out), r2, c2)
    }
}

impl CallbackTrait for Callback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(res) = resources.get_mut::<Resources>() else {
            return Vec::new();
        };
        let max_dim = res.max_dim;
        let (fr, fc) = (
            self.data.rows.div_ceil(max_dim as usize).max(1),
            self.data.cols.div_ceil(max_dim as usize).max(1),
        );
        let (rows, cols) = (self.data.rows.div_ceil(fr), self.data.cols.div_ceil(fc));
        let srgb = res.srgb_target;
        let frame = self.frame;
        res.entries.retain(|id, e| {
            *id == self.id || frame.saturating_sub(e.last_frame) < EVICT_AFTER_FRAMES
        });
        let e = res.entry(device, self.id, rows, cols);
        e.last_frame = frame;
        let pooled = fr > 1 || fc > 1;
        // u64::MAX - 1: the identity order.
        let columns_version = match (&self.data.columns, pooled) {
            (Some(c), false) => c.version,
            _ => u64::MAX - 1,
        };
        let version = (
            self.data.version,
            if pooled {
                self.data.columns.as_ref().map_or(0, |c| c.version)
            } else {
                0
            },
        );
        if e.columns_version != columns_version {
            let order: Vec<u32> = match (&self.data.columns, pooled) {
                (Some(c), false) => c.order.to_vec(),
                _ => (0..cols as u32).collect(),
            };
            queue.write_texture(
                wgpu::TexelCopyTextureInfo {
                    texture: &e.columns,
                    mip_level: 0,
                    origin: wgpu::Origin3d::ZERO,
                    aspect: wgpu::TextureAspect::All,
                },
                bytemuck::cast_slice(&order),
                wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(4 * cols as u32),
                    rows_per_image: Some(1),
                },
                wgpu::Extent3d {
                    width: cols as u32,
                    height: 1,
                    depth_or_array_layers: 1,
                },
            );
            e.columns_version = columns_version;
            COLUMN_UPLOADS.fetch_add(1, Ordering::Relaxed);
        }
        if e.version != version {
            let (values, rows, cols) = self.fitted(max_dim);
            queue.write_texture(
                wgpu::TexelCopyTextureInfo {
                    texture: &e.texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d::ZERO,
                    aspect: wgpu::TextureAspect::All,
                },
                bytemuck::cast_slice(&values),
                wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(4 * cols as u32),
                    rows_per_image: Some(rows as u32),
                },
                wgpu::Extent3d {
                    width: cols as u32,
                    height: rows as u32,
                    depth_or_array_layers: 1,
                },
            );
            e.version = version;
            UPLOADS.fetch_add(1, Ordering::Relaxed);
        }
        let s = &self.style;
        let flags = u32::from(s.log)
            | (u32::from(s.map == ColorMap::Diverging) << 1)
            | (u32::from(srgb) << 2);
        let p = Params {
            lo: s.lo,
            hi: s.hi,
            gamma: s.gamma.max(1e-3),
            flags,
            cells_per_px: [
                self.cells_per_px[0] / fc as f32,
                self.cells_per_px[1] / fr as f32,
            ],
            _pad: [0.0; 2],
        };
        queue.write_buffer(&e.uniform, 0, bytemuck::bytes_of(&p));
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &CallbackResources,
    ) {
        let Some(res) = resources.get::<Resources>() else {
            return;
        };
        let Some(e) = res.entries.get(&self.id) else {
            return;
        };
        render_pass.set_pipeline(&res.pipeline);
        render_pass.set_bind_group(0, &e.bind_group, &[]);
        render_pass.draw(0..3, 0..1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_under_the_pointer_are_exact() {
        let r = egui::Rect::from_min_size(egui::pos2(10.0, 20.0), egui::vec2(100.0, 50.0));
        assert_eq!(cell_at(r, 1000, 4096, egui::pos2(10.0, 20.0)), Some((0, 0)));
        assert_eq!(
            cell_at(r, 1000, 4096, egui::pos2(110.0, 70.0)),
            Some((999, 4095))
        );
        assert_eq!(cell_at(r, 4, 2, egui::pos2(60.1, 32.6)), Some((1, 1)));
        assert_eq!(cell_at(r, 4, 2, egui::pos2(9.0, 30.0)), None);
    }

    #[test]
    fn colours_follow_range_gamma_and_log() {
        let s = Style::sequential(0.0, 1.0);
        assert_eq!(s.color(0.0), egui::Color32::from_rgb(68, 1, 84));
        assert_eq!(s.color(2.0), egui::Color32::from_rgb(253, 231, 37));
        let g = Style { gamma: 2.0, ..s };
        assert_eq!(g.color(0.5), s.color(0.25));
        let l = Style {
            lo: 1e-3,
            hi: 1.0,
            log: true,
            ..s
        };
        assert_eq!(l.color(0.031_622_78), s.color(0.5));
        let d = Style::diverging(2.0);
        assert_eq!(d.color(0.0), egui::Color32::from_rgb(247, 247, 247));
        assert_eq!(d.color(-2.0), egui::Color32::from_rgb(33, 102, 172));
    }
}
