//! Snapshot at a random moment, SIGKILL, restore in a new process: the guest
//! continues with exactly the next counter value on every vCPU.

mod common;

use std::fs::File;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use rand::Rng;

fn snapshot_kill_restore(workload: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    let out1 = tmp.path().join("out1");
    let at_ms = rand::rng().random_range(400..1500);
    let mut child = castor()
        .args([
            "run",
            "--mem",
            "128M",
            "--vcpus",
            "2",
            "--workload",
            workload,
        ])
        .args(["--snapshot-at", &format!("{at_ms}ms"), "--snapshot-dir"])
        .arg(&snap)
        .stdout(File::create(&out1).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let written = wait_for(&snap.join("state.bin"), 60);
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(written, "no snapshot within 60 s");

    let state = vmm::snapshot::read_state(&snap).unwrap();
    assert_eq!(state.vcpus.len(), 2);
    let first = std::fs::read(&out1).unwrap();
    let offset = state.console_offset as usize;
    assert!(
        first.len() >= offset,
        "the killed process printed {} bytes, the snapshot says {offset}",
        first.len()
    );

    let restored = castor()
        .args(["restore", "--duration", "2500ms"])
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        restored.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let before = progress(&first[..offset]);
    let mut all = first[..offset].to_vec();
    all.extend_from_slice(&restored.stdout);
    let stream = progress(&all);
    assert_gap_free(&stream, 2);
    for cpu in 0..2 {
        let last = before
            .iter()
            .filter(|p| p.cpu == cpu)
            .map(|p| p.seq)
            .max()
            .unwrap_or(0);
        let after: Vec<_> = stream
            .iter()
            .filter(|p| p.cpu == cpu && p.seq > last + 1)
            .collect();
        assert!(
            after.len() > 10,
            "vCPU {cpu}: {} lines after the restore",
            after.len()
        );
        let span = after.last().unwrap().t_us - after[0].t_us;
        assert!(
            span >= 2_000_000,
            "vCPU {cpu}: the restored guest ran for only {span} us"
        );
    }
}

#[test]
fn counter_continues_after_snapshot_kill_restore() {
    snapshot_kill_restore("counter");
}

#[test]
fn interrupt_driven_counter_continues_after_snapshot_kill_restore() {
    snapshot_kill_restore("counter,irq=1");
}

/// Takes a snapshot of a 64 MiB, 1-vCPU counter guest `at` after boot;
/// returns what the guest printed.
fn take_snapshot(dir: &std::path::Path, at: &str) -> Vec<u8> {
    let o = castor()
        .args([
            "run",
            "--mem",
            "64M",
            "--vcpus",
            "1",
            "--duration",
            "1s",
            "--snapshot-at",
            at,
            "--snapshot-dir",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// `castor restore DIR`'s error, which must be a refusal, not a panic.
fn restore_err(dir: &std::path::Path) -> String {
    let o = castor()
        .args(["restore", "--duration", "1s"])
        .arg(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success(),
        "restore of a damaged snapshot succeeded"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "the guest ran: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

#[test]
fn damaged_snapshots_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    take_snapshot(&snap, "200ms");
    // Not a snapshot at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(restore_err(&empty).contains("is not a castor snapshot"));
    // Truncated RAM.
    let t = tmp.path().join("truncated");
    std::fs::create_dir(&t).unwrap();
    std::fs::copy(snap.join("state.bin"), t.join("state.bin")).unwrap();
    let mem = std::fs::read(snap.join("memory.bin")).unwrap();
    std::fs::write(t.join("memory.bin"), &mem[..mem.len() / 2]).unwrap();
    let e = restore_err(&t);
    assert!(e.contains("memory.bin is truncated"), "{e}");
    // One flipped bit in the RAM (in the guest's kernel, the first non-zero page).
    let first = mem.iter().position(|&b| b != 0).unwrap();
    let mut m = mem.clone();
    m[first] ^= 1;
    std::fs::write(t.join("memory.bin"), &m).unwrap();
    let e = restore_err(&t);
    assert!(
        e.contains("memory.bin is corrupted") && e.contains("blake3"),
        "{e}"
    );
    // A flipped bit in the machine state.
    let c = tmp.path().join("corrupt");
    std::fs::create_dir(&c).unwrap();
    std::fs::copy(snap.join("memory.bin"), c.join("memory.bin")).unwrap();
    let mut st = std::fs::read(snap.join("state.bin")).unwrap();
    let n = st.len();
    st[n / 2] ^= 1;
    std::fs::write(c.join("state.bin"), &st).unwrap();
    assert!(restore_err(&c).contains("checksum"));
    // A truncated machine state.
    std::fs::write(c.join("state.bin"), &st[..n / 3]).unwrap();
    assert!(restore_err(&c).contains("truncated"));
}

#[test]
fn mixed_snapshots_are_refused_and_each_whole_one_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let printed = [take_snapshot(&a, "200ms"), take_snapshot(&b, "600ms")];
    // Same machine, same RAM size: only the RAM's identity tells them apart.
    assert_eq!(
        std::fs::metadata(a.join("memory.bin")).unwrap().len(),
        std::fs::metadata(b.join("memory.bin")).unwrap().len()
    );
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(a.join("state.bin"), mixed.join("state.bin")).unwrap();
    std::fs::copy(b.join("memory.bin"), mixed.join("memory.bin")).unwrap();
    let e = restore_err(&mixed);
    assert!(
        e.contains("memory.bin belongs to another snapshot than")
            && e.contains(&mixed.join("state.bin").display().to_string()),
        "{e}"
    );
    // Each whole snapshot restores, and its guest continues at exactly the
    // line after the last one it had printed when the snapshot was taken.
    for (dir, printed) in [&a, &b].into_iter().zip(&printed) {
        let state = vmm::snapshot::read_state(dir).unwrap();
        let o = castor()
            .args(["restore", "--duration", "1500ms"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let after = progress(&o.stdout);
        assert!(
            after.len() > 20,
            "{}: the restored guest printed {} lines",
            dir.display(),
            after.len()
        );
        // The snapshot may cut a line: what was printed up to its console
        // offset, then what the restored guest prints, is one stream from
        // boot with no gap and no duplicate.
        let joined = [&printed[..state.console_offset as usize], &o.stdout[..]].concat();
        assert_gap_free(&progress(&joined), 1);
    }
}
