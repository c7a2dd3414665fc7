//! `--disk` on the command line: refused with the reason before a VM
//! exists, one castor per image, and a snapshot of a guest with a disk
//! restores only with its disk. (The kvdisk log across boots and a
//! snapshot/restore with a client: `vmm/tests/disk.rs`.)

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{castor, outcome, run};

fn fails_with(args: &[&str], expect: &str) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "castor {args:?} succeeded");
    assert!(
        err.contains(expect),
        "castor {args:?}: expected '{expect}' in:\n{err}"
    );
}

fn image(dir: &std::path::Path, name: &str, bytes: u64) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn bad_disks_are_refused_with_the_reason() {
    let t = tempfile::tempdir().unwrap();
    fails_with(
        &["run", "--workload", "kvdisk", "--duration", "1s"],
        "the kvdisk workload needs a disk: add --disk FILE",
    );
    let missing = t.path().join("nope.img");
    fails_with(
        &[
            "run",
            "--disk",
            missing.to_str().unwrap(),
            "--duration",
            "1s",
        ],
        "nope.img: no such file",
    );
    let odd = image(t.path(), "odd.img", 1000);
    fails_with(
        &["run", "--disk", &odd, "--duration", "1s"],
        "not a positive multiple of 4096",
    );
    let small = image(t.path(), "small.img", 64 << 10);
    fails_with(
        &[
            "run",
            "--workload",
            "kvdisk",
            "--disk",
            &small,
            "--duration",
            "1s",
        ],
        "too small: 65536 bytes, need 1048576 bytes",
    );
}

#[test]
fn one_castor_per_disk_and_a_snapshot_restores_with_its_disk() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path(), "disk.img", 4 << 20);
    let snap = t.path().join("snap");
    let first = castor()
        .args([
            "run",
            "--mem",
            "128M",
            "--vcpus",
            "1",
            "--workload",
            "kvdisk",
        ])
        .args(["--disk", &img, "--duration", "3s", "--snapshot-at", "1s"])
        .arg("--snapshot-dir")
        .arg(&snap)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    fails_with(
        &["run", "--disk", &img, "--duration", "1s"],
        "already opened by another castor",
    );
    let o = first.wait_with_output().unwrap();
    let (ok, out) = outcome(&o);
    assert!(ok, "{out}");
    assert!(out.contains("kvdisk replayed 0 records"), "{out}");
    assert!(out.contains("disk counters"), "{out}");
    fails_with(
        &["restore", snap.to_str().unwrap(), "--duration", "1s"],
        "has a disk: add --disk FILE",
    );
    let other = image(t.path(), "other.img", 8 << 20);
    fails_with(
        &[
            "restore",
            snap.to_str().unwrap(),
            "--disk",
            &other,
            "--duration",
            "1s",
        ],
        "the disk",
    );
    let o = run(&[
        "restore",
        snap.to_str().unwrap(),
        "--disk",
        &img,
        "--duration",
        "1s",
    ]);
    let (ok, out) = outcome(&o);
    assert!(ok, "{out}");
    assert!(out.contains("VM restored"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(" log=") && l.contains(" flushes=")),
        "the restored guest's progress lines carry the disk counters: {out}"
    );
}
