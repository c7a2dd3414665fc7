//! Local etcd for `castor demo`, drills and the tests: Debian's
//! `etcd-server` started on free loopback ports with its own data
//! directory, stopped when dropped. [`EtcdServer`] is one member;
//! [`EtcdCluster`] is one, three or five, each its own process, to kill
//! and restart one by one. A real deployment runs its own etcd cluster
//! (one, three or five members) and gives castor the endpoints.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Etcd, Store, WitnessError};

/// How long a local etcd has to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running local etcd.
#[derive(Debug)]
pub struct EtcdServer {
    member: Member,
}

/// Why a local etcd did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No `etcd` binary.
    #[error("etcd is not installed (apt-get install etcd-server): {0}")]
    Missing(std::io::Error),
    /// Files or ports.
    #[error("starting etcd: {0}")]
    Io(#[from] std::io::Error),
    /// It did not answer.
    #[error("etcd did not answer within 20 s (its log: {0})")]
    NoAnswer(PathBuf),
    /// A cluster of a size other than 1, 3 or 5.
    #[error("a local etcd cluster has 1, 3 or 5 members, not {0}")]
    Size(usize),
}

/// One etcd process: how it is started, and the running process.
#[derive(Debug)]
struct Member {
    name: String,
    data: PathBuf,
    log: PathBuf,
    /// More addresses it listens on for clients, beside 127.0.0.1.
    also: Vec<IpAddr>,
    client: u16,
    peer: u16,
    /// `--initial-cluster`: every member's `NAME=PEER-URL`.
    initial_cluster: String,
    /// More flags (a cluster's token and timings).
    flags: Vec<String>,
    child: Option<Child>,
}

impl Member {
    /// Starts the process (not waiting for it to answer).
    fn spawn(&mut self) -> Result<(), ServerError> {
        self.kill();
        if let Some(dir) = self.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let advertise = self.endpoint_on(IpAddr::from([127, 0, 0, 1]));
        let mut client = advertise.clone();
        for ip in &self.also {
            client.push(',');
            client.push_str(&self.endpoint_on(*ip));
        }
        let peer = self.peer_url();
        let child = Command::new("etcd")
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &advertise])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ServerError::Missing(e),
                _ => ServerError::Io(e),
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer)
    }

    fn endpoint_on(&self, ip: IpAddr) -> String {
        format!("http://{}", SocketAddr::new(ip, self.client))
    }

    fn endpoint(&self) -> String {
        self.endpoint_on(IpAddr::from([127, 0, 0, 1]))
    }

    /// Whether its process runs.
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until it answers a read, linearizable (through its cluster's
    /// leader) or not (it is up), until `deadline`.
    fn wait(&mut self, linearizable: bool, deadline: Instant) -> Result<(), ServerError> {
        let probe = Store::new(&[self.endpoint()]).expect("a valid endpoint");
        let read = json!({ "key": "L2Nhc3Rvci9wcm9iZQ==", "serializable": !linearizable });
        while Instant::now() < deadline && self.running() {
            if probe.post("/v3/kv/range", &read).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ServerError::NoAnswer(self.log.clone()))
    }

    /// Waits until it serves its peer port (any answer to `GET /members`),
    /// at most `limit`: a new member asks its peers whether it was
    /// bootstrapped already, and one whose port is bound but not served yet
    /// holds it a second (etcd's bootstrap timeout) per peer.
    fn wait_peer(&mut self, limit: Duration) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(200)))
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{}/members", self.peer_url());
        let t = Instant::now();
        while t.elapsed() < limit && self.running() {
            if agent.get(&url).call().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(unused_port(false)?.port())
}

/// An unused loopback port (UDP or TCP) for a server started next, chosen
/// below the kernel's ephemeral range: a port the kernel hands out for
/// `:0` can be taken by any other process's outgoing socket (a QUIC
/// client's, an HTTP client's) between this probe and the server's bind —
/// tests running side by side hit that. Probes random ports from 10000 up
/// to the range's start; `:0` if none is free.
pub fn unused_port(udp: bool) -> std::io::Result<std::net::SocketAddr> {
    let probe = |port: u16| -> std::io::Result<std::net::SocketAddr> {
        let at = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if udp {
            std::net::UdpSocket::bind(at)?.local_addr()
        } else {
            TcpListener::bind(at)?.local_addr()
        }
    };
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral > 11000 {
        // A different start in each process, then a walk: cheap, and two
        // processes rarely probe the same ports in the same order.
        let span = u32::from(ephemeral - 10000);
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        // Never the same port twice in one process (the probe's socket is
        // closed again before the server binds it).
        static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..200u32 {
            let port =
                10000 + (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) % span) as u16;
            if given.contains(&port) {
                continue;
            }
            if let Ok(a) = probe(port) {
                given.push(port);
                return Ok(a);
            }
        }
    }
    probe(0)
}

