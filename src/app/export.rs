//! Exports of every view: a PNG of the view (egui's viewport screenshot, cropped to the view's
//! rect) and a CSV of its data. All writes are atomic; the path-taking functions here are what
//! the buttons call after the save dialog, so tests call them directly.

use std::path::Path;

use eframe::egui;

use crate::worker::{ModuleSnapshot, Snapshot};

/// Crops a screenshot to `rect` (points; clamped to the image) and encodes it as PNG.
pub fn png_region(
    image: &egui::ColorImage,
    rect: egui::Rect,
    pixels_per_point: f32,
) -> anyhow::Result<Vec<u8>> {
    let [w, h] = image.size;
    let ppp = if pixels_per_point > 0.0 {
        pixels_per_point
    } else {
        1.0
    };
    let clamp = |v: f32, hi: usize| ((v * ppp).round().max(0.0) as usize).min(hi);
    let (x0, x1) = (clamp(rect.min.x, w), clamp(rect.max.x, w));
    let (y0, y1) = (clamp(rect.min.y, h), clamp(rect.max.y, h));
    if x1 <= x0 || y1 <= y0 {
        anyhow::bail!("the view is not on screen; nothing to export");
    }
    let mut rgba = Vec::with_capacity((x1 - x0) * (y1 - y0) * 4);
    for y in y0..y1 {
        for p in &image.pixels[y * w + x0..y * w + x1] {
            rgba.extend_from_slice(&p.to_srgba_unmultiplied());
        }
    }
    let img = image::RgbaImage::from_raw((x1 - x0) as u32, (y1 - y0) as u32, rgba)
        .ok_or_else(|| anyhow::anyhow!("cannot build the PNG image"))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    crate::io::atomic::write_atomic(path, bytes)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))
}

/// Directions CSV (long format): one row per entry of V_c (`side` = V, over inputs) and
/// U_c (`side` = U, over outputs) of every subcomponent of every module.
pub fn directions_csv(s: &Snapshot) -> String {
    let mut out = String::from("module,component,norm,side,index,value\n");
    for m in &s.modules {
        for c in 0..m.c {
            for i in 0..m.d_in {
                out.push_str(&format!(
                    "{},{c},{},V,{i},{}\n",
                    m.name,
                    m.norms[c],
                    m.v[i * m.c + c]
                ));
            }
            for o in 0..m.d_out {
                out.push_str(&format!(
                    "{},{c},{},U,{o},{}\n",
                    m.name,
                    m.norms[c],
                    m.u[c * m.d_out + o]
                ));
            }
        }
    }
    out
}

/// CI heatmap CSV: one row per input (labelled), one column per subcomponent in the shown order.
pub fn ci_csv(
    m: &ModuleSnapshot,
    data: &[f32],
    row_labels: &[String],
    columns: &[usize],
) -> String {
    let mut out = String::from("input");
    for &c in columns {
        out.push_str(&format!(",{}:{c}", m.name));
    }
    out.push('\n');
    for (r, label) in row_labels.iter().enumerate() {
        out.push_str(&csv_field(label));
        for &c in columns {
            out.push_str(&format!(",{}", data[r * m.c + c]));
        }
        out.push('\n');
    }
    out
}

/// Summary CSV (long format): `kind,module,component,value` with kind `l0`, `alive`, `dead`
/// (per layer, on the snapshot's batch at the config's threshold, computed by the worker) and
/// `mean_ci` (per subcomponent).
pub fn summary_csv(s: &Snapshot) -> String {
    let mut out = String::from("kind,module,component,value\n");
    for m in &s.modules {
        let (alive, l0) = (m.alive, m.l0);
        out.push_str(&format!("l0,{},,{l0}\n", m.name));
        out.push_str(&format!("alive,{},,{alive}\n", m.name));
        out.push_str(&format!("dead,{},,{}\n", m.name, m.c - alive));
    }
    for m in &s.modules {
        for (c, v) in m.mean_ci.iter().enumerate() {
            out.push_str(&format!("mean_ci,{},{c},{v}\n", m.name));
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
