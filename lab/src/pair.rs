//! The local HA pair: a backup and a primary as child processes of the
//! castor binary on loopback, with certificates in a directory of their own,
//! free ports and a log file each. `castor demo`, `castor drill`,
//! `castor bench` and the end-to-end tests all start their pairs here, and
//! read the daemons' typed [`Status`] through [`status`] and [`wait_status`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use node::Status;

/// The guest of a lab pair and its encoding (`castor demo`, `castor drill`).
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// Workload of the guest.
    #[arg(long, default_value = "counter", value_parser = crate::cli::parse_workload)]
    pub workload: guest::Workload,
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = crate::cli::parse_size)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Encoding.
    #[arg(long, default_value = "fgbi")]
    pub mode: fgbi::Mode,
}

/// Which witness a lab pair uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WitnessKind {
    /// A local etcd, started for the run (Debian's etcd-server).
    Etcd,
    /// None: safe against crashes only.
    None,
}

/// A pair's witness for a run: a local etcd in `dir` (kept running while
/// the returned server lives), or none.
pub fn start_witness(
    kind: WitnessKind,
    pair: Pair,
    dir: &Path,
) -> Result<(Pair, Option<witness::server::EtcdServer>)> {
    match kind {
        WitnessKind::None => Ok((pair, None)),
        WitnessKind::Etcd => {
            let etcd = witness::server::EtcdServer::start(&dir.join("etcd"))
                .context("starting the witness (a local etcd)")?;
            Ok((pair.with_etcd(&etcd.endpoint()), Some(etcd)))
        }
    }
}

/// A free loopback port (UDP for a daemon's QUIC endpoint, TCP for a
/// console service), outside the kernel's ephemeral range
/// ([`witness::server::unused_port`]).
pub fn free_port(udp: bool) -> Result<SocketAddr> {
    Ok(witness::server::unused_port(udp)?)
}

/// The castor binary: `CASTOR_BIN` if set (the end-to-end tests point it at
/// the binary under test), else the running executable.
pub fn castor_exe() -> Result<PathBuf> {
    match std::env::var_os("CASTOR_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe().context("locating the castor binary"),
    }
}

/// Makes a certificate authority and a certificate for each of `names` in
/// `dir` (see `castor certs`): `dir` holds what the daemons load, the CA's
/// private key goes to `dir/ca`, which no daemon reads; returns `dir`.
pub fn make_certs(dir: &Path, names: [&str; 2]) -> Result<PathBuf> {
    transport::certs::create(dir, &names.map(String::from), false)?;
    Ok(dir.to_path_buf())
}

/// A daemon child process, SIGKILLed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its console service.
    pub console: SocketAddr,
    /// Its control socket.
    pub control: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends signal `sig` to process `pid` (a daemon, or this process for a
/// fault hook), naming both if it cannot.
pub fn signal_pid(pid: u32, sig: rustix::process::Signal) -> Result<()> {
    let p = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .with_context(|| format!("{pid} is not a process id"))?;
    rustix::process::kill_process(p, sig)
        .with_context(|| format!("sending {sig:?} to process {pid}"))
}

impl Daemon {
    /// Sends `sig` (SIGSTOP, SIGCONT, SIGTERM…) to the daemon.
    pub fn signal(&self, sig: rustix::process::Signal) -> Result<()> {
        signal_pid(self.child.id(), sig)
    }

    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's status, or None if it does not answer.
    pub fn status(&self) -> Option<Status> {
        status(&self.control)
    }

    /// Sends `req` to the daemon's control socket.
    pub fn control(&self, req: &node::control::Request) -> Result<node::control::Response> {
        Ok(node::control::request(
            &self.control,
            req,
            Duration::from_secs(10),
        )?)
    }
}

/// One daemon of a pair: its certificates, its name and its peer's, and
/// the witness both name.
pub struct Node<'a> {
    /// Directory made by `castor certs`.
    pub certs: &'a Path,
    /// Its name.
    pub name: &'a str,
    /// Its peer's name.
    pub peer: &'a str,
    /// `--witness` (`none` or `etcd=URL`).
    pub witness: &'a str,
    /// Its network namespace and console address, when the pair runs in
    /// namespaces (`crate::netns`); else loopback.
    pub place: Option<&'a crate::netns::Place>,
    /// Its tap for the guest's network card (`--tap`), if the guest has one.
    pub tap: Option<&'a str>,
    /// Its copy of the guest's disk (`--disk`), if the guest has one.
    pub disk: Option<&'a Path>,
}

