use castor_node::sim::{self, Settings};
#[test]
fn explore() {
    let mut reasons = std::collections::BTreeMap::new();
    for w in [true, false] {
        for seed in 0..300 {
            let s = Settings { witness: w, all_faults: w, ..Settings::new(seed) };
            if let Ok(r) = sim::run(s) {
                if let Some(l) = r.lost { *reasons.entry((w, l)).or_insert(0) += 1; }
            }
        }
    }
    for (k, v) in reasons { println!("{v} {k:?}"); }
}
