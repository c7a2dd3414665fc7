//! Memory reuse end to end: a backup restarted over the image it kept gets
//! only the pages that differ, and a byte changed in its RAM file behind
//! castor's back is found by digest and resent.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use common::castor_bin;
use lab::pair::{self, wait_status, Pair};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn byte_at(path: &Path, at: u64) -> u8 {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    b[0]
}

#[test]
fn a_restarted_backup_gets_only_what_changed_and_a_tampered_page_is_resent() {
    castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let pair = Pair::in_dir(tmp.path(), ["a", "b"]).unwrap();
    let images = tmp.path().join("images");
    let both = strings(&["--image-dir", images.to_str().unwrap(), "--verify"]);
    let mut primary_args = both.clone();
    primary_args.extend(strings(&[
        "--mem",
        "128M",
        "--vcpus",
        "1",
        "--workload",
        "sparse,rate=2000,mib=4",
    ]));
    let mut backup = pair.start_backup(1, &both, "b1.log").unwrap();
    let primary = pair.start_primary(0, &primary_args, "a.log").unwrap();
    let s = wait_status(
        &primary,
        "protected",
        Duration::from_secs(60),
        pair::protected_after(10),
    )
    .unwrap();
    let first = s.primary.unwrap().last_resync.unwrap();
    assert!(
        !first.reused && first.pages_sent == first.pages,
        "{first:?}"
    );
    let (a_ram, b_ram) = (images.join("castor/a.ram"), images.join("castor/b.ram"));
    assert!(a_ram.exists() && b_ram.exists(), "image files");

    // The backup dies; its image stays. A byte of it changes behind
    // castor's back, in memory the workload never touches (zero on the
    // primary).
    backup.kill();
    wait_status(
        &primary,
        "unprotected",
        Duration::from_secs(30),
        pair::unprotected,
    )
    .unwrap();
    let at = 100 << 20 | 0x123;
    assert_eq!(byte_at(&a_ram, at), 0);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&b_ram)
            .unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[0x5a]).unwrap();
    }
    // The workload changes some pages meanwhile.
    std::thread::sleep(Duration::from_millis(500));

    let mut args = both.clone();
    args.push("--reuse".into());
    let _backup = pair.start_backup(1, &args, "b2.log").unwrap();
    let s = wait_status(&primary, "protected again", Duration::from_secs(60), |s| {
        s.protected()
            && s.primary
                .as_ref()
                .is_some_and(|p| p.last_resync.as_ref().is_some_and(|r| r.reused))
    })
    .unwrap();
    let r = s.primary.clone().unwrap().last_resync.unwrap();
    assert!(r.reused, "{r:?}");
    assert!(
        r.stale >= 1,
        "the changed byte's page is found by digest: {r:?}"
    );
    assert!(
        r.pages_sent * 20 < r.pages,
        "only what changed is sent (under 5 %): {r:?}"
    );
    assert!(r.protected_ms.is_some(), "{r:?}");
    assert_eq!(byte_at(&b_ram, at), 0, "the tampered byte was resent");
    // The replica keeps verifying against the primary's digests.
    let s = wait_status(
        &primary,
        "20 more epochs",
        Duration::from_secs(30),
        pair::protected_after(s.figures().epochs + 20),
    )
    .unwrap();
    assert!(s.protected(), "{s:?}");
    let b = _backup.status().unwrap().backup.unwrap();
    assert_eq!(b.verify_mismatches, 0, "{b:?}");
    assert!(b.checkpoints_applied >= 20, "{b:?}");
}
