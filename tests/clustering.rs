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
