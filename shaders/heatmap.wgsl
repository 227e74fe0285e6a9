// Heatmaps of spdlab (CI, co-activation, the days grid, U/V strips): one f32 value per cell in
// an R32Float texture, colour-mapped here. Range, gamma, log scale and colour map are uniforms,
// so restyling uploads nothing. Where several cells fall into one pixel the pixel shows the
// strongest of them (max, or max |v| for signed maps), so a single firing cell in 4096 rows is
// never lost. Columns are read through an index texture (the view's column order), so
// re-ordering them uploads one integer per column. The vertex stage emits one oversized
// triangle; egui-wgpu has set the viewport to the callback's rect and the scissor to its
// clip rect.

struct Params {
    lo: f32,
    hi: f32,
    gamma: f32,
    // bit 0: log scale; bit 1: diverging map (blue-white-red around 0); bit 2: sRGB target
    flags: u32,
    // cells per physical pixel along x and y (the footprint to reduce over)
    cells_per_px: vec2<f32>,
    _pad: vec2<f32>,
};

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var values: texture_2d<f32>;
// The stored column drawn at each position (cols x 1): re-ordering columns uploads only this.
@group(0) @binding(2) var columns: texture_2d<u32>;

struct VsOut {
    @builtin(position) pos: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

@vertex
fn vs_main(@builtin(vertex_index) idx: u32) -> VsOut {
    let x = f32((idx << 1u) & 2u) * 2.0 - 1.0;
    let y = f32(idx & 2u) * 2.0 - 1.0;
    var out: VsOut;
    out.pos = vec4<f32>(x, y, 0.0, 1.0);
    out.uv = vec2<f32>((x + 1.0) * 0.5, (1.0 - y) * 0.5); // row 0 at the top
    return out;
}

// Viridis (perceptually uniform, sequential), ten key colours in sRGB.
fn viridis(t_in: f32) -> vec3<f32> {
    var stops = array<vec3<f32>, 10>(
        vec3<f32>(0.267, 0.004, 0.329),
        vec3<f32>(0.282, 0.157, 0.471),
        vec3<f32>(0.243, 0.286, 0.537),
        vec3<f32>(0.192, 0.408, 0.557),
        vec3<f32>(0.149, 0.510, 0.557),
        vec3<f32>(0.122, 0.620, 0.537),
        vec3<f32>(0.208, 0.718, 0.475),
        vec3<f32>(0.427, 0.804, 0.349),
        vec3<f32>(0.706, 0.871, 0.173),
        vec3<f32>(0.992, 0.906, 0.145),
    );
    let x = clamp(t_in, 0.0, 1.0) * 9.0;
    let i = min(u32(floor(x)), 8u);
    return mix(stops[i], stops[i + 1u], x - f32(i));
}

// Blue - white - red (ColorBrewer RdBu ends), t in [0, 1] with 0.5 white.
fn diverging(t_in: f32) -> vec3<f32> {
    let t = clamp(t_in, 0.0, 1.0);
    let blue = vec3<f32>(0.129, 0.400, 0.675);
    let red = vec3<f32>(0.698, 0.094, 0.169);
    let white = vec3<f32>(0.969, 0.969, 0.969);
    if (t < 0.5) {
        return mix(blue, white, t * 2.0);
    }
    return mix(white, red, (t - 0.5) * 2.0);
}

fn srgb_to_linear(c: vec3<f32>) -> vec3<f32> {
    let lo = c / 12.92;
    let hi = pow((c + 0.055) / 1.055, vec3<f32>(2.4));
    return select(hi, lo, c <= vec3<f32>(0.04045));
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let dims = textureDimensions(values);
    let fd = vec2<f32>(dims);
    // The cells under this pixel, [first, last] (at most 64 per axis); one cell when a cell
    // is wider than a pixel.
    let center = in.uv * fd;
    let half = 0.5 * max(params.cells_per_px, vec2<f32>(1.0, 1.0));
    let lo_f = select(max(center - half, vec2<f32>(0.0)), center, params.cells_per_px < vec2<f32>(1.0));
    let hi_f = select(center + half - 1e-3, center, params.cells_per_px < vec2<f32>(1.0));
    let last_cell = dims - vec2<u32>(1u, 1u);
    let first = min(vec2<u32>(floor(lo_f)), last_cell);
    let last = min(vec2<u32>(floor(max(hi_f, lo_f))), last_cell);
    let n = min(last - first + vec2<u32>(1u, 1u), vec2<u32>(64u, 64u));
    let signed = (params.flags & 2u) != 0u;
    let src0 = textureLoad(columns, vec2<u32>(first.x, 0u), 0).r;
    var best = textureLoad(values, vec2<u32>(min(src0, last_cell.x), first.y), 0).r;
    for (var j = 0u; j < n.y; j = j + 1u) {
        for (var i = 0u; i < n.x; i = i + 1u) {
            let p = min(first + vec2<u32>(i, j), dims - vec2<u32>(1u, 1u));
            let src = textureLoad(columns, vec2<u32>(p.x, 0u), 0).r;
            let v = textureLoad(values, vec2<u32>(min(src, last_cell.x), p.y), 0).r;
            if ((signed && abs(v) > abs(best)) || (!signed && v > best)) {
                best = v;
            }
        }
    }
    var t: f32;
    if ((params.flags & 1u) != 0u) {
        let lo = log(max(params.lo, 1e-30));
        let hi = log(max(params.hi, 1e-30));
        t = (log(max(best, 1e-30)) - lo) / max(hi - lo, 1e-12);
    } else {
        t = (best - params.lo) / max(params.hi - params.lo, 1e-12);
    }
    var c: vec3<f32>;
    if (signed) {
        // Gamma on the distance from the centre, keeping the sign.
        let d = clamp(t, 0.0, 1.0) * 2.0 - 1.0;
        let g = sign(d) * pow(abs(d), params.gamma);
        c = diverging(g * 0.5 + 0.5);
    } else {
        c = viridis(pow(clamp(t, 0.0, 1.0), params.gamma));
    }
    if ((params.flags & 4u) != 0u) {
        c = srgb_to_linear(c);
    }
    return vec4<f32>(c, 1.0);
}
