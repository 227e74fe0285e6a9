//! What a decomposition of the days target found: the rotation mechanism of each rotating
//! operation, checked against the known construction (see [`crate::model::days`]).

use serde::{Deserialize, Serialize};

use crate::cluster::ClusteringResult;
use crate::inputs::probe_inputs;
use crate::interventions::{Intervention, Selection, argmax, run_intervention};
use crate::model::TargetSpec;
use crate::model::days::{answer, op_delta};
use crate::rng::Rng;
use crate::spd::component_model::ComponentModel;

/// CI at or above this on an operation's inputs makes a rotating-layer subcomponent part of
/// that operation's mechanism.
pub const MEMBER_CI: f32 = 0.5;

/// The mechanism found for one rotating operation ("next", "previous").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpMechanism {
    pub op: String,
    /// Subcomponents of the rotating layers (mlp_in, mlp_out) with CI ≥ 0.5 on some input of
    /// this operation.
    pub members: Vec<String>,
    /// Per member: min over days of its CI under this operation.
    pub member_min_ci_on_op: Vec<f32>,
    /// Per member: max over days of its CI under "same day".
    pub member_max_ci_on_same: Vec<f32>,
    /// Mechanism level: per day, max CI over members; then min over days (op) / max (same).
    pub mechanism_min_ci_on_op: f32,
    pub mechanism_max_ci_on_same: f32,
    /// Cluster ids of the members (with a clustering), sorted and deduplicated.
    pub clusters: Vec<usize>,
    /// Σ members' weights composed on the day plane: W_out[plane, ·] · W_in[·, plane]
    /// (row-major, acting on column vectors).
    pub plane_map: [[f32; 2]; 2],
    /// The construction's R − I.
    pub expected: [[f32; 2]; 2],
    /// ‖plane_map − (R − I)‖_F / ‖R − I‖_F.
    pub plane_map_rel_error: f32,
    /// What was ablated: the members' cluster(s) when clustered, else the members.
    pub ablated: Vec<String>,
    /// After ablation: (operation, correct of n_days, answers equal to the same-day answer).
    pub ablated_answers: Vec<(String, usize, usize)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaysReport {
    /// Correct answers of the full decomposition per operation (of n_days).
    pub full_correct: Vec<(String, usize)>,
    /// MMCS / ML2R of the embedding's subcomponents against its day columns, and whether the
    /// best-matching subcomponent differs for every day.
    pub embed_mmcs: f64,
    pub embed_ml2r: f64,
    pub embed_distinct: bool,
    pub mechanisms: Vec<OpMechanism>,
}

