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
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