fn spawn(
    args: &[String],
    ns: Option<&str>,
    console: SocketAddr,
    control: PathBuf,
    log: PathBuf,
) -> Result<Daemon> {
    let mut cmd = match ns {
        // `ip netns exec` execs the daemon: the child is castor itself.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(castor_exe()?);
            c
        }
        None => Command::new(castor_exe()?),
    };
    let child = cmd
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting a castor daemon")?;
    Ok(Daemon {
        child,
        console,
        control,
        log,
    })
}

/// Starts `castor ROLE` as node `n` with `role_args`, a fresh console port
/// and `extra` flags, logging to `log`.
fn start(
    role: &str,
    n: &Node<'_>,
    role_args: &[String],
    extra: &[String],
    log: PathBuf,
) -> Result<Daemon> {
    let mut console = free_port(false)?;
    if let Some(p) = n.place {
        console.set_ip(p.access);
    }
    let mut a: Vec<String> = vec![role.into(), "--certs".into(), n.certs.display().to_string()];
    a.extend([
        "--node".into(),
        n.name.into(),
        "--peer".into(),
        n.peer.into(),
    ]);
    // The control socket sits beside the log (a file path: it works the
    // same inside a network namespace).
    let control = log.with_extension("sock");
    a.extend(["--console".into(), console.to_string()]);
    a.extend(["--control".into(), control.display().to_string()]);
    a.extend(["--witness".into(), n.witness.into()]);
    if let Some(t) = n.tap {
        a.extend(["--tap".into(), t.into()]);
    }
    if let Some(d) = n.disk {
        a.extend(["--disk".into(), d.display().to_string()]);
    }
    a.extend(role_args.iter().cloned());
    a.extend(extra.iter().cloned());
    spawn(&a, n.place.map(|p| p.ns.as_str()), console, control, log)
}

/// Starts a backup listening on `listen` that, after failover, protects
/// toward `then_protect`.
pub fn start_backup(
    n: &Node<'_>,
    listen: SocketAddr,
    then_protect: SocketAddr,
    extra: &[String],
    log: PathBuf,
) -> Result<Daemon> {
    let role = [
        "--listen".into(),
        listen.to_string(),
        "--then-protect".into(),
        then_protect.to_string(),
    ];
    start("backup", n, &role, extra, log)
}

/// Starts a primary sending to `backup`.
pub fn start_primary(
    n: &Node<'_>,
    backup: SocketAddr,
    extra: &[String],
    log: PathBuf,
) -> Result<Daemon> {
    start(
        "primary",
        n,
        &["--backup".into(), backup.to_string()],
        extra,
        log,
    )
}

/// Two nodes on loopback that can back each other up: their certificates,
/// names and QUIC ports, and the directory of their logs. Node 0 starts as
/// the primary, node 1 as its backup; after a failover either may be
/// started again in either role.
pub struct Pair {
    /// Directory made by `castor certs` holding both nodes' certificates.
    pub certs: PathBuf,
    /// The nodes' names.
    pub names: [String; 2],
    /// The nodes' QUIC ports (node `i` listens on `ports[i]` as a backup).
    pub ports: [SocketAddr; 2],
    /// Where the daemons' logs go.
    pub logs: PathBuf,
    /// `--witness` of each node: `none` unless set.
    pub witness: [String; 2],
    /// The namespaces the nodes run in, if any.
    pub net: Option<std::sync::Arc<crate::netns::Net>>,
    /// Each node's tap for the guest's network card, if it has one.
    pub taps: Option<[String; 2]>,
    /// Each node's copy of the guest's disk, if it has one.
    pub disks: Option<[PathBuf; 2]>,
}