impl EtcdServer {
    /// Starts etcd with its data and log under `dir`, and waits until it answers.
    pub fn start(dir: &Path) -> Result<EtcdServer, ServerError> {
        Self::start_on(dir, &[])
    }

    /// Starts etcd listening on 127.0.0.1 and on `also` (the same port).
    pub fn start_on(dir: &Path, also: &[IpAddr]) -> Result<EtcdServer, ServerError> {
        std::fs::create_dir_all(dir)?;
        let client = free_port()?;
        let peer = free_port()?;
        let mut s = EtcdServer {
            member: Member {
                name: "castor".into(),
                data: dir.join("data"),
                log: dir.join("etcd.log"),
                also: also.to_vec(),
                client,
                peer,
                initial_cluster: format!("castor=http://127.0.0.1:{peer}"),
                flags: Vec::new(),
                child: None,
            },
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        self.member.spawn()?;
        self.member.wait(true, Instant::now() + START_TIMEOUT)
    }

    /// Its client endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.member.endpoint()
    }

    /// Its log file.
    pub fn log(&self) -> PathBuf {
        self.member.log.clone()
    }

    /// Its client endpoint on `ip`, one of the addresses it was started on.
    pub fn endpoint_on(&self, ip: IpAddr) -> String {
        self.member.endpoint_on(ip)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.member.child.as_ref().map(Child::id)
    }

    /// Stops it (SIGKILL): the witness is down.
    pub fn kill(&mut self) {
        self.member.kill();
    }

    /// Starts it again on the same ports and data: the witness is back.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.spawn()
    }

    /// A client for VM `vm` on this etcd.
    pub fn client(&self, vm: &str) -> Result<Etcd, WitnessError> {
        Etcd::new(&[self.endpoint()], vm)
    }
}

