//! The WGSL heatmap: values upload once per version (dragging the colour range or switching
//! the scale uploads nothing), and a 4096 × 1000 heatmap is drawn exactly (a single hot cell
//! among 4 million shows up, without CPU pooling); in the app, dragging the CI view's colour
//! range uploads nothing; a column order is drawn through the index texture (uploading the
//! order, not the values). One test: the upload counter is global.

use std::sync::Arc;

use eframe::egui;
use egui_kittest::Harness;
use spdlab::app::heatmap::{self, Data, Style};

struct App {
    data: Data,
    style: Style,
    rect: Option<egui::Rect>,
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::CentralPanel::default().show(ui, |ui| {
            let (rect, _) = ui.allocate_exact_size(egui::vec2(400.0, 500.0), egui::Sense::hover());
            heatmap::paint(
                ui,
                rect,
                egui::Id::unique("test-heatmap"),
                &self.data,
                self.style,
            );
            self.rect = Some(rect);
        });
    }
}

const ROWS: usize = 4096;
const COLS: usize = 1000;
const HOT: (usize, usize) = (2901, 617);

fn data(version: u64) -> Data {
    let mut v = vec![0.0f32; ROWS * COLS];
    v[HOT.0 * COLS + HOT.1] = 1.0;
    Data::new(Arc::new(v), ROWS, COLS, version)
}

#[test]
fn uploads_once_per_version_and_draws_every_cell() {
    let mut h = Harness::builder()
        .with_size(egui::vec2(600.0, 600.0))
        .wgpu()
        .build_eframe(|cc| {
            heatmap::register(cc.wgpu_render_state.as_ref().expect("wgpu"));
            App {
                data: data(1),
                style: Style::sequential(0.0, 1.0),
                rect: None,
            }
        });
    h.run();
    let img = h.render().expect("render");
    let base = heatmap::uploads();
    assert!(base >= 1, "the first frame uploads the values");
    // The hot cell (one of 4,096,000, 8 rows and 2.5 columns per pixel) is drawn.
    let rect = h.state().rect.expect("drawn");
    let ppp = h.ctx.pixels_per_point();
    let x = rect.left() + (HOT.1 as f32 + 0.5) / COLS as f32 * rect.width();
    let y = rect.top() + (HOT.0 as f32 + 0.5) / ROWS as f32 * rect.height();
    let hot = Style::sequential(0.0, 1.0).color(1.0);
    let near_hot_at = |img: &image::RgbaImage, px: f32, py: f32| {
        let (cx, cy) = (px as i64, py as i64);
        (-2..=2).any(|dy| {
            (-2..=2).any(|dx| {
                let p = img.get_pixel((cx + dx) as u32, (cy + dy) as u32);
                (p[0] as i32 - hot.r() as i32).abs() < 30
                    && (p[1] as i32 - hot.g() as i32).abs() < 30
                    && (p[2] as i32 - hot.b() as i32).abs() < 30
            })
        })
    };
    let near_hot = |img: &image::RgbaImage| near_hot_at(img, x * ppp, y * ppp);
    assert!(near_hot(&img), "the single hot cell is not visible");
    // Elsewhere the map's low colour.
    let cold = Style::sequential(0.0, 1.0).color(0.0);
    let p = img.get_pixel(
        (rect.left() * ppp) as u32 + 5,
        (rect.top() * ppp) as u32 + 5,
    );
    assert!((p[0] as i32 - cold.r() as i32).abs() < 30, "{p:?}");
    // Dragging the range, gamma, log scale and a diverging map: no upload.
    for i in 0..30 {
        let s = &mut h.state_mut().style;
        s.hi = 1.0 + i as f32 * 0.1;
        s.gamma = 0.5 + i as f32 * 0.05;
        s.log = i % 2 == 0;
        s.lo = if s.log { 1e-3 } else { 0.0 };
        h.run();
        let _ = h.render().expect("render");
    }
    h.state_mut().style = Style::diverging(1.0);
    h.run();
    let _ = h.render().expect("render");
    assert_eq!(heatmap::uploads(), base, "restyling uploaded values");
    // New data (a new snapshot): one upload.
    h.state_mut().data = data(2);
    h.state_mut().style = Style::sequential(0.0, 1.0);
    h.run();
    let img = h.render().expect("render");
    assert_eq!(heatmap::uploads(), base + 1);
    assert!(near_hot(&img));
    // Hover maps the pointer to the exact cell.
    let cell = heatmap::cell_at(rect, ROWS, COLS, egui::pos2(x, y));
    assert_eq!(cell, Some(HOT));
    // A column order (reversed): the hot cell moves to its new position, and only the order
    // is uploaded (one integer per column), not the values.
    let columns_before = heatmap::column_uploads();
    let reversed: Vec<u32> = (0..COLS as u32).rev().collect();
    let ordered = data(2).with_columns(Arc::new(reversed), 1);
    let moved = COLS - 1 - HOT.1;
    assert_eq!(ordered.get(HOT.0, moved), Some(1.0));
    h.state_mut().data = ordered;
    h.run();
    let img = h.render().expect("render");
    assert_eq!(heatmap::uploads(), base + 1, "re-ordering uploaded values");
    assert_eq!(heatmap::column_uploads(), columns_before + 1);
    let x_moved = rect.left() + (moved as f32 + 0.5) / COLS as f32 * rect.width();
    assert!(
        near_hot_at(&img, x_moved * ppp, y * ppp),
        "the hot cell is not drawn at its re-ordered column"
    );
    assert!(
        !near_hot(&img),
        "the hot cell is still drawn at its stored column"
    );
    drop(h);
    colour_range_drag_in_the_app_uploads_nothing();
}

fn colour_range_drag_in_the_app_uploads_nothing() {
    use egui_kittest::kittest::Queryable;
    use spdlab::app::views::ci::CiView;
    let mut h = Harness::builder()
        .with_size(egui::vec2(1100.0, 700.0))
        .wgpu()
        .build_eframe(|cc| {
            let mut app = spdlab::app::SpdApp::new(cc, None, Default::default());
            let (tr, _) = spdlab::io::spdlab_file::from_bytes(
                spdlab::assets::default_decomposition(),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let snap = spdlab::worker::build_snapshot(&tr, 0.75, 256).unwrap();
            app.apply(spdlab::worker::Event::Loaded {
                description: "tms-5-2".into(),
                config: Box::new(tr.config.clone()),
                step: tr.step,
                history: tr.history.clone(),
            });
            app.apply(spdlab::worker::Event::Snapshot(Arc::new(snap)));
            app
        });
    h.state_mut().set_view("ci");
    h.run();
    h.get_by_label_contains("data batch").click();
    h.run();
    let _ = h.render().expect("render");
    let before = heatmap::uploads();
    // Drag the colour max over its range, change gamma and switch to a log scale.
    for i in 0..20 {
        let v = h.state_mut().view_mut::<CiView>().unwrap();
        v.vmax = 0.05 + 0.047 * i as f32;
        v.gamma = 0.5 + 0.1 * i as f32;
        v.log = i % 2 == 1;
        h.run();
        let _ = h.render().expect("render");
    }
    assert_eq!(
        heatmap::uploads(),
        before,
        "dragging the colour range uploaded values"
    );
    assert_eq!(h.state().view::<CiView>().unwrap().rows, 256);
}