impl Pair {
    /// Nodes `names` using the certificates in `certs`, on two free ports,
    /// logging into `logs`.
    pub fn new(certs: &Path, names: [&str; 2], logs: &Path) -> Result<Pair> {
        Ok(Pair {
            certs: certs.to_path_buf(),
            names: names.map(String::from),
            ports: [free_port(true)?, free_port(true)?],
            logs: logs.to_path_buf(),
            witness: ["none".into(), "none".into()],
            net: None,
            taps: None,
            disks: None,
        })
    }

    /// Node `i` gives the guest's network card the tap `taps[i]`.
    pub fn with_taps(mut self, taps: [String; 2]) -> Pair {
        self.taps = Some(taps);
        self
    }

    /// Node `i` keeps the guest's disk in `disks[i]` (both files of one
    /// size).
    pub fn with_disks(mut self, disks: [PathBuf; 2]) -> Pair {
        self.disks = Some(disks);
        self
    }

    /// Both nodes use the etcd at `endpoint` as their witness.
    pub fn with_etcd(mut self, endpoint: &str) -> Pair {
        self.witness = [format!("etcd={endpoint}"), format!("etcd={endpoint}")];
        self
    }

    /// The nodes run in the namespaces of `net` (their QUIC listeners on the
    /// replication link, their consoles on their access links), each with
    /// `etcd` as its witness through its own access link.
    pub fn in_namespaces(
        mut self,
        net: std::sync::Arc<crate::netns::Net>,
        etcd: &witness::server::EtcdCluster,
    ) -> Pair {
        for i in 0..2 {
            let p = &net.places[i];
            self.ports[i].set_ip(p.rep);
            self.witness[i] = etcd.spec_on(Some(p.root));
        }
        self.net = Some(net);
        self
    }

    /// Nodes `names` with new certificates made in `dir/pki`, logging into `dir`.
    pub fn in_dir(dir: &Path, names: [&str; 2]) -> Result<Pair> {
        let certs = make_certs(&dir.join("pki"), names)?;
        Pair::new(&certs, names, dir)
    }

    /// Node `i` (0 or 1).
    pub fn node(&self, i: usize) -> Node<'_> {
        Node {
            certs: &self.certs,
            name: &self.names[i],
            peer: &self.names[1 - i],
            witness: &self.witness[i],
            place: self.net.as_ref().map(|n| &n.places[i]),
            tap: self.taps.as_ref().map(|t| t[i].as_str()),
            disk: self.disks.as_ref().map(|d| d[i].as_path()),
        }
    }

    /// Starts node `i` as a backup on its port that, after a takeover,
    /// protects toward the other node's port; `extra` flags, log file `log`
    /// in the log directory.
    pub fn start_backup(&self, i: usize, extra: &[String], log: &str) -> Result<Daemon> {
        start_backup(
            &self.node(i),
            self.ports[i],
            self.ports[1 - i],
            extra,
            self.logs.join(log),
        )
    }

    /// Starts node `i` as a primary sending to the other node's port.
    pub fn start_primary(&self, i: usize, extra: &[String], log: &str) -> Result<Daemon> {
        start_primary(&self.node(i), self.ports[1 - i], extra, self.logs.join(log))
    }

    /// Starts node 1 as the backup (log `logs[0]`), then node 0 as its
    /// primary (log `logs[1]`): `both` flags go to both daemons, then
    /// `primary` flags to the primary alone. Returns (backup, primary).
    pub fn start(
        &self,
        both: &[String],
        primary: &[String],
        logs: [&str; 2],
    ) -> Result<(Daemon, Daemon)> {
        let backup = self.start_backup(1, both, logs[0])?;
        let mut args = both.to_vec();
        args.extend(primary.iter().cloned());
        let primary = self.start_primary(0, &args, logs[1])?;
        Ok((backup, primary))
    }
}

/// `castor primary`/`castor run` flags for castor's guest: RAM, vCPUs and
/// workload.
pub fn guest_args(mem: u64, vcpus: u32, workload: &guest::Workload) -> Vec<String> {
    vec![
        "--mem".into(),
        format!("{}M", mem >> 20),
        "--vcpus".into(),
        vcpus.to_string(),
        "--workload".into(),
        workload.to_string(),
    ]
}

