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
    let img = crate::app::timeline_bar::crop(image, rect, pixels_per_point)
        .ok_or_else(|| anyhow::anyhow!("the view is not on screen; nothing to export"))?;
    png_bytes(&img)
}

/// PNG bytes of an image.
pub fn png_bytes(img: &image::RgbaImage) -> anyhow::Result<Vec<u8>> {
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
