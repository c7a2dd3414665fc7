//! Upgrades without downtime: a pair whose nodes run two adjacent releases
//! keeps protecting the guest. castor 0.1.0 (the previous release, commit
//! [`PREVIOUS`]) is built from this repository's git history, its binary
//! cached by commit under the target directory; then real daemons (real
//! KVM, QUIC with mutual TLS, a real etcd witness) go through the upgrade a
//! user does: upgrade the backup, switch over, upgrade the old primary —
//! with the guest running throughout, one history on its console and one
//! owner at the witness at a time.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use common::{castor_bin, exited, outcome, run, strings};
use lab::console::continuity;
use lab::pair::{self, read_console, wait_status, Daemon, Pair};
use node::{Role, Status};
use witness::server::EtcdServer;

/// The protocol version two nodes of this release speak.
const NEWEST: u16 = protocol::VERSION;

/// castor 0.1.0: the last release, which speaks protocol version 5 alone.
const PREVIOUS: &str = "52a1c96cba1e6edb7b98d40c4281449518120afb";
/// What its `--version` prints.
const PREVIOUS_VERSION: &str = "castor 0.1.0";

/// Every backup's flags: a failure detector above this host's stalls. The
/// machine is itself a VM whose CPUs its hypervisor takes away for ~100 ms
/// at a time under load (steal time; castor logs each as "… woke
/// late"); the default 30 ms took such a stall for a dead primary, and
/// these tests assert who runs the guest at each step.
const BACKUP: &[&str] = &["--heartbeat-timeout-ms", "400"];

const GUEST: &[&str] = &[
    "--mem",
    "128M",
    "--vcpus",
    "1",
    "--workload",
    "counter,interval_ms=2",
];

/// The tests start daemons from two binaries through `CASTOR_BIN` (one
/// environment for the process): one test at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The workspace's target directory and the profile directory the binary
/// under test is in (`target/debug`).
fn target_dirs() -> (PathBuf, PathBuf) {
    let bin = Path::new(castor_bin());
    let profile = bin.parent().expect("the binary's directory").to_path_buf();
    let target = profile
        .parent()
        .expect("the target directory")
        .to_path_buf();
    (target, profile)
}

fn git(root: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(root);
    c
}

/// A file's length and modification time, to show it was not rewritten.
type Stamp = (u64, SystemTime);

fn stamps(files: &[PathBuf]) -> BTreeMap<PathBuf, Option<Stamp>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok();
            (f.clone(), m.map(|m| (m.len(), m.modified().unwrap())))
        })
        .collect()
}

/// Artifacts of this workspace's own crates (all named `castor*`): never
/// seeded, the old release builds its own.
fn ours(name: &str) -> bool {
    name.starts_with("castor") || name.starts_with("libcastor")
}

/// Copies a file with its modification time: cargo compares the times of
/// a unit's outputs with its dependencies', and a copy newer than what
/// depends on it would make the dependent stale.
fn copy_file(from: &Path, to: &Path) -> std::io::Result<u64> {
    let n = std::fs::copy(from, to)?;
    let m = std::fs::metadata(from)?;
    let times = std::fs::FileTimes::new()
        .set_modified(m.modified()?)
        .set_accessed(m.accessed()?);
    std::fs::File::options()
        .write(true)
        .open(to)?
        .set_times(times)?;
    Ok(n)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut bytes = 0;
    for e in std::fs::read_dir(from)?.flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            bytes += copy_tree(&src, &dst)?;
        } else if t.is_file() {
            bytes += copy_file(&src, &dst)?;
        }
    }
    Ok(bytes)
}

