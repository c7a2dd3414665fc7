//! A local single-member etcd for `castor demo`, drills and the tests:
//! Debian's `etcd-server` started on free loopback ports with its own data
//! directory, stopped when dropped. A real deployment runs its own etcd
//! cluster (one, three or five members) and gives castor the endpoints.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Etcd, WitnessError};

/// A running local etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    /// More addresses it listens on, beside 127.0.0.1.
    also: Vec<std::net::IpAddr>,
    client: u16,
    peer: u16,
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
    pub fn start_on(dir: &Path, also: &[std::net::IpAddr]) -> Result<EtcdServer, ServerError> {
        std::fs::create_dir_all(dir)?;
        let mut s = EtcdServer {
            child: None,
            dir: dir.to_path_buf(),
            also: also.to_vec(),
            client: free_port()?,
            peer: free_port()?,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let advertise = format!("http://127.0.0.1:{}", self.client);
        let mut client = advertise.clone();
        for ip in &self.also {
            client.push_str(&format!(",http://{ip}:{}", self.client));
        }
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "castor", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &advertise])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("castor={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ServerError::Missing(e),
                _ => ServerError::Io(e),
            })?;
        self.child = Some(child);
        let probe = Etcd::new(&[self.endpoint()], "probe").expect("a valid endpoint");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if probe.read().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ServerError::NoAnswer(self.log()))
    }

    /// Its client endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// Its log file.
    pub fn log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// Its client endpoint on `ip`, one of the addresses it was started on.
    pub fn endpoint_on(&self, ip: std::net::IpAddr) -> String {
        format!("http://{ip}:{}", self.client)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops it (SIGKILL): the witness is down.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data: the witness is back.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }

    /// A client for VM `vm` on this etcd.
    pub fn client(&self, vm: &str) -> Result<Etcd, WitnessError> {
        Etcd::new(&[self.endpoint()], vm)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