/// The status of the daemon whose console service is at `console`, or None
/// if it does not answer with a status.
pub fn status(control: &Path) -> Option<Status> {
    match node::control::request(
        control,
        &node::control::Request::Status,
        Duration::from_millis(500),
    ) {
        Ok(node::control::Response::Status(s)) => Some(*s),
        _ => None,
    }
}

/// The node runs the guest and a backup holds a committed checkpoint.
pub fn protected(s: &Status) -> bool {
    s.protected()
}

/// The node is a backup connected to its primary that has committed at
/// least `n` checkpoints since it started. A fresh backup process can take
/// over only after its first commit; the primary's own `protected` may
/// still describe the session it had with the backup's previous process
/// until it notices that connection is gone.
pub fn backup_committed(n: u64) -> impl Fn(&Status) -> bool {
    move |s| {
        s.backup
            .as_ref()
            .is_some_and(|b| b.connected && b.checkpoints_applied >= n)
    }
}

/// The node runs the guest as a primary that has no backup.
pub fn unprotected(s: &Status) -> bool {
    s.primary.as_ref().is_some_and(|p| !p.protected)
}

/// The node is protected and has checkpointed at least `n` epochs.
pub fn protected_after(n: u64) -> impl Fn(&Status) -> bool {
    move |s| s.protected() && s.figures().epochs >= n
}

/// Waits until `pred` holds for the daemon's status and returns that status;
/// after `timeout`, fails with the last status and the tail of its log.
pub fn wait_status(
    d: &Daemon,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Status) -> bool,
) -> Result<Status> {
    let t = Instant::now();
    loop {
        if let Some(s) = d.status() {
            if pred(&s) {
                return Ok(s);
            }
        }
        if t.elapsed() > timeout {
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "timed out after {timeout:?} waiting for {what}; last status {:?}; {} ends with:\n{}",
                d.status().map(|s| s.to_json()),
                d.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a console from `offset` into `buf` (which holds the stream up to
/// `offset`) until the connection ends or `until` passes; returns when the
/// stream first went past offset `mark`, if it did. An offset the console
/// does not have is an error, a [`ConsoleRefused`].
pub fn read_console(
    addr: SocketAddr,
    offset: u64,
    buf: &mut Vec<u8>,
    until: Instant,
    mark: u64,
) -> Result<Option<Instant>> {
    let arrivals = follow_console(addr, offset, buf, until)?;
    Ok(first_past(&arrivals, mark))
}

/// Reads a console from `offset` into `buf` like [`read_console`] and
/// returns when each chunk came: (stream length after it, arrival time).
pub fn follow_console(
    addr: SocketAddr,
    offset: u64,
    buf: &mut Vec<u8>,
    until: Instant,
) -> Result<Vec<(u64, Instant)>> {
    let mut arrivals = Vec::new();
    follow(addr, offset, buf, until, None, &mut |end, at| {
        arrivals.push((end, at))
    })?;
    Ok(arrivals)
}

/// The read loop of a console client: from `offset` into `buf` until the
/// connection ends, `until` passes or `stop` is set; `arrived` sees the
/// stream's length after every chunk and when it came.
fn follow(
    addr: SocketAddr,
    offset: u64,
    buf: &mut Vec<u8>,
    until: Instant,
    stop: Option<&AtomicBool>,
    arrived: &mut dyn FnMut(u64, Instant),
) -> Result<()> {
    let mut s =
        TcpStream::connect(addr).with_context(|| format!("attaching to the console at {addr}"))?;
    s.set_nodelay(true)?;
    s.write_all(format!("{offset}\n").as_bytes())?;
    let mut chunk = [0u8; 8192];
    let poll = if stop.is_some() { 10 } else { 100 };
    let mut first = true;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Ok(());
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(poll))))?;
        match s.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) if std::mem::take(&mut first) && chunk[..n].starts_with(REFUSED) => {
                // The daemon answers an offset it does not have with one
                // line (written at once) and closes: that is not the
                // guest's output, and must not be taken for it (a drill's
                // client that appended it lost its place in the stream).
                let mut msg = chunk[..n].to_vec();
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.read_to_end(&mut msg);
                return Err(ConsoleRefused {
                    addr,
                    offset,
                    why: String::from_utf8_lossy(&msg).trim_end().to_string(),
                }
                .into());
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                arrived(buf.len() as u64, Instant::now());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(()),
        }
    }
}

