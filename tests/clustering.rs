//! Clustering subcomponents into mechanisms.

//!
//! Fixtures (`tests/fixtures/clus-*.spdlab`) are full decompositions with the optimizer state
//! and loss history stripped (weights, CI functions, config and RNG state unchanged):
//! `tms-5-2-id` = tms-5-2 with a decomposed hidden identity layer, `resid-mlp-1` =
//! resid-mlp-1 (100 features, mlp_in / mlp_out with C = 100 each, d_mlp = 50).

use std::collections::BTreeSet;

use candle_core::Device;
use spdlab::cluster::{ClusterOptions, ClusteringResult, activations, cluster, summarize};
use spdlab::io::spdlab_file;
use spdlab::spd::trainer::Trainer;

fn load_fixture(name: &str) -> Trainer {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    spdlab_file::load(&path, &Device::Cpu).unwrap().0
}

/// The clusters at the MDL minimum.
fn run(tr: &Trainer, opts: &ClusterOptions) -> ClusteringResult {
    let h = cluster(tr, opts).unwrap();
    summarize(&h, opts, h.best_k())
}

fn index_of(label: &str) -> &str {
    label.rsplit_once(':').unwrap().1
}

/// `c` is `{linear1:i, linear2:i}` for some feature component i.
fn is_feature_pair(members: &[String]) -> bool {
    members.len() == 2
        && members[0].starts_with("linear1:")
        && members[1].starts_with("linear2:")
        && index_of(&members[0]) == index_of(&members[1])
}

#[test]
fn tms_5_2_clusters_pair_each_feature_across_layers() {
    let (tr, _) =
        spdlab_file::from_bytes(spdlab::assets::default_decomposition(), &Device::Cpu).unwrap();
    let opts = ClusterOptions::default();
    let h = cluster(&tr, &opts).unwrap();
    let res = summarize(&h, &opts, h.best_k());
    assert_eq!(res.k, 5, "{:?}", res.clusters);
    let mut seen = BTreeSet::new();
    for c in &res.clusters {
        assert_eq!(c.members.len(), 2, "{c:?}");
        assert_eq!(c.rank, 2);
        let idx: Vec<&str> = c
            .members
            .iter()
            .map(|m| m.rsplit_once(':').unwrap().1)
            .collect();
        assert!(
            c.members[0].starts_with("linear1:") && c.members[1].starts_with("linear2:"),
            "{c:?}"
        );
        assert_eq!(idx[0], idx[1], "linear1:c must pair with linear2:c: {c:?}");
        assert!(c.firing_fraction > 0.02 && c.firing_fraction < 0.1, "{c:?}");
        seen.insert(idx[0].to_string());
    }
    assert_eq!(seen.len(), 5);
    // Deterministic for a fixed seed.
    let (tr2, _) =
        spdlab_file::from_bytes(spdlab::assets::default_decomposition(), &Device::Cpu).unwrap();
    let h2 = cluster(&tr2, &opts).unwrap();
    assert_eq!(h.group_idxs, h2.group_idxs);
    // The description length has its minimum at the stopping point.
    let dl = &res.description_length;
    let min = dl.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
    assert_eq!(dl.iter().find(|x| x.1 == min).unwrap().0, 5);
}

#[test]
fn tms_5_2_finds_the_same_pairs_for_other_seeds_and_fewer_samples() {
    let (tr, _) =
        spdlab_file::from_bytes(spdlab::assets::default_decomposition(), &Device::Cpu).unwrap();
    for seed in 1..4 {
        let opts = ClusterOptions {
            seed,
            n_samples: 1024,
            ..Default::default()
        };
        let res = run(&tr, &opts);
        assert_eq!(res.k, 5, "seed {seed}: {:?}", res.clusters);
        assert!(res.clusters.iter().all(|c| is_feature_pair(&c.members)));
    }
}

#[test]
fn tms_5_2_with_identity_keeps_features_apart_and_the_identity_whole() {
    let tr = load_fixture("tms-5-2-id.spdlab");
    for seed in 0..3 {
        let opts = ClusterOptions {
            seed,
            n_samples: 2048,
            ..Default::default()
        };
        let res = run(&tr, &opts);
        assert_eq!(res.k, 6, "seed {seed}: {:?}", res.clusters);
        let pairs: BTreeSet<&str> = res
            .clusters
            .iter()
            .filter(|c| is_feature_pair(&c.members))
            .map(|c| index_of(&c.members[0]))
            .collect();
        assert_eq!(pairs.len(), 5, "seed {seed}: {:?}", res.clusters);
        let ident: Vec<_> = res
            .clusters
            .iter()
            .filter(|c| !is_feature_pair(&c.members))
            .collect();
        assert_eq!(ident.len(), 1);
        assert_eq!(ident[0].rank, 2, "{:?}", ident[0]);
        assert_eq!(ident[0].layers, vec!["hidden_layers.0".to_string()]);
        // The identity is needed whenever any feature is active.
        assert!(ident[0].firing_fraction > 0.12, "{:?}", ident[0]);
        if seed == 0 {
            // Deterministic for a fixed seed.
            assert_eq!(run(&tr, &opts).group_idxs, res.group_idxs);
        }
    }
    // The reference's α = 1 merges features whose output components interfere (kept as a
    // record of why the default differs).
    let res = run(
        &tr,
        &ClusterOptions {
            alpha: 1.0,
            n_samples: 2048,
            ..Default::default()
        },
    );
    assert!(res.k < 6, "{:?}", res.clusters);
}

#[test]
fn resid_mlp_1_keeps_mlp_in_apart_and_mlp_out_together() {
    let tr = load_fixture("resid-mlp-1.spdlab");
    let opts = ClusterOptions {
        n_samples: 1024,
        ..Default::default()
    };
    let res = run(&tr, &opts);
    // Live mlp_out subcomponents: causally important (CI > 0.5) somewhere on the batch.
    let (acts, labels) = activations(&tr, opts.n_samples, opts.ci, opts.seed).unwrap();
    let c = labels.len();
    let live_out: BTreeSet<&String> = (0..c)
        .filter(|&j| labels[j].contains("mlp_out"))
        .filter(|&j| (0..opts.n_samples).any(|s| acts[s * c + j] > 0.5))
        .map(|j| &labels[j])
        .collect();
    assert!((45..=55).contains(&live_out.len()), "{}", live_out.len());
    let n_in = |m: &[String]| m.iter().filter(|l| l.contains("mlp_in")).count();
    // every mlp_in subcomponent is alive, and no cluster holds two of them
    assert_eq!(
        res.clusters.iter().map(|c| n_in(&c.members)).sum::<usize>(),
        100
    );
    for cl in &res.clusters {
        assert!(n_in(&cl.members) <= 1, "{cl:?}");
    }
    // all live mlp_out subcomponents are in one cluster, made of mlp_out only
    let holder: BTreeSet<usize> = live_out.iter().map(|l| res.assignment[*l]).collect();
    assert_eq!(holder.len(), 1, "live mlp_out split over {holder:?}");
    let big = &res.clusters[*holder.iter().next().unwrap()];
    assert_eq!(n_in(&big.members), 0, "{big:?}");
    assert!((45..=55).contains(&big.rank), "{big:?}");
}
