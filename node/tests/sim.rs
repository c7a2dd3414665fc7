//! The HA logic under the deterministic simulator: thousands of seeds of
//! crashes, pauses, partitions, delays and witness outages, each checked
//! for one history and recovery. A failing seed is printed and replays
//! exactly with `CASTOR_SIM_SEED=N` (`CASTOR_SIM_TRACE=1` adds the
//! messages to its trace; `CASTOR_SIM_SEEDS=N` runs N seeds).

use castor_node::sim::{self, Bug, Settings};

fn seeds() -> std::ops::Range<u64> {
    if let Some(seed) = std::env::var("CASTOR_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return seed..seed + 1;
    }
    let n = std::env::var("CASTOR_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    0..n
}

#[test]
fn one_history_and_recovery_under_every_fault_with_a_witness() {
    let (mut takeovers, mut fences, mut faults) = (0, 0, 0);
    for seed in seeds() {
        let s = Settings {
            trace_messages: std::env::var_os("CASTOR_SIM_TRACE").is_some(),
            ..Settings::new(seed)
        };
        match sim::run(s) {
            Ok(r) => {
                takeovers += r.takeovers;
                fences += r.fences;
                faults += r.faults;
            }
            Err(v) => panic!("{v}"),
        }
    }
    println!("{faults} faults, {takeovers} takeovers, {fences} fences: no violation");
    // The faults did make the nodes change roles.
    assert!(takeovers > 0 && fences > 0);
}

#[test]
fn without_a_witness_crashes_alone_are_handled() {
    for seed in seeds().take(500) {
        let s = Settings {
            witness: false,
            all_faults: false,
            ..Settings::new(seed)
        };
        if let Err(v) = sim::run(s) {
            panic!("{v}");
        }
    }
}

#[test]
fn without_a_witness_a_pause_or_partition_splits_the_history() {
    // What `--witness none` says at start-up, shown.
    let found = (0..500).find_map(|seed| {
        sim::run(Settings {
            witness: false,
            ..Settings::new(seed)
        })
        .err()
        .filter(|v| v.safety)
    });
    let v = found.expect("the simulator finds a split without a witness");
    assert!(
        v.what.contains("two histories") || v.what.contains("world saw"),
        "{v}"
    );
}

fn finds(bug: Bug) -> sim::Violation {
    (0..300)
        .find_map(|seed| {
            sim::run(Settings {
                bug: Some(bug),
                ..Settings::new(seed)
            })
            .err()
            .filter(|v| v.safety)
        })
        .unwrap_or_else(|| panic!("{bug:?} not found in 300 seeds"))
}

#[test]
fn planted_bugs_are_found() {
    for bug in [
        Bug::ReleaseBeforeAck,
        Bug::TakeoverWithoutWitness,
        Bug::NoFreeze,
    ] {
        let v = finds(bug);
        println!("{bug:?}: found at seed {}: {}", v.seed, v.what);
        // The same seed replays the same violation.
        let again = sim::run(Settings {
            bug: Some(bug),
            ..Settings::new(v.seed)
        })
        .unwrap_err();
        assert_eq!((again.at, &again.what), (v.at, &v.what));
    }
}