/// Analyses a decomposition of a days target.
// CI tables are indexed [module][row][component]; a column walk reads best with indices.
#[allow(clippy::needless_range_loop)]
pub fn days_report(
    model: &ComponentModel,
    clusters: Option<&ClusteringResult>,
) -> anyhow::Result<DaysReport> {
    let TargetSpec::Days { n_days, n_ops } = model.target.spec else {
        anyhow::bail!("not a days model");
    };
    let inputs = probe_inputs(&model.target.spec, 1.0);
    let row = |d: usize, o: usize| d * n_ops + o;
    let dev = model.device();
    let xt = candle_core::Tensor::from_vec(
        inputs.iter().flatten().copied().collect(),
        (inputs.len(), model.target.spec.n_features()),
        dev,
    )?;
    let ci: Vec<Vec<Vec<f32>>> = crate::interventions::lower_ci(model, &xt)?
        .iter()
        .map(|t| t.to_vec2::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let op_name = |o: usize| crate::model::days::OP_NAMES[o].to_string();

    // Full decomposition answers.
    let keep = Intervention {
        selected_mode: crate::interventions::MaskMode::Keep,
        ..Intervention::ablate(Selection::empty(model))
    };
    let full = run_intervention(model, &inputs, &keep, &mut Rng::new(0))?;
    let full_correct = (0..n_ops)
        .map(|o| {
            let ok = (0..n_days)
                .filter(|&d| argmax(&full.full[row(d, o)]) == answer(n_days, d, o))
                .count();
            (op_name(o), ok)
        })
        .collect();

    // Embedding vs its day columns.
    let je = model
        .module_index("embed")
        .ok_or_else(|| anyhow::anyhow!("the decomposition does not decompose 'embed'"))?;
    let em = &model.modules[je];
    let v = em.v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let u = em.u.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let w = model.target.modules[em.target_idx]
        .weight
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mm = super::toy_metrics::mmcs(&v, &u, &w, em.d_in, em.c, em.d_out);
    let embed_mmcs = mm.best_cos[..n_days].iter().sum::<f64>() / n_days as f64;
    let embed_ml2r = mm.l2_ratio[..n_days].iter().sum::<f64>() / n_days as f64;
    let mut best: Vec<usize> = mm.best_component[..n_days].to_vec();
    best.sort();
    best.dedup();
    let embed_distinct = best.len() == n_days;

    let j_in = model
        .module_index("mlp_in")
        .ok_or_else(|| anyhow::anyhow!("the decomposition does not decompose 'mlp_in'"))?;
    let j_out = model
        .module_index("mlp_out")
        .ok_or_else(|| anyhow::anyhow!("the decomposition does not decompose 'mlp_out'"))?;
    let mut mechanisms = vec![];
    for op in 1..n_ops {
        let mut members = vec![];
        let mut member_min = vec![];
        let mut member_same = vec![];
        let mut sel = Selection::empty(model);
        let mut per_day_op = vec![0f32; n_days];
        let mut per_day_same = vec![0f32; n_days];
        for &j in &[j_in, j_out] {
            for c in 0..model.modules[j].c {
                let on_op: Vec<f32> = (0..n_days).map(|d| ci[j][row(d, op)][c]).collect();
                if on_op.iter().all(|&g| g < MEMBER_CI) {
                    continue;
                }
                let on_same: Vec<f32> = (0..n_days).map(|d| ci[j][row(d, 0)][c]).collect();
                members.push(format!("{}:{c}", model.modules[j].name));
                member_min.push(on_op.iter().copied().fold(f32::INFINITY, f32::min));
                member_same.push(on_same.iter().copied().fold(0.0, f32::max));
                for (d, (a, b)) in per_day_op.iter_mut().zip(&mut per_day_same).enumerate() {
                    *a = a.max(on_op[d]);
                    *b = b.max(on_same[d]);
                }
                sel.selected[j][c] = true;
            }
        }
        // Composed plane map of the members' summed weights.
        let summed = |j: usize| -> anyhow::Result<Vec<Vec<f32>>> {
            // Σ_c V[:, c] U[c, :] over selected c: [d_in, d_out].
            let m = &model.modules[j];
            let v = m.v.as_tensor().to_vec2::<f32>()?;
            let u = m.u.as_tensor().to_vec2::<f32>()?;
            let mut a = vec![vec![0f32; m.d_out]; m.d_in];
            for c in (0..m.c).filter(|&c| sel.selected[j][c]) {
                for (i, row) in a.iter_mut().enumerate() {
                    for (o, x) in row.iter_mut().enumerate() {
                        *x += v[i][c] * u[c][o];
                    }
                }
            }
            Ok(a)
        };
        let a_in = summed(j_in)?; // [d_model, d_mlp]
        let a_out = summed(j_out)?; // [d_mlp, d_model]
        let mut plane_map = [[0f32; 2]; 2];
        for (r, pm_row) in plane_map.iter_mut().enumerate() {
            for (c, x) in pm_row.iter_mut().enumerate() {
                // out_r = Σ_k a_out[k][r] · (Σ_c a_in[c][k] p_c)
                *x = (0..a_out.len()).map(|k| a_in[c][k] * a_out[k][r]).sum();
            }
        }
        let expected = op_delta(n_days, op);
        let (mut num, mut den) = (0f32, 0f32);
        for r in 0..2 {
            for c in 0..2 {
                num += (plane_map[r][c] - expected[r][c]).powi(2);
                den += expected[r][c].powi(2);
            }
        }
        let mut cluster_ids: Vec<usize> = vec![];
        let mut ablate = sel.clone();
        if let Some(cl) = clusters {
            for m in &members {
                if let Some(&id) = cl.assignment.get(m) {
                    cluster_ids.push(id);
                }
            }
            cluster_ids.sort();
            cluster_ids.dedup();
            for &id in &cluster_ids {
                ablate.add_cluster(model, cl, id)?;
            }
        }
        let res = run_intervention(
            model,
            &inputs,
            &Intervention::ablate(ablate.clone()),
            &mut Rng::new(0),
        )?;
        let ablated_answers = (0..n_ops)
            .map(|o| {
                let ok = (0..n_days)
                    .filter(|&d| argmax(&res.intervened[row(d, o)]) == answer(n_days, d, o))
                    .count();
                let as_same = (0..n_days)
                    .filter(|&d| argmax(&res.intervened[row(d, o)]) == d)
                    .count();
                (op_name(o), ok, as_same)
            })
            .collect();
        mechanisms.push(OpMechanism {
            op: op_name(op),
            members,
            member_min_ci_on_op: member_min,
            member_max_ci_on_same: member_same,
            mechanism_min_ci_on_op: per_day_op.iter().copied().fold(f32::INFINITY, f32::min),
            mechanism_max_ci_on_same: per_day_same.iter().copied().fold(0.0, f32::max),
            clusters: cluster_ids,
            plane_map,
            expected,
            plane_map_rel_error: (num / den.max(1e-12)).sqrt(),
            ablated: ablate.labels(model),
            ablated_answers,
        });
    }
    Ok(DaysReport {
        full_correct,
        embed_mmcs,
        embed_ml2r,
        embed_distinct,
        mechanisms,
    })
}

/// Everything the app's days view draws, computed by the worker once per snapshot.
#[derive(Clone, Debug, Default)]
pub struct DaysViewData {
    pub n_days: usize,
    pub n_ops: usize,
    /// (day, op) of every input row (row = day·n_ops + op).
    pub rows: Vec<(usize, usize)>,
    /// Per decomposed module: name and lower-leaky CI `[rows][C]`.
    pub ci: Vec<(String, Vec<Vec<f32>>)>,
    /// Per rotating operation (index op − 1): the mechanism found.
    pub mechanisms: Vec<OpMechanism>,
    /// Labels of every subcomponent ablated per mechanism (cluster when clustered).
    pub answers_full: Vec<usize>,
    /// Answers with the mechanism of op k (index k − 1) ablated.
    pub answers_ablated: Vec<Vec<usize>>,
    /// Plane position of every row's embedding (before the MLP).
    pub plane_embed: Vec<[f32; 2]>,
    /// Per row: plane positions as the row's mechanism is dialled from 0 to 1 (21 steps);
    /// for "same" rows a single point.
    pub paths: Vec<Vec<[f32; 2]>>,
    /// Plane position of every row with its operation's mechanism ablated.
    pub plane_ablated: Vec<[f32; 2]>,
    /// Per mechanism: arrows in the day plane (label, is_write, direction).
    pub arrows: Vec<Vec<(String, bool, [f32; 2])>>,
}

/// Computes [`DaysViewData`].
pub fn days_view_data(
    model: &ComponentModel,
    clusters: Option<&ClusteringResult>,
) -> anyhow::Result<DaysViewData> {
    use crate::interventions::MaskMode;
    use crate::model::days::plane_from_logits;
    let TargetSpec::Days { n_days, n_ops } = model.target.spec else {
        anyhow::bail!("not a days model");
    };
    let rep = days_report(model, clusters)?;
    let inputs = probe_inputs(&model.target.spec, 1.0);
    let rows: Vec<(usize, usize)> = (0..n_days)
        .flat_map(|d| (0..n_ops).map(move |o| (d, o)))
        .collect();
    let xt = candle_core::Tensor::from_vec(
        inputs.iter().flatten().copied().collect(),
        (inputs.len(), model.target.spec.n_features()),
        model.device(),
    )?;
    let lci = crate::interventions::lower_ci(model, &xt)?;
    let mut ci = vec![];
    for (j, m) in model.modules.iter().enumerate() {
        ci.push((m.name.clone(), lci[j].to_vec2::<f32>()?));
    }
    let mut rng = Rng::new(0);
    let none = Selection::empty(model);
    let keep = Intervention {
        selected_mode: MaskMode::Keep,
        ..Intervention::ablate(none.clone())
    };
    let full = run_intervention(model, &inputs, &keep, &mut rng)?;
    let answers_full = full.full.iter().map(|o| argmax(o)).collect();
    // Embedding plane position: the stream before the MLP = the output with the MLP's
    // subcomponents all ablated (no delta): the unembedding reads the plane directly.
    let mut mlp = Selection::empty(model);
    for name in ["mlp_in", "mlp_out"] {
        if let Some(j) = model.module_index(name) {
            mlp.selected[j].iter_mut().for_each(|s| *s = true);
        }
    }
    let embed_only = run_intervention(model, &inputs, &Intervention::ablate(mlp), &mut rng)?;
    let plane_embed: Vec<[f32; 2]> = embed_only
        .intervened
        .iter()
        .map(|o| plane_from_logits(n_days, o))
        .collect();
    let selection_of = |m: &OpMechanism| -> anyhow::Result<Selection> {
        let mut s = Selection::empty(model);
        for l in &m.ablated {
            s.add_label(model, l)?;
        }
        Ok(s)
    };
    let mut answers_ablated = vec![];
    let mut plane_ablated = vec![[0f32; 2]; rows.len()];
    let mut paths: Vec<Vec<[f32; 2]>> = full
        .full
        .iter()
        .map(|o| vec![plane_from_logits(n_days, o)])
        .collect();
    let mut arrows = vec![];
    for (k, mech) in rep.mechanisms.iter().enumerate() {
        let op = k + 1;
        let sel = selection_of(mech)?;
        let ab = run_intervention(model, &inputs, &Intervention::ablate(sel.clone()), &mut rng)?;
        answers_ablated.push(ab.intervened.iter().map(|o| argmax(o)).collect());
        for (i, &(_, o)) in rows.iter().enumerate() {
            if o == op {
                plane_ablated[i] = plane_from_logits(n_days, &ab.intervened[i]);
                paths[i].clear();
            } else if o == 0 && k == 0 {
                plane_ablated[i] = plane_from_logits(n_days, &ab.intervened[i]);
            }
        }
        for t in 0..=20 {
            let iv = Intervention {
                selected_mode: MaskMode::Scale(t as f32 / 20.0),
                ..Intervention::ablate(sel.clone())
            };
            let r = run_intervention(model, &inputs, &iv, &mut rng)?;
            for (i, &(_, o)) in rows.iter().enumerate() {
                if o == op {
                    paths[i].push(plane_from_logits(n_days, &r.intervened[i]));
                }
            }
        }
        // Arrows: read directions of mlp_in members and write directions of mlp_out members,
        // restricted to the day plane (stream dims 0, 1), scaled by the other factor's norm.
        let mut arr = vec![];
        for label in &mech.members {
            let (name, idx) = label.rsplit_once(':').unwrap_or(("", "0"));
            let (Some(j), Ok(c)) = (model.module_index(name), idx.parse::<usize>()) else {
                continue;
            };
            let m = &model.modules[j];
            let v = m.v.as_tensor().to_vec2::<f32>()?;
            let u = m.u.as_tensor().to_vec2::<f32>()?;
            let norm = |x: &[f32]| x.iter().map(|a| a * a).sum::<f32>().sqrt();
            if name == "mlp_in" {
                let un = norm(&u[c]);
                arr.push((label.clone(), false, [v[0][c] * un, v[1][c] * un]));
            } else {
                let vc: Vec<f32> = v.iter().map(|r| r[c]).collect();
                let vn = norm(&vc);
                arr.push((label.clone(), true, [u[c][0] * vn, u[c][1] * vn]));
            }
        }
        arrows.push(arr);
    }
    Ok(DaysViewData {
        n_days,
        n_ops,
        rows,
        ci,
        mechanisms: rep.mechanisms,
        answers_full,
        answers_ablated,
        plane_embed,
        paths,
        plane_ablated,
        arrows,
    })
}
