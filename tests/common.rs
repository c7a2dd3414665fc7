//! Helpers shared by the end-to-end tests: running the castor binary under
//! test, directly or through the lab's local pair (`lab::pair`), and
//! checking the guest's progress lines with the lab's continuity check.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Once;

use guest::Progress;

/// The castor binary under test: this build's, or `CASTOR_TEST_BIN` if set
/// (to run a test against another build, e.g. one from before a fix, and
/// see it fail). Also sets `CASTOR_BIN` to it, so that the lab's pair
/// helper (`lab::pair::castor_exe`) starts this binary and not the test
/// executable.
pub fn castor_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static SET: Once = Once::new();
    let bin = BIN.get_or_init(|| {
        std::env::var("CASTOR_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_castor").into())
    });
    SET.call_once(|| std::env::set_var("CASTOR_BIN", bin));
    bin
}

/// The castor binary under test, as a command.
pub fn castor() -> Command {
    let mut c = Command::new(castor_bin());
    c.env("RUST_LOG", "info");
    c
}

/// Runs castor to completion.
pub fn run(args: &[&str]) -> Output {
    castor().args(args).output().expect("spawn castor")
}

/// Whether a finished castor succeeded, and its stdout then stderr.
pub fn outcome(o: &Output) -> (bool, String) {
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Progress lines of a console stream.
pub fn progress(bytes: &[u8]) -> Vec<Progress> {
    lab::console::progress_lines(bytes)
}

/// Asserts that every vCPU's sequence numbers start at 1 and go up by one.
pub fn assert_gap_free(stream: &[Progress], vcpus: u32) {
    let c = lab::console::check(stream, Some(vcpus));
    assert!(c.ok(), "the console is not continuous: {:?}", c.problems);
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

/// `args` as owned strings (flags for `lab::pair`).
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The daemon's process has exited within `within` (fenced, stopped, moved).
pub fn exited(d: &mut lab::pair::Daemon, within: std::time::Duration) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < within {
        if d.child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// Reads the console at `addr` from offset 0 on a thread, until its stream
/// ends or `for_` passes.
pub fn follow_from_start(
    addr: std::net::SocketAddr,
    for_: std::time::Duration,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let until = std::time::Instant::now() + for_;
        let _ = lab::pair::read_console(addr, 0, &mut s, until, u64::MAX);
        s
    })
}
