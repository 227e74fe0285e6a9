//! The command line's human-readable reports (the engine returns data; `--json` prints it as
//! is).

use spdlab::metrics;
use spdlab::metrics::days::DaysReport;
use spdlab::runner::CiReport;

/// The metrics of `eval` and `train`.
pub fn eval_report(r: &metrics::EvalReport) {
    println!("losses:");
    for (k, v) in &r.losses {
        println!("  {k:<32} {v:.6e}");
    }
    println!("L0 (CI > threshold) per layer:");
    for (k, v) in &r.l0 {
        println!(
            "  {k:<32} {v:.3}   alive {}",
            r.alive.get(k).copied().unwrap_or(0)
        );
    }
    println!("MMCS / ML2R per decomposed matrix:");
    for (k, v) in &r.mmcs {
        println!(
            "  {k:<32} {v:.4} / {:.4}",
            r.ml2r.get(k).copied().unwrap_or(f64::NAN)
        );
    }
    if let Some(ck) = &r.ce_kl {
        println!(
            "language model (the reference's CEandKLLosses; CE of the target {:.4} nats/token):",
            ck.get("ce_target").copied().unwrap_or(f64::NAN)
        );
        println!(
            "  {:<16} {:>10} {:>14} {:>15}",
            "masks", "KL", "CE - target", "CE unrecovered"
        );
        for m in [
            "ci_masked",
            "unmasked",
            "stoch_masked",
            "random_masked",
            "rounded_masked",
        ] {
            let g = |k: &str| ck.get(&format!("{k}_{m}")).copied().unwrap_or(f64::NAN);
            println!(
                "  {m:<16} {:>10.4} {:>14.4} {:>15.4}",
                g("kl"),
                g("ce_difference"),
                g("ce_unrecovered")
            );
        }
        println!(
            "  {:<16} {:>10.4}",
            "zero_masked",
            ck.get("kl_zero_masked").copied().unwrap_or(f64::NAN)
        );
    }
    if let Some(t) = &r.target_solution_error {
        println!(
            "target-solution error: total {} (tol 0.2: {})",
            t.total, t.total_0p2
        );
        for (k, v) in &t.per_module {
            println!("  {k:<32} {v}");
        }
    }
    if let Some(fr) = &r.feature_response {
        println!(
            "single-feature response (CI > 0.5 at 0.75·e_f): monosemantic (features covered), shared by 2+ features, silent:"
        );
        for (k, v) in fr {
            println!(
                "  {k:<32} {} ({}), {}, {}",
                v.monosemantic, v.features_covered, v.shared, v.silent
            );
        }
    }
}

pub fn ci_report(r: &CiReport) {
    if let Some(s) = r.seq_len {
        return sequence_ci_report(r, s);
    }
    for (i, x) in r.inputs.iter().enumerate() {
        println!("input {i}: {x:?}");
        for (m, rows) in &r.ci {
            let active: Vec<String> = rows[i]
                .iter()
                .enumerate()
                .filter(|(_, v)| **v > 0.0)
                .map(|(c, v)| format!("{c}:{v:.3}"))
                .collect();
            println!(
                "  {m:<20} {} ({})",
                if active.is_empty() {
                    "none".to_string()
                } else {
                    active.join(" ")
                },
                r.ci_type
            );
        }
        println!("  target output       {:?}", r.target_output[i]);
        println!("  unmasked output     {:?}", r.unmasked_output[i]);
    }
}

/// CI per position of each input sequence: the active subcomponents of every module, the
/// target's top token and the KL of the CI-masked decomposition there.
fn sequence_ci_report(r: &CiReport, s: usize) {
    for (i, x) in r.inputs.iter().enumerate() {
        let toks: Vec<String> = x.iter().map(|v| format!("{v:.0}")).collect();
        println!("input {i}: [{}]", toks.join(" "));
        for (p, tok) in toks.iter().enumerate().take(s) {
            let row = i * s + p;
            let top = spdlab::interventions::argmax(&r.target_output[row]);
            println!(
                "  position {p:>3} token {tok:>4}  target top {top:>4}  KL(ci-masked) {:.2e}",
                r.kl_ci_masked.get(row).copied().unwrap_or(f32::NAN)
            );
            for (m, rows) in &r.ci {
                let active: Vec<String> = rows[row]
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0.0)
                    .map(|(c, v)| format!("{c}:{v:.3}"))
                    .collect();
                if !active.is_empty() {
                    println!("    {m:<24} {}", active.join(" "));
                }
            }
        }
    }
    println!(
        "({} CI; rows with no active subcomponent are not listed)",
        r.ci_type
    );
}

