//! `castor bench` end to end: the quick matrix as a smoke test (real pair,
//! real KVM), and the emulated link doing what it says.

use std::path::Path;

mod common;

fn bench(args: &[&str], out: &Path) -> (bool, String) {
    let o = common::castor()
        .arg("bench")
        .args(["--out", out.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    common::outcome(&o)
}

fn points(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("points.json")).expect("points.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("points.json is JSON");
    v["points"].as_array().expect("points").clone()
}

fn find<'a>(ps: &'a [serde_json::Value], w: &str, c: &str) -> &'a serde_json::Value {
    ps.iter()
        .find(|p| p["workload"] == w && p["config"] == c)
        .unwrap_or_else(|| panic!("no point {w}/{c}"))
}

fn f(p: &serde_json::Value, k: &str) -> f64 {
    p[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {p}"))
}

#[test]
fn quick_bench_measures_every_point_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let (ok, log) = bench(&["--quick"], &out);
    assert!(ok, "{log}");
    let ps = points(&out);
    // 2 workloads x (unprotected + tracking + 3 modes).
    assert_eq!(ps.len(), 10, "{log}");
    for p in &ps {
        assert!(p["error"].is_null(), "{p}");
        assert!(f(p, "ops_per_s") > 0.0, "{p}");
    }
    // The paced workload runs at its rate unprotected.
    let un = f(find(&ps, "sparse-50k", "unprotected"), "ops_per_s");
    assert!((45_000.0..55_000.0).contains(&un), "{un}");
    for mode in ["remus", "xbzrle", "fgbi"] {
        for w in ["sparse-50k", "pages-1k"] {
            let p = find(&ps, w, mode);
            // remus is link-bound under sparse (its epochs stretch); the
            // others keep up with 25 ms epochs.
            let min = if mode == "remus" { 1.0 } else { 20.0 };
            assert!(f(p, "epochs") >= min, "{p}");
            assert!(f(p, "pause_p50_us") > 0.0, "{p}");
            assert!(f(p, "pause_p99_us") >= f(p, "pause_p50_us"), "{p}");
            assert!(f(p, "bytes_per_epoch") > 0.0, "{p}");
            assert!(f(p, "ack_p50_us") > 0.0, "{p}");
            assert!(f(p, "release_p50_us") >= f(p, "ack_p50_us") * 0.5, "{p}");
        }
    }
    // fgbi sends far fewer bytes per dirty page than remus under sparse.
    let per_page = |p: &serde_json::Value| f(p, "bytes_per_epoch") / f(p, "dirty_pages");
    let remus = per_page(find(&ps, "sparse-50k", "remus"));
    let fgbi = per_page(find(&ps, "sparse-50k", "fgbi"));
    assert!(remus > 4096.0 && fgbi * 15.0 < remus, "{fgbi} vs {remus}");

    let csv = std::fs::read_to_string(out.join("points.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11, "{csv}");
    let fo = std::fs::read_to_string(out.join("failover.csv")).unwrap();
    let times: Vec<f64> = fo
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    // 3 fgbi drills with the etcd witness, 3 without one.
    assert_eq!(times.len(), 6, "{fo}");
    assert_eq!(fo.matches("fgbi (no witness),").count(), 3, "{fo}");
    assert!(times.iter().all(|&t| t > 0.0 && t < 1000.0), "{fo}");
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for s in [
        "## Checkpoints",
        "## Guest throughput",
        "## Failover",
        "## Targets",
    ] {
        assert!(md.contains(s), "{md}");
    }
    for png in [
        "pause_vs_dirty.png",
        "bytes_per_epoch.png",
        "throughput.png",
        "failover.png",
    ] {
        let b = std::fs::read(out.join(png)).unwrap();
        assert!(b.starts_with(b"\x89PNG") && b.len() > 10_000, "{png}");
    }
    // The report re-renders from the JSON alone, to the same table.
    let again = dir.path().join("again");
    let (ok, log) = bench(
        &["--from-json", out.join("points.json").to_str().unwrap()],
        &again,
    );
    assert!(ok, "{log}");
    assert_eq!(
        std::fs::read_to_string(again.join("points.csv")).unwrap(),
        csv
    );
    assert!(again.join("failover.png").exists());
}

#[test]
fn the_emulated_link_limits_the_rate_and_delays_acks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    // pages at 1000/s: ~26 fresh random pages (~105 KB) per 25 ms epoch; a
    // 40 Mbit/s (5 MB/s) link needs ~21 ms to carry one, plus 2 x 5 ms delay.
    let (ok, log) = bench(
        &[
            "--workloads",
            "pages-1k",
            "--modes",
            "fgbi",
            "--epochs",
            "25",
            "--link-rate",
            "40mbit",
            "--link-delay",
            "5ms",
            "--failovers",
            "0",
            "--warmup",
            "1s",
            "--measure",
            "3s",
            "--no-plots",
        ],
        &out,
    );
    assert!(ok, "{log}");
    assert!(log.contains("40 Mbit/s, 5000 us one-way delay"), "{log}");
    let ps = points(&out);
    let p = find(&ps, "pages-1k", "fgbi");
    // On plain loopback an ack takes ~5 ms; here at least the round trip's
    // delay plus the paced part of the transmission at 5 MB/s: the token
    // bucket lets one 64 KiB piece through at once, the rest is paced
    // (queueing behind the previous epoch only adds to it).
    let transmit_us = f(p, "bytes_per_epoch") / 5e6 * 1e6;
    let paced_us = (f(p, "bytes_per_epoch") - 65536.0).max(0.0) / 5e6 * 1e6;
    assert!(transmit_us > 10_000.0, "{p}");
    assert!(
        f(p, "ack_p50_us") >= 10_000.0 + 0.9 * paced_us,
        "ack p50 {} us, paced transmission {paced_us} us: {p}",
        f(p, "ack_p50_us")
    );
    // The link keeps up: checkpoints continue at about the epoch rate.
    assert!(f(p, "epochs") >= 40.0, "{p}");
}

#[test]
fn bad_bench_flags_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, log) = bench(&["--workloads", "nope"], dir.path());
    assert!(!ok);
    assert!(log.contains("unknown workload 'nope'"), "{log}");
    let (ok, log) = bench(&["--link-rate", "3furlongs"], dir.path());
    assert!(!ok);
    assert!(log.contains("unknown unit"), "{log}");
}
