//! Clustering subcomponents into mechanisms.

use candle_core::Device;
use spdlab::cluster::{ClusterOptions, cluster, summarize};
use spdlab::io::spdlab_file;

#[test]
fn tms_5_2_clusters_pair_each_feature_across_layers() {
    let (mut tr, _) =
        spdlab_file::from_bytes(spdlab::assets::default_decomposition(), &Device::Cpu).unwrap();
    let opts = ClusterOptions::default();
    let h = cluster(&mut tr, &opts).unwrap();
    let res = summarize(&h, &opts, h.best_k());
    assert_eq!(res.k, 5, "{:?}", res.clusters);
    let mut seen = std::collections::BTreeSet::new();
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
    let (mut tr2, _) =
        spdlab_file::from_bytes(spdlab::assets::default_decomposition(), &Device::Cpu).unwrap();
    let h2 = cluster(&mut tr2, &opts).unwrap();
    assert_eq!(h.group_idxs, h2.group_idxs);
    // The description length has its minimum at the stopping point.
    let dl = &res.description_length;
    let min = dl.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
    assert_eq!(dl.iter().find(|x| x.1 == min).unwrap().0, 5);
}

fn fixture(name: &str) -> spdlab::spd::trainer::Trainer {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    spdlab_file::load(std::path::Path::new(&path), &Device::Cpu)
        .unwrap()
        .0
}

/// tms-5-2-id (full reference-config run, optimizer state stripped): the 5 feature clusters
/// (linear1:c with linear2:c) plus one cluster holding the identity's 2 live subcomponents.
/// Reduced budget: 2048 samples instead of 4096.
#[test]
fn tms_5_2_id_adds_one_rank_2_identity_cluster() {
    let mut tr = fixture("tms-5-2-id.spdlab");
    let opts = ClusterOptions {
        n_samples: 2048,
        ..ClusterOptions::default()
    };
    let h = cluster(&mut tr, &opts).unwrap();
    let res = summarize(&h, &opts, h.best_k());
    assert_eq!(res.k, 6, "{:#?}", res.clusters);
    let mut features = 0;
    let mut identity = 0;
    for c in &res.clusters {
        assert_eq!(c.rank, 2, "{c:?}");
        if c.layers == ["hidden_layers.0"] {
            identity += 1;
        } else {
            assert_eq!(c.layers, ["linear1", "linear2"], "{c:?}");
            let idx: Vec<&str> = c
                .members
                .iter()
                .map(|m| m.rsplit_once(':').unwrap().1)
                .collect();
            assert_eq!(idx[0], idx[1], "{c:?}");
            features += 1;
        }
    }
    assert_eq!((features, identity), (5, 1));
    // With the reference's α = 1 the MDL minimum merges pairs of features (k = 4).
    let opts1 = ClusterOptions {
        alpha: 1.0,
        ..opts.clone()
    };
    let h1 = cluster(&mut fixture("tms-5-2-id.spdlab"), &opts1).unwrap();
    assert!(h1.best_k() < 6, "{}", h1.best_k());
}

/// resid-mlp-1 (full run): every mlp_in subcomponent is in a cluster with no other mlp_in
/// subcomponent, and the live mlp_out subcomponents (firing on > 5% of inputs; about 20%
/// each) form one cluster of rank ≈ 50. The others fire on < 1% of inputs and stay apart.
/// Reduced budget: 2048 samples.
#[test]
fn resid_mlp_1_mlp_out_is_one_mechanism_and_mlp_in_stays_apart() {
    let mut tr = fixture("resid-mlp-1.spdlab");
    let opts = ClusterOptions {
        n_samples: 2048,
        ..ClusterOptions::default()
    };
    let h = cluster(&mut tr, &opts).unwrap();
    let res = summarize(&h, &opts, h.best_k());
    let is_in = |m: &String| m.starts_with("layers.0.mlp_in");
    for c in &res.clusters {
        assert!(c.members.iter().filter(|m| is_in(m)).count() <= 1, "{c:?}");
    }
    let live_out: Vec<_> = res
        .clusters
        .iter()
        .filter(|c| c.members.iter().all(|m| !is_in(m)) && c.firing_fraction > 0.05)
        .collect();
    assert_eq!(live_out.len(), 1, "{live_out:#?}");
    let big = live_out[0];
    assert!((45..=55).contains(&big.rank), "rank {}", big.rank);
    for c in &res.clusters {
        if c.id != big.id && c.members.iter().all(|m| !is_in(m)) {
            assert!(c.firing_fraction < 0.01, "{c:?}");
        }
    }
    // mlp_in: all 100 subcomponents alive, each its own cluster.
    let n_in = res
        .clusters
        .iter()
        .filter(|c| c.members.iter().any(is_in))
        .count();
    assert_eq!(n_in, 100);
}