pub fn intervention(
    spec: &spdlab::model::TargetSpec,
    labels: &[String],
    iv: &spdlab::interventions::Intervention,
    r: &spdlab::interventions::InterventionResult,
) {
    println!(
        "selection ({} subcomponents, {}): {}",
        labels.len(),
        iv.selected_mode.label(),
        if labels.len() > 12 {
            format!("{} ...", labels[..12].join(" "))
        } else {
            labels.join(" ")
        }
    );
    println!(
        "others: {}; delta component {}; change measured against everything in the others' mode",
        iv.other_mode.label(),
        if iv.delta { "on" } else { "off" }
    );
    println!(
        "{:>5}  {:<28} {:>11} {:>11} {:>11} {:>11}",
        "input", "active", "max|change|", "loss base", "loss interv", "change"
    );
    for i in r.what_breaks() {
        println!(
            "{i:>5}  {:<28} {:>11.4} {:>11.3e} {:>11.3e} {:>+11.3e}",
            spdlab::inputs::describe_input(spec, &r.inputs[i]),
            r.max_change[i],
            r.loss_baseline[i],
            r.loss_intervened[i],
            r.loss_change[i]
        );
    }
    if !r.per_feature.is_empty() {
        println!("per feature / class (baseline -> intervened):");
        for f in &r.per_feature {
            let broken = f.is_broken();
            println!(
                "  {:<16} {:>6} inputs  {} {:.4e} -> {:.4e}{}",
                f.name,
                f.n_inputs,
                f.metric,
                f.baseline,
                f.intervened,
                if broken { "  <- broken" } else { "" }
            );
        }
    }
    println!("per-output MSE against the target (baseline -> intervened):");
    for (k, (a, b)) in r
        .per_output_mse_baseline
        .iter()
        .zip(&r.per_output_mse_intervened)
        .enumerate()
    {
        let flag = if *b > 10.0 * a.max(1e-6) {
            "  <- broken"
        } else {
            ""
        };
        println!("  out {k:>3}: {a:.3e} -> {b:.3e}{flag}");
    }
}

/// Prints a report for people.
pub fn days_report(r: &DaysReport) {
    let full: Vec<String> = r
        .full_correct
        .iter()
        .map(|(o, k)| format!("{o} {k}/7"))
        .collect();
    println!("full decomposition answers: {}", full.join(", "));
    println!(
        "embedding: MMCS {:.4} ML2R {:.4} against the day columns; one subcomponent per day: {}",
        r.embed_mmcs,
        r.embed_ml2r,
        if r.embed_distinct { "yes" } else { "no" }
    );
    for m in &r.mechanisms {
        println!("operation '{}': {} members", m.op, m.members.len());
        for (i, l) in m.members.iter().enumerate() {
            println!(
                "  {l:<12} min CI on '{}' {:.3}, max CI on 'same' {:.3}",
                m.op, m.member_min_ci_on_op[i], m.member_max_ci_on_same[i]
            );
        }
        println!(
            "  mechanism CI: min over days on '{}' {:.3}, max on 'same' {:.3}",
            m.op, m.mechanism_min_ci_on_op, m.mechanism_max_ci_on_same
        );
        println!(
            "  clusters of the members: {}",
            if m.clusters.is_empty() {
                "(no clustering)".to_string()
            } else {
                format!("{:?}", m.clusters)
            }
        );
        println!(
            "  plane map {:?} vs R - I {:?}: relative error {:.2}%",
            m.plane_map,
            m.expected,
            100.0 * m.plane_map_rel_error
        );
        let ab: Vec<String> = m
            .ablated_answers
            .iter()
            .map(|(o, k, s)| format!("{o} {k}/7 correct ({s} answered as same day)"))
            .collect();
        println!(
            "  ablating {} subcomponents: {}",
            m.ablated.len(),
            ab.join(", ")
        );
    }
}

/// A sweep's points: axis values, state, and for finished points the total loss, L0 per
/// module, the target-solution error (presets with a known answer) and steps/s.
pub fn sweep_table(sweep: &spdlab::sweep::Sweep) {
    use spdlab::sweep::PointState;
    let axes: Vec<&str> = sweep.spec.axes.iter().map(|a| a.path.as_str()).collect();
    let mut head = format!("{:>5}", "point");
    for a in &axes {
        head.push_str(&format!("  {:>12}", short_path(a)));
    }
    head.push_str(&format!(
        "  {:>10}  {:>10}  {:>5}  {:>8}  L0 per module",
        "state", "loss", "TSE", "steps/s"
    ));
    println!("{head}");
    for p in sweep.points() {
        let mut line = format!("{:>5}", p.index);
        for (_, v) in &p.values {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            line.push_str(&format!("  {v:>12}"));
        }
        match (sweep.state(p.index), sweep.summary(p.index)) {
            (PointState::Finished, Some(s)) => {
                let l0: Vec<String> = s
                    .l0
                    .iter()
                    .map(|(k, v)| {
                        // With single-feature answers: monosemantic and shared counts.
                        match s.feature_response.as_ref().and_then(|f| f.get(k)) {
                            Some(f) => {
                                format!("{k} {v:.2} [mono {} shared {}]", f.monosemantic, f.shared)
                            }
                            None => format!("{k} {v:.2}"),
                        }
                    })
                    .collect();
                line.push_str(&format!(
                    "  {:>10}  {:>10.3e}  {:>5}  {:>8.1}  {}",
                    "finished",
                    s.losses.get("total").copied().unwrap_or(f64::NAN),
                    s.target_solution_error
                        .as_ref()
                        .map_or("-".to_string(), |t| t.total.to_string()),
                    s.steps_per_second,
                    l0.join(", ")
                ));
            }
            (PointState::Running { step, total }, _) => {
                line.push_str(&format!("  {:>10}", format!("{step}/{total}")));
            }
            _ => line.push_str(&format!("  {:>10}", "pending")),
        }
        println!("{line}");
    }
}