/// A local etcd cluster of `n` members (n = 1, 3 or 5), each its own
/// process with its own data dir under `dir/mI` (`dir/mI/data`, its log
/// `dir/mI/etcd.log`), listening for clients on 127.0.0.1 and on every
/// address of `also` (same port), for peers on 127.0.0.1.
///
/// Timings suit a local cluster: heartbeats every 50 ms, elections after
/// 500 ms, so a leader's death costs about a second and etcd's minimum
/// lease TTL is 1 s. Every member is killed when it is dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts the `n` members and waits until a linearizable read answers
    /// through every one of them.
    pub fn start(dir: &Path, n: usize, also: &[IpAddr]) -> Result<EtcdCluster, ServerError> {
        if ![1, 3, 5].contains(&n) {
            return Err(ServerError::Size(n));
        }
        std::fs::create_dir_all(dir)?;
        let mut ports = Vec::with_capacity(n);
        for _ in 0..n {
            ports.push((free_port()?, free_port()?));
        }
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = cluster_token();
        let flags: Vec<String> = [
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &token,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .map(String::from)
        .to_vec();
        let mut c = EtcdCluster {
            members: ports
                .iter()
                .enumerate()
                .map(|(i, &(client, peer))| Member {
                    name: format!("m{i}"),
                    data: dir.join(format!("m{i}")).join("data"),
                    log: dir.join(format!("m{i}")).join("etcd.log"),
                    also: also.to_vec(),
                    client,
                    peer,
                    initial_cluster: initial_cluster.clone(),
                    flags: flags.clone(),
                    child: None,
                })
                .collect(),
        };
        // One after another, each once the previous one serves its peers
        // (see Member::wait_peer): all at once costs etcd up to a second
        // per peer.
        for m in &mut c.members {
            m.spawn()?;
            m.wait_peer(Duration::from_secs(2));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for m in &mut c.members {
            m.wait(true, deadline)?;
        }
        Ok(c)
    }

    /// The members' client endpoints, `http://127.0.0.1:PORT`, one per
    /// member in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// The members' client endpoints on `ip`, one of the addresses the
    /// cluster was started on.
    pub fn endpoints_on(&self, ip: IpAddr) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint_on(ip)).collect()
    }

    /// `etcd=URL,URL,URL` as castor's `--witness` flag takes it: the
    /// endpoints on `ip`, or on 127.0.0.1 for `None`.
    pub fn spec_on(&self, ip: Option<IpAddr>) -> String {
        let urls = match ip {
            Some(ip) => self.endpoints_on(ip),
            None => self.endpoints(),
        };
        format!("etcd={}", urls.join(","))
    }

    /// Stops member `i` (SIGKILL). Panics if there is no member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on the same ports and data, and waits until
    /// it answers: a linearizable read through it when a quorum of members
    /// runs, else (it cannot) a local one. Panics if there is no member `i`.
    pub fn restart(&mut self, i: usize) -> Result<(), ServerError> {
        self.members[i].spawn()?;
        let mut running = 0;
        for m in &mut self.members {
            running += usize::from(m.running());
        }
        let quorum = running > self.members.len() / 2;
        self.members[i].wait(quorum, Instant::now() + START_TIMEOUT)
    }

    /// Member `i`'s process id, while it runs. Panics if there is no
    /// member `i`.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// The member that leads the cluster now, as the members that answer
    /// see it (`/v3/maintenance/status`): `None` while there is no leader
    /// or no member answers.
    pub fn leader(&self) -> Option<usize> {
        let mut ids = Vec::with_capacity(self.members.len());
        let mut leader = None;
        for m in &self.members {
            let status = Store::new(&[m.endpoint()])
                .ok()
                .and_then(|s| s.post("/v3/maintenance/status", &json!({})).ok());
            // A 64-bit id is a JSON string in etcd's gateway, or a number.
            let id = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
            let me = status
                .as_ref()
                .and_then(|s| s.get("header"))
                .and_then(|h| h.get("member_id"))
                .and_then(id);
            ids.push(me);
            if leader.is_none() {
                leader = status
                    .as_ref()
                    .and_then(|s| s.get("leader"))
                    .and_then(id)
                    .filter(|l| l != "0");
            }
        }
        let leader = leader?;
        ids.iter()
            .position(|m| m.as_deref() == Some(leader.as_str()))
    }

    /// Makes member `i`'s disk slow: every `fsync`/`fdatasync` it makes
    /// takes `delay` longer (strace's syscall delay injection on all its
    /// threads), until the returned guard is dropped. etcd syncs its
    /// write-ahead log before it acknowledges a write, so every write the
    /// cluster commits through this member waits that long.
    pub fn slow_disk(&self, i: usize, delay: Duration) -> Result<SlowDisk, ServerError> {
        let pid = self.pid(i).ok_or_else(|| {
            ServerError::Io(std::io::Error::other(format!("member m{i} is not running")))
        })?;
        SlowDisk::attach(pid, delay, &self.members[i].log.with_extension("strace"))
    }

    /// Starts every member that is not running again (all at once: a
    /// member serves clients only once a quorum runs), and waits until a
    /// linearizable read answers through each.
    pub fn restart_all(&mut self) -> Result<(), ServerError> {
        for m in &mut self.members {
            if !m.running() {
                m.spawn()?;
            }
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for m in &mut self.members {
            m.wait(true, deadline)?;
        }
        Ok(())
    }

    /// How many members it has (killed ones included).
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Member `i`'s log file. Panics if there is no member `i`.
    pub fn log(&self, i: usize) -> PathBuf {
        self.members[i].log.clone()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

/// A token no other cluster started here has (`--initial-cluster-token`):
/// members of different clusters never join each other.
fn cluster_token() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "castor-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A process whose disk syncs are slowed ([`EtcdCluster::slow_disk`]): a
/// `strace` attached to it that delays each `fsync` and `fdatasync`.
/// Dropping it detaches strace (SIGINT), and the process runs at full speed
/// again.
#[derive(Debug)]
pub struct SlowDisk {
    strace: Child,
}

impl SlowDisk {
    fn attach(pid: u32, delay: Duration, log: &Path) -> Result<SlowDisk, ServerError> {
        let delay = format!("{}us", delay.as_micros().max(1));
        let strace = Command::new("strace")
            .args(["-f", "-qq", "-o"])
            .arg(log)
            .args(["-e", "trace=fsync,fdatasync"])
            .args([
                "-e",
                &format!("inject=fsync,fdatasync:delay_enter={delay}"),
                "-p",
                &pid.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ServerError::Io(std::io::Error::other(
                    "strace is not installed (apt-get install strace): it slows etcd's disk",
                )),
                _ => ServerError::Io(e),
            })?;
        let mut s = SlowDisk { strace };
        // strace attaches to every thread before it traces; give it a moment,
        // and fail if it could not attach at all.
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(Some(st)) = s.strace.try_wait() {
            return Err(ServerError::Io(std::io::Error::other(format!(
                "strace could not attach to process {pid}: {st}"
            ))));
        }
        Ok(s)
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        // SIGINT: strace detaches from every thread and exits.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.strace.id() as i32).expect("a child's pid"),
            rustix::process::Signal::INT,
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.strace.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}
