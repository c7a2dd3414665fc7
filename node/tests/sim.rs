//! The HA logic under the deterministic simulator: thousands of seeds of
//! crashes, pauses, partitions, delays, witness outages and wrongly applied
//! checkpoints, with planned operations among them (changes of backup,
//! migrations with a fault at a step of their handover, switchovers,
//! planned stops), each checked for one history and recovery. A failing
//! seed is printed and replays exactly with `CASTOR_SIM_SEED=N`
//! (`CASTOR_SIM_TRACE=1` adds the messages to its trace;
//! `CASTOR_SIM_SEEDS=N` runs N seeds). See docs/simulator.md.

use castor_node::sim::{self, Bug, Report, Settings};

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

#[derive(Default)]
struct Sum {
    runs: u32,
    takeovers: u32,
    fences: u32,
    faults: u32,
    goodbyes: u32,
    mismatches: u32,
    retargets: u32,
    migrations: u32,
    stays: u32,
    taken_back: u32,
    stopped: u32,
    lost: u32,
    frames: usize,
}

impl Sum {
    fn add(&mut self, r: &Report) {
        self.runs += 1;
        self.takeovers += r.takeovers;
        self.fences += r.fences;
        self.faults += r.faults;
        self.goodbyes += r.goodbyes;
        self.mismatches += r.mismatches;
        self.retargets += r.retargets;
        self.migrations += r.migrations;
        self.stays += r.stays;
        self.taken_back += r.taken_back;
        self.stopped += u32::from(r.stopped);
        self.lost += u32::from(r.lost.is_some());
        self.frames += r.frames;
    }
}

impl std::fmt::Display for Sum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} runs: {} faults, {} takeovers, {} fences, {} goodbyes, {} verify mismatches, \
             {} changes of backup, {} migrations ({} stayed, {} taken back after Go), {} planned \
             stops, {} VMs lost as documented, {} frames released: no violation",
            self.runs,
            self.faults,
            self.takeovers,
            self.fences,
            self.goodbyes,
            self.mismatches,
            self.retargets,
            self.migrations,
            self.stays,
            self.taken_back,
            self.stopped,
            self.lost,
            self.frames
        )
    }
}

#[test]
fn one_history_and_recovery_under_every_fault_with_a_witness() {
    let mut sum = Sum::default();
    for seed in seeds() {
        let s = Settings {
            trace_messages: std::env::var_os("CASTOR_SIM_TRACE").is_some(),
            ..Settings::new(seed)
        };
        match sim::run(s) {
            Ok(r) => sum.add(&r),
            Err(v) => panic!("{v}"),
        }
    }
    println!("{sum}");
    // The faults and operations did make every modelled part act.
    if sum.runs >= 1000 {
        assert!(sum.takeovers > 0 && sum.fences > 0, "{sum}");
        assert!(sum.goodbyes > 0 && sum.mismatches > 0, "{sum}");
        assert!(
            sum.retargets > 0 && sum.migrations > 0 && sum.stays > 0 && sum.taken_back > 0,
            "{sum}"
        );
        assert!(sum.stopped > 0 && sum.frames > 0, "{sum}");
        // Liveness is checked in almost every run.
        assert!(sum.lost * 10 < sum.runs, "{sum}");
    }
}

#[test]
fn at_protocol_6_output_held_from_the_resync_keeps_one_history() {
    // A pair at protocol 6 (one node not upgraded): no checkpoint says
    // whether it may be resumed from, so output is held from the resync's
    // pause on and every checkpoint may be.
    let mut sum = Sum::default();
    for seed in seeds().take(300) {
        let s = Settings {
            releases_during_resync: false,
            ..Settings::new(seed)
        };
        match sim::run(s) {
            Ok(r) => sum.add(&r),
            Err(v) => panic!("{v}"),
        }
    }
    println!("{sum}");
}

#[test]
fn without_a_witness_crashes_and_operations_alone_are_handled() {
    let mut sum = Sum::default();
    for seed in seeds().take(500) {
        let s = Settings {
            witness: false,
            all_faults: false,
            ..Settings::new(seed)
        };
        match sim::run(s) {
            Ok(r) => sum.add(&r),
            Err(v) => panic!("{v}"),
        }
    }
    println!("{sum}");
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

/// An operator's switchover asked at any moment, even right after the
/// backup lost a claim. This simulator found the bug: after `Claim::Lost`
/// the backup adopted the winner's token but kept its replica of the older
/// session, so a takeover asked then claimed from the winner's token, won,
/// and resumed from a replica behind what the primary had released while
/// it carried on alone. A lost claim now drops the replica.
#[test]
fn a_switchover_asked_at_any_time_keeps_one_history() {
    // Before a lost claim dropped the backup's replica, seed 78 split the
    // history: a switchover asked after the claim was lost resumed from a
    // replica behind what the primary had released alone.
    for seed in 0..300 {
        let r = sim::run(Settings {
            switchover_any_time: true,
            ..Settings::new(seed)
        });
        if let Err(v) = r.as_ref().map_err(|v| v.clone()) {
            assert!(!v.safety, "{v}");
        }
    }
}

/// The handover under a witness that loses a third of its answers. This
/// simulator found the bug: the source's claim for the destination swapped
/// the owner at the witness but its answer was lost, the next attempts
/// found the witness silent until the 2 s deadline, and the handover
/// stayed (`Handover::Stay`): the guest ran on at the source while the
/// witness named the destination, the source was fenced at its next claim
/// and the destination never had `Go` — nobody ran the VM, though nothing
/// crashed (seed 1654 with 2 s, of 0–1653 none). The handover now asks
/// for up to 10 s, longer than the simulator's ordinary witness outages
/// (0.1–3 s). The seeds around 1654 are run, and the first hundred.
#[test]
fn a_handover_whose_answers_are_lost_never_loses_the_vm() {
    for seed in (0..100).chain(1600..1700) {
        let r = sim::run(Settings {
            lost_answers: 333,
            ..Settings::new(seed)
        });
        if let Err(v) = r {
            assert!(!v.safety && !v.trace.contains("no Go"), "{v}");
        }
    }
}

/// The seeds CI runs for each planted bug.
const BUG_SEEDS: u64 = 300;

#[test]
fn planted_bugs_are_found() {
    // `CASTOR_SIM_COUNT=1`: every seed is run, to count those that find
    // each bug (CI stops at the first).
    let count = std::env::var_os("CASTOR_SIM_COUNT").is_some();
    for bug in Bug::ALL {
        // A migration meets a pause of its destination on `Go` in about one
        // run in a hundred: that bug gets more seeds.
        let seeds = if bug == Bug::AdmitByRead {
            2000
        } else {
            BUG_SEEDS
        };
        let found: Vec<sim::Violation> = (0..seeds)
            .filter_map(|seed| {
                sim::run(Settings {
                    bug: Some(bug),
                    ..Settings::new(seed)
                })
                .err()
                .filter(|v| v.safety)
            })
            .take(if count { usize::MAX } else { 1 })
            .collect();
        let v = found
            .first()
            .unwrap_or_else(|| panic!("{bug:?} not found in {seeds} seeds"));
        if count {
            print!("found in {} of {seeds} seeds, ", found.len());
        }
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