/// The last part of a config path (`loss.ImportanceMinimalityLoss.coeff` -> `coeff`) with the
/// loss class shortened, for column heads.
fn short_path(p: &str) -> String {
    match p.split('.').collect::<Vec<_>>().as_slice() {
        ["loss", class, field] => {
            let initials: String = class.chars().filter(|c| c.is_uppercase()).collect();
            format!("{initials}.{field}")
        }
        _ => p.to_string(),
    }
}

fn rule_line(name: &str, a: &spdlab::tinylm::RuleAccuracy) {
    println!(
        "{name:<28} {:>9.3} {:>9.3} {:>9.3} {:>10.3}",
        a.day_after, a.copy, a.count, a.ce
    )
}

fn rule_header(stories: usize, a: &spdlab::tinylm::RuleAccuracy) {
    println!(
        "rule accuracy on {stories} held-out stories ({} day-after, {} copy, {} counting positions)",
        a.n[0], a.n[1], a.n[2]
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>10}",
        "", "day after", "copy", "counting", "CE (nats)"
    );
}

/// The tiny-lm rule accuracies of a trained run (target, CI-masked).
pub fn rules_table(r: &spdlab::tinylm::DecompositionRules) {
    rule_header(r.stories, &r.target);
    rule_line("target", &r.target);
    rule_line("CI-masked decomposition", &r.ci_masked);
}

/// `spdlab rules`: the tiny-lm rule accuracies.
pub fn rules_report(r: &spdlab::tinylm::RulesReport) {
    let line = rule_line;
    rule_header(r.stories, &r.target);
    line("target", &r.target);
    line("CI-masked decomposition", &r.ci_masked);
    if let Some((labels, a)) = &r.ablated {
        line("CI-masked, selection ablated", a);
        println!("  (ablated: {})", labels.join(", "));
    }
    if let Some(u) = &r.unlearning {
        println!(
            "unlearning {}: {} clusters active where it applies, each ablated alone (most specific first):",
            u.rule,
            u.candidates.len()
        );
        for c in u.candidates.iter().take(10) {
            line(
                &format!("  cluster {} ({} sub.)", c.id, c.members.len()),
                &c.accuracy,
            );
        }
        println!("ablated together:");
        for (id, a) in &u.chosen {
            line(&format!("  + cluster {id}"), a);
        }
        line("result", &u.accuracy);
        println!("  (ablated: {})", u.ablated.join(", "));
    }
}

/// `spdlab harvest`: per module, the most frequently firing subcomponents with their tokens.
pub fn harvest(h: &spdlab::harvest::Harvest, tok: Option<&spdlab::text::TextTokenizer>) {
    let name = |t: u32| tok.map_or_else(|| format!("<{t}>"), |k| k.token_text(t));
    println!(
        "harvest of {} tokens ({} windows of {}; CI > {} counts as firing) from {}",
        h.positions, h.windows, h.seq_len, h.threshold, h.source
    );
    for m in &h.modules {
        let alive = m.components.iter().filter(|c| c.firing > 0).count();
        println!(
            "{}: {alive}/{} subcomponents fire",
            m.name,
            m.components.len()
        );
        let mut order: Vec<usize> = (0..m.components.len()).collect();
        order.sort_by(|&a, &b| m.components[b].firing.cmp(&m.components[a].firing));
        for &c in order.iter().take(5) {
            let ch = &m.components[c];
            if ch.firing == 0 {
                break;
            }
            let toks: Vec<String> = ch
                .tokens
                .iter()
                .take(5)
                .map(|&(t, n)| format!("{:?} {n}", name(t)))
                .collect();
            println!(
                "  {c:>5}  fires {:>6.2}%  on {}",
                100.0 * ch.firing as f64 / h.positions.max(1) as f64,
                toks.join(", ")
            );
        }
    }
}
