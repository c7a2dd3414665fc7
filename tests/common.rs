//! Helpers shared by the end-to-end tests: running the castor binary and
//! reading the guest's progress lines.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use guest::Progress;

/// The castor binary under test.
pub fn castor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_castor"));
    c.env("RUST_LOG", "info");
    c
}

/// Runs castor to completion.
pub fn run(args: &[&str]) -> Output {
    castor().args(args).output().expect("spawn castor")
}

/// Progress lines of a console stream.
pub fn progress(bytes: &[u8]) -> Vec<Progress> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(Progress::parse)
        .collect()
}

/// Asserts that every vCPU's sequence numbers start at 1 and go up by one.
pub fn assert_gap_free(stream: &[Progress], vcpus: u32) {
    for cpu in 0..vcpus {
        let seqs: Vec<u64> = stream
            .iter()
            .filter(|p| p.cpu == cpu)
            .map(|p| p.seq)
            .collect();
        assert!(!seqs.is_empty(), "no lines from vCPU {cpu}");
        assert_eq!(seqs[0], 1, "vCPU {cpu} starts at 1");
        for w in seqs.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "vCPU {cpu}: gap or duplicate between {} and {}",
                w[0],
                w[1]
            );
        }
    }
}

/// Waits up to `secs` for `path` to exist.
pub fn wait_for(path: &Path, secs: u64) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs() < secs {
        if path.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}