/// Seeds `to` (a profile directory of the old build's own target directory)
/// with this workspace's registry dependencies, so they are not rebuilt:
/// rustc's outputs in `deps` (`.rlib`, `.rmeta`, `.so`) are hard-linked —
/// rustc replaces an output it rebuilds (a new file renamed over the old
/// name) and never writes into it, so a link is never changed through
/// (checked after the build) — and everything cargo writes in place
/// (dep-info, fingerprints, build script outputs) is copied, with its
/// modification time. Returns the files linked and the bytes copied.
fn seed(from: &Path, to: &Path) -> std::io::Result<(Vec<PathBuf>, u64)> {
    let mut copied = 0;
    let mut linked = Vec::new();
    std::fs::create_dir_all(to.join("deps"))?;
    for e in std::fs::read_dir(from.join("deps"))?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if ours(&name) || !e.file_type()?.is_file() {
            continue;
        }
        let dst = to.join("deps").join(&name);
        if [".rlib", ".rmeta", ".so"].iter().any(|x| name.ends_with(x)) {
            std::fs::hard_link(e.path(), &dst)?;
            linked.push(e.path());
        } else if name.ends_with(".d") {
            copied += copy_file(&e.path(), &dst)?;
        }
    }
    for sub in ["build", ".fingerprint"] {
        let Ok(rd) = std::fs::read_dir(from.join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !ours(&name) && e.file_type()?.is_dir() {
                copied += copy_tree(&e.path(), &to.join(sub).join(&name))?;
            }
        }
    }
    Ok((linked, copied))
}

/// CPU seconds of this process's waited-for children (/proc/self/stat's
/// cutime + cstime, at 100 ticks a second): the build's cost apart from
/// what else shares the machine.
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    // After the name: state is field 3; cutime and cstime are 16 and 17.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(13) + tick(14)) / 100.0
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !m.is_dir() {
        // A file shared by a hard link costs nothing more.
        use std::os::unix::fs::MetadataExt;
        return if m.nlink() > 1 { 0 } else { m.len() };
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| dir_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// The previous release's binary: from the cache
/// (`target/upgrade-prev/COMMIT/castor`), or built from git (the commit's
/// tree exported with `git archive`, built in a target directory of its own
/// seeded from this workspace's).
fn previous_release() -> PathBuf {
    let (target, profile) = target_dirs();
    let cache = target.join("upgrade-prev").join(PREVIOUS);
    let bin = cache.join("castor");
    let version = |b: &Path| {
        Command::new(b)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if bin.exists() {
        let v = version(&bin);
        assert_eq!(v.as_deref(), Some(PREVIOUS_VERSION), "{}", bin.display());
        eprintln!("previous release: cached {}", bin.display());
        return bin;
    }
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let commit = format!("{PREVIOUS}^{{commit}}");
    let known = git(root)
        .args(["cat-file", "-e", &commit])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        known,
        "this test builds the previous release, castor 0.1.0, from git commit {PREVIOUS}, \
         which this checkout ({}) does not have: it needs the repository's history \
         (a clone that is not shallow: `git fetch --unshallow`, or `git fetch origin {PREVIOUS}`), \
         and `git` on the PATH",
        root.display()
    );
    let work = target
        .join("upgrade-prev")
        .join(format!("build-{PREVIOUS}"));
    let _ = std::fs::remove_dir_all(&work);
    let src = work.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut archive = git(root)
        .args(["archive", "--format=tar", PREVIOUS])
        .stdout(Stdio::piped())
        .spawn()
        .expect("git archive");
    let untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(archive.stdout.take().unwrap())
        .status()
        .expect("tar");
    assert!(
        archive.wait().unwrap().success() && untar.success(),
        "exporting {PREVIOUS} with git archive"
    );

    // The old build's own target directory, seeded from ours.
    let old_target = work.join("target");
    let profile_name = profile.file_name().unwrap().to_string_lossy().to_string();
    let (linked, copied) = seed(&profile, &old_target.join(&profile_name)).expect("seeding");
    let ours_before = stamps(&linked);
    let main_bin = [profile.join("castor")];
    let bin_before = stamps(&main_bin);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new("nice");
    build
        .arg(cargo)
        .args([
            "build",
            "--offline",
            "--locked",
            "-p",
            "castor",
            "--bin",
            "castor",
            // Our dev profile's debug settings (Cargo.toml), which castor
            // 0.1.0's manifest predates: without them every seeded
            // dependency is rebuilt (minutes of CI). Config overrides the
            // manifest's profile.
            "--config",
            "profile.dev.debug=\"line-tables-only\"",
            "--config",
            "profile.dev.package.\"*\".debug=false",
        ])
        .current_dir(&src)
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS");
    // What cargo set for this test (CARGO_MANIFEST_DIR, CARGO_PKG_* ...)
    // is not for the build: build scripts rerun when such a variable
    // differs from the main build's (ring's watches CARGO_PKG_NAME and
    // CARGO_MANIFEST_DIR), which would rebuild the seeded dependencies.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let keep = ["CARGO_HOME", "CARGO_BUILD_JOBS"].contains(&k.as_ref())
            || [
                "CARGO_TERM_",
                "CARGO_NET_",
                "CARGO_HTTP_",
                "CARGO_REGISTR",
                "CARGO_PROFILE_",
            ]
            .iter()
            .any(|p| k.starts_with(p));
        if k.starts_with("CARGO_") && !keep {
            build.env_remove(k.as_ref());
        }
    }
    build
        .env("CARGO_TARGET_DIR", &old_target)
        .env("CARGO_INCREMENTAL", "0");
    match profile_name.as_str() {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        p => {
            build.args(["--profile", p]);
        }
    }
    let log = work.join("build.log");
    let (built_at, cpu0) = (Instant::now(), children_cpu());
    let status = build
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .expect("cargo");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "building castor 0.1.0 ({PREVIOUS}) failed; {}:\n{text}",
        log.display()
    );
    let rebuilt = text.matches("Compiling").count();
    let (build_s, build_cpu) = (built_at.elapsed().as_secs_f64(), children_cpu() - cpu0);
    // The old build changed nothing of the main target: every file it
    // shares through a link is as it was, and so is the binary under test.
    assert_eq!(
        stamps(&linked),
        ours_before,
        "the old build rewrote a file of the main target it shares by a hard link"
    );
    assert_eq!(
        stamps(&main_bin),
        bin_before,
        "the old build changed the main target's castor binary"
    );
    std::fs::create_dir_all(&cache).unwrap();
    let tmp = cache.join("castor.tmp");
    std::fs::copy(old_target.join(&profile_name).join("castor"), &tmp).unwrap();
    // Its debug information is not needed here (best effort: binutils).
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(&tmp)
        .stderr(Stdio::null())
        .status();
    std::fs::rename(&tmp, &bin).unwrap();
    let work_bytes = dir_bytes(&work);
    std::fs::remove_dir_all(&work).unwrap();
    assert_eq!(version(&bin).as_deref(), Some(PREVIOUS_VERSION));
    eprintln!(
        "previous release: built {} in {:.0} s (cargo build {build_s:.0} s, {build_cpu:.0} CPU s; \
         {rebuilt} crates compiled, {:.0} MiB seeded by copy, {} files hard-linked, \
         {:.0} MiB of build removed); cached, {:.0} MiB",
        bin.display(),
        t0.elapsed().as_secs_f64(),
        copied as f64 / (1 << 20) as f64,
        linked.len(),
        work_bytes as f64 / (1 << 20) as f64,
        dir_bytes(&bin) as f64 / (1 << 20) as f64
    );
    bin
}

