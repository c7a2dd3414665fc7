//! `--epoch-ms auto` on a real pair: the primary chooses its epochs' length
//! from the working-set model within the bounds given, says so in
//! `castor status`, and the output commit holds across a failover.

mod common;

use std::time::{Duration, Instant};

use common::{castor_bin, outcome, run};
use lab::console::continuity;
use lab::pair::{self, kill_and_follow, read_console, wait_status, Pair};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn auto_lengthens_the_epochs_of_a_writer_over_its_link_budget_and_output_commit_holds() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    castor_bin();
    let pair = Pair::in_dir(tmp.path(), ["a", "b"]).unwrap();
    // Whole pages (remus) of a writer of 2,000 random 4 KiB blocks a second:
    // ~50 pages, 200 KiB, an epoch of 25 ms: 8 MB/s, over a budget of
    // 20 Mbit/s (2.5 MB/s) at any length up to 80 ms. The model must
    // lengthen the epochs to the longest allowed, and say why.
    let both = strings(&[
        "--mode",
        "remus",
        "--epoch-ms",
        "auto",
        "--epoch-min-ms",
        "5",
        "--epoch-max-ms",
        "80",
        "--link-budget",
        "20mbit",
    ]);
    let guest = strings(&[
        "--mem",
        "128M",
        "--vcpus",
        "1",
        "--workload",
        "verify,rate=2000,mib=4,interval_ms=20",
    ]);
    let (backup, mut primary) = pair.start(&both, &guest, ["b.log", "a.log"]).unwrap();
    let s = wait_status(
        &primary,
        "protection",
        Duration::from_secs(30),
        pair::protected,
    )
    .unwrap();
    let auto = s.figures().epoch_auto.expect("an auto epoch in the status");
    assert_eq!((auto.min_ms, auto.max_ms), (5, 80), "{s:?}");
    assert_eq!(auto.link_budget, 2.5e6, "{s:?}");

    // The length auto picks, seen every 100 ms for 4 s: within the bounds.
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        if let Some(s) = primary.status() {
            seen.push(s.figures().epoch_ms);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen.len() >= 20, "{seen:?}");
    assert!(seen.iter().all(|e| (5..=80).contains(e)), "{seen:?}");
    let s = primary.status().unwrap();
    assert!(s.protected(), "{s:?}");
    let f = s.figures();
    let auto = f.epoch_auto.clone().unwrap();
    // Moved away from 25 ms, to the longest: the link's budget asks for more.
    assert_eq!(f.epoch_ms, 80, "{f:?}");
    assert!(
        auto.chosen_min_ms >= 5.0 && auto.chosen_max_ms <= 80.0,
        "{auto:?}"
    );
    assert!(auto.chosen_p50_ms >= 60.0, "{auto:?}");
    assert_eq!((auto.bound.as_str(), auto.capped), ("link budget", true));
    // Epochs all about as long: now and then one probes half the length.
    assert!(auto.probes >= 1, "{auto:?}");
    // The epochs really are that long (pause start to pause start).
    assert!(f.epoch_len_p50_ms >= 60.0, "{f:?}");
    // What a person reads.
    let (ok, out) = outcome(&run(&[
        "status",
        "--control",
        &primary.control.display().to_string(),
    ]));
    assert!(
        ok && out.contains("(remus, auto: 80 ms)")
            && out.contains("auto       80 ms now (link budget, capped at the longest)"),
        "{out}"
    );
    let log = std::fs::read_to_string(&primary.log).unwrap();
    assert!(
        log.contains(
            "auto epoch: the link budget decides the length, capped at the longest allowed"
        ),
        "{log}"
    );

    // Output commit: every byte a client saw is in the checkpoint the
    // backup resumes from, and the stream continues without a gap.
    let mut stream = Vec::new();
    read_console(
        primary.console,
        0,
        &mut stream,
        Instant::now() + Duration::from_millis(500),
        u64::MAX,
    )
    .unwrap();
    let released = primary.status().unwrap().console_released;
    assert!(released as usize >= stream.len(), "{released}");
    let took = kill_and_follow(
        &mut primary,
        &backup,
        &mut stream,
        Duration::from_millis(1500),
    )
    .unwrap();
    assert!(took.first.is_some(), "the survivor produced output");
    let resumed = backup.status().unwrap().resumed_at.unwrap();
    assert!(
        resumed >= released,
        "the survivor resumed at {resumed}, before the {released} bytes already released"
    );
    let c = continuity(&stream);
    assert!(
        c.ok() && c.lines > 20,
        "{} lines, {:?}",
        c.lines,
        c.problems
    );
    let text = String::from_utf8_lossy(&stream);
    assert!(!text.contains("CORRUPT") && text.contains("errors=0"));
    eprintln!("took {:?}", t0.elapsed());
}