/// How a castor console begins its answer to an offset it does not have.
const REFUSED: &[u8] = b"error: offset ";

/// A console's answer to an offset it does not have ("older than the oldest
/// kept", "beyond the end of the stream"), as the daemon wrote it.
#[derive(Debug, Clone)]
pub struct ConsoleRefused {
    /// The console.
    pub addr: SocketAddr,
    /// The offset asked for.
    pub offset: u64,
    /// The daemon's answer.
    pub why: String,
}

impl std::fmt::Display for ConsoleRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the console at {} refused offset {}: {}",
            self.addr, self.offset, self.why
        )
    }
}

impl std::error::Error for ConsoleRefused {}

/// A console client on a thread of its own, for watching a node while
/// something else happens: [`Follower::first_past`] tells what came so far,
/// [`Follower::finish`] stops it and returns the stream.
pub struct Follower {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<(u64, Instant)>>>,
    thread: std::thread::JoinHandle<(Vec<u8>, Option<ConsoleRefused>)>,
}

impl Follower {
    /// Follows the console at `addr` from the end of `stream` (a copy of
    /// the stream up to there) until `until` or [`Follower::finish`].
    pub fn start(addr: SocketAddr, mut stream: Vec<u8>, until: Instant) -> Follower {
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), arrivals.clone());
        let thread = std::thread::spawn(move || {
            let offset = stream.len() as u64;
            let r = follow(
                addr,
                offset,
                &mut stream,
                until,
                Some(&s),
                &mut |end, at| a.lock().expect("follower").push((end, at)),
            );
            // A console that went away is the end of the stream (a killed
            // node); one that refused the offset is worth saying.
            let refused = r.err().and_then(|e| e.downcast::<ConsoleRefused>().ok());
            (stream, refused)
        });
        Follower {
            stop,
            arrivals,
            thread,
        }
    }

    /// When the stream first went past `mark`, so far.
    pub fn first_past(&self, mark: u64) -> Option<Instant> {
        first_past(&self.arrivals.lock().expect("follower"), mark)
    }

    /// Stops following; the stream as followed, and the console's refusal
    /// of the offset if it refused it.
    pub fn finish(self) -> (Vec<u8>, Option<ConsoleRefused>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// When the stream first went past offset `mark`, from [`follow_console`]'s
/// arrivals.
pub fn first_past(arrivals: &[(u64, Instant)], mark: u64) -> Option<Instant> {
    arrivals
        .iter()
        .find(|(end, _)| *end > mark)
        .map(|(_, t)| *t)
}

/// A failover seen from a console client: when the primary was killed, and
/// when the survivor's first byte past what the backup had committed came.
#[derive(Debug, Clone, Copy)]
pub struct Takeover {
    /// The SIGKILL.
    pub killed: Instant,
    /// The first console byte the survivor produced, if it did in time.
    pub first: Option<Instant>,
}

impl Takeover {
    /// SIGKILL → first console byte from the survivor, ms.
    pub fn ms(&self) -> Option<f64> {
        self.first.map(|t| (t - self.killed).as_secs_f64() * 1e3)
    }
}

/// SIGKILLs `primary` and follows the console on `backup` from the end of
/// `stream` for `watch`. The failover ends with the first byte past the
/// offset the survivor resumed from (its own history's first byte; bytes
/// before it are the committed replica's, served at once). The killed
/// process is reaped only after the watch: a large guest's exit takes tens
/// of milliseconds that are not the failover's.
pub fn kill_and_follow(
    primary: &mut Daemon,
    backup: &Daemon,
    stream: &mut Vec<u8>,
    watch: Duration,
) -> Result<Takeover> {
    let killed = Instant::now();
    let _ = primary.child.kill();
    let offset = stream.len() as u64;
    let arrivals = follow_console(backup.console, offset, stream, Instant::now() + watch);
    let _ = primary.child.wait();
    let arrivals = arrivals?;
    let resumed_at = backup.status().and_then(|s| s.resumed_at);
    let first = resumed_at.and_then(|r| first_past(&arrivals, r));
    Ok(Takeover { killed, first })
}