/// Which binary the next daemon starts from (`lab::pair` reads
/// `CASTOR_BIN` at each start).
fn using(bin: &Path) {
    std::env::set_var("CASTOR_BIN", bin);
}

/// Stops a daemon as a person does (SIGTERM), SIGKILL after 10 s.
fn stop(d: &mut Daemon) {
    d.signal(rustix::process::Signal::TERM).unwrap();
    if !exited(d, Duration::from_secs(10)) {
        d.kill();
    }
}

/// The owner and token at the witness, sampled every 20 ms while the test
/// runs: every change, in order.
struct Owners {
    seen: Arc<Mutex<Vec<(String, u64)>>>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Owners {
    fn watch(etcd: &EtcdServer) -> Owners {
        let w = etcd.client("castor").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (s, d) = (seen.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                if let Ok(Some((o, _))) = w.read() {
                    let mut s = s.lock().unwrap();
                    if s.last() != Some(&(o.owner.clone(), o.token)) {
                        s.push((o.owner, o.token));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Owners {
            seen,
            done,
            thread: Some(thread),
        }
    }

    /// Every change seen; asserts one owner per token, tokens only rising.
    fn finish(mut self) -> Vec<(String, u64)> {
        self.done.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let seen = self.seen.lock().unwrap().clone();
        for w in seen.windows(2) {
            assert!(
                w[1].1 > w[0].1,
                "the witness's token went from {:?} to {:?}: {seen:?}",
                w[0],
                w[1]
            );
        }
        seen
    }
}

/// Protected, with `n` more epochs than `after`, at protocol `version`
/// (`None`: a castor 0.1 primary, which does not report it).
fn protected_at(version: Option<u16>, after: u64) -> impl Fn(&Status) -> bool {
    move |s| {
        s.protected()
            && s.figures().epochs >= after + 20
            && s.primary.as_ref().is_some_and(|p| p.protocol == version)
    }
}

/// The backup at `b` is connected, at `version`, and applies checkpoints.
fn applying_at(b: &Daemon, version: u16) {
    let before = b
        .status()
        .and_then(|s| s.backup)
        .map_or(0, |s| s.checkpoints_applied);
    wait_status(b, "checkpoints applied", Duration::from_secs(30), |s| {
        s.backup.as_ref().is_some_and(|b| {
            b.connected && b.protocol == Some(version) && b.checkpoints_applied >= before + 10
        })
    })
    .unwrap();
}

fn epochs(d: &Daemon) -> u64 {
    d.status().map_or(0, |s| s.figures().epochs)
}

/// The status a person reads names the version.
fn summary_names(d: &Daemon, version: u16) {
    let (ok, out) = outcome(&run(&[
        "status",
        "--control",
        &d.control.display().to_string(),
    ]));
    assert!(
        ok && out.contains(&format!("protocol   version {version} with the")),
        "{out}"
    );
}

/// The console of `d` from offset 0 for `for_`.
fn console(d: &Daemon, for_: Duration) -> Vec<u8> {
    let mut s = Vec::new();
    let _ = read_console(d.console, 0, &mut s, Instant::now() + for_, u64::MAX);
    s
}

#[test]
fn a_pair_is_upgraded_backup_first_then_switched_over_with_the_guest_running() {
    let _one = one_at_a_time();
    let t0 = Instant::now();
    let new = PathBuf::from(castor_bin());
    let old = previous_release();
    let built = t0.elapsed();
    let (ok, out) = outcome(&run(&["--version"]));
    assert!(ok && out.trim() == "castor 0.2.0", "{out}");

    let tmp = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&tmp.path().join("etcd")).expect("etcd starts");
    let pair = Pair::in_dir(tmp.path(), ["a", "b"])
        .unwrap()
        .with_etcd(&etcd.endpoint());
    let owners = Owners::watch(&etcd);

    // 1. Both nodes on castor 0.1.0: protected (at version 5, the only one
    //    it speaks; it does not report it).
    using(&old);
    let mut b = pair.start_backup(1, &strings(BACKUP), "b-0.1.log").unwrap();
    let mut a = pair.start_primary(0, &strings(GUEST), "a-0.1.log").unwrap();
    wait_status(
        &a,
        "old ↔ old protected",
        Duration::from_secs(60),
        protected_at(None, 0),
    )
    .unwrap();
    // Everything clients see from the guest while a runs it, from its boot.
    let seen_on_a = common::follow_from_start(a.console, Duration::from_secs(600));

    // 2. The backup is upgraded: stopped, started from castor 0.2.0. The
    //    old primary carries on alone meanwhile, then re-protects toward
    //    it: old primary ↔ new backup at version 5.
    stop(&mut b);
    wait_status(
        &a,
        "carrying on alone",
        Duration::from_secs(10),
        pair::unprotected,
    )
    .unwrap();
    using(&new);
    let mut b = pair.start_backup(1, &strings(BACKUP), "b-0.2.log").unwrap();
    let e = epochs(&a);
    wait_status(
        &a,
        "old ↔ new protected",
        Duration::from_secs(60),
        protected_at(None, e),
    )
    .unwrap();
    applying_at(&b, 5);
    summary_names(&b, 5);

    // 3. Switch over: the new backup takes over on command (a planned
    //    takeover); the old primary is fenced and stops.
    let (ok, out) = outcome(&run(&[
        "takeover",
        "--control",
        &b.control.display().to_string(),
    ]));
    assert!(ok && out.contains("ok: taking over"), "{out}");
    wait_status(&b, "the switchover", Duration::from_secs(10), |s| {
        s.role == Role::TakenOver
    })
    .unwrap();
    assert!(
        exited(&mut a, Duration::from_secs(10)),
        "the old primary kept running after the switchover"
    );
    let alog = std::fs::read_to_string(&a.log).unwrap();
    assert!(alog.contains("FENCED"), "{alog}");

    // 4. The old primary's node is upgraded and becomes the new backup:
    //    new ↔ new, at the newest version.
    let mut a = pair.start_backup(0, &strings(BACKUP), "a-0.2.log").unwrap();
    wait_status(
        &b,
        "new ↔ new protected",
        Duration::from_secs(60),
        protected_at(Some(NEWEST), 0),
    )
    .unwrap();
    applying_at(&a, NEWEST);
    summary_names(&b, NEWEST);
    summary_names(&a, NEWEST);
    let (ok, out) = outcome(&run(&[
        "status",
        "--json",
        "--control",
        &b.control.display().to_string(),
    ]));
    let s = node::Status::from_json(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok && s.primary.unwrap().protocol == Some(NEWEST), "{out}");

    // One history: what a showed from the guest's boot until it stopped,
    // then b's console from there on, gap-free (every line once, in order).
    let mut history = seen_on_a.join().unwrap();
    let on_a = history.len();
    read_console(
        b.console,
        on_a as u64,
        &mut history,
        Instant::now() + Duration::from_millis(500),
        u64::MAX,
    )
    .unwrap();
    assert!(on_a > 1000, "a showed {on_a} bytes");
    assert!(
        history.len() > on_a,
        "the guest's output stopped at the switchover"
    );
    let c = lab::console::check(&lab::console::progress_lines(&history), Some(1));
    assert!(c.ok() && c.lines > 1000, "{:?}", c.problems);

    // One primary at a time: a booted the VM; a alone again while the
    // backup was replaced; then b, by the switchover.
    let seen = owners.finish();
    let who: Vec<&str> = seen.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(who.first(), Some(&"a"), "{seen:?}");
    assert_eq!(who.last(), Some(&"b"), "{seen:?}");
    assert_eq!(
        who.iter()
            .skip_while(|&&o| o == "a")
            .filter(|&&o| o == "a")
            .count(),
        0,
        "a owned the VM again after the switchover: {seen:?}"
    );
    stop(&mut a);
    stop(&mut b);
    eprintln!(
        "upgrade: previous release ready in {:.1} s, pairs {:.1} s",
        built.as_secs_f64(),
        (t0.elapsed() - built).as_secs_f64()
    );
}

#[test]
fn a_new_primary_protects_toward_an_old_backup_at_v5_then_at_the_newest_once_it_is_upgraded() {
    let _one = one_at_a_time();
    let new = PathBuf::from(castor_bin());
    let old = previous_release();
    let tmp = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&tmp.path().join("etcd")).expect("etcd starts");
    let pair = Pair::in_dir(tmp.path(), ["a", "b"])
        .unwrap()
        .with_etcd(&etcd.endpoint());
    let owners = Owners::watch(&etcd);

    // castor 0.2.0's primary, castor 0.1.0's backup: the backup refuses the
    // first hello (the newest version); the primary speaks 5 to it.
    using(&old);
    let mut b = pair.start_backup(1, &strings(BACKUP), "b-0.1.log").unwrap();
    using(&new);
    let a = pair.start_primary(0, &strings(GUEST), "a-0.2.log").unwrap();
    wait_status(
        &a,
        "new ↔ old protected",
        Duration::from_secs(60),
        protected_at(Some(5), 0),
    )
    .unwrap();
    summary_names(&a, 5);
    let alog = std::fs::read_to_string(&a.log).unwrap();
    assert!(alog.contains("speaks version 5 alone"), "{alog}");
    let blog = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        blog.contains(&format!("version {NEWEST}")),
        "the old backup's refusal: {blog}"
    );

    // The backup is upgraded: the primary offers its range again, and
    // gets the newest version.
    stop(&mut b);
    wait_status(
        &a,
        "carrying on alone",
        Duration::from_secs(10),
        pair::unprotected,
    )
    .unwrap();
    let b = pair.start_backup(1, &strings(BACKUP), "b-0.2.log").unwrap();
    let e = epochs(&a);
    wait_status(
        &a,
        "new ↔ new protected",
        Duration::from_secs(60),
        protected_at(Some(NEWEST), e),
    )
    .unwrap();
    applying_at(&b, NEWEST);

    let c = continuity(&console(&a, Duration::from_millis(300)));
    assert!(c.ok() && c.lines > 100, "{:?}", c.problems);
    let seen = owners.finish();
    assert!(seen.iter().all(|(o, _)| o == "a"), "{seen:?}");
}
