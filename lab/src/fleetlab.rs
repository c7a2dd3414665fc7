//! A fleet on one machine, for the tests, `castor demo --fleet` and
//! `castor bench --fleet`: each host an agent in a network namespace of
//! its own, on one bridge with a three-member etcd in the root namespace.
//!
//! ```text
//!   root namespace: etcd ×3 on 10.214.N.254, the lab, console clients
//!       bridge cflNbr 10.214.N.254/24
//!        ├─ veth ─ namespace cflNh0: 10.214.N.1, castor agent --host h0
//!        ├─ veth ─ namespace cflNh1: 10.214.N.2, castor agent --host h1
//!        └─ …
//! ```
//!
//! A host is lost by killing every process of its namespace (agent and
//! roles, SIGKILL) and taking its link down; it returns with its link up
//! and a new agent, its image files (tmpfs) still there.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent::keys::{FleetView, VmLine};
use anyhow::{bail, Context, Result};
use witness::server::EtcdCluster;
use witness::store::Store;

use crate::netlab::{ip, link_exists, netns_exists};

/// One host of the lab.
#[derive(Debug)]
pub struct Host {
    /// Its name (`h0`, `h1`, …).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its address.
    pub addr: IpAddr,
    /// The root namespace's end of its link.
    pub veth: String,
    /// Its agent, while it runs.
    pub agent: Option<Child>,
}

/// The lab.
pub struct FleetLab {
    /// Its directory (certificates, logs, images, etcd's data).
    pub dir: PathBuf,
    /// The hosts.
    pub hosts: Vec<Host>,
    /// etcd.
    pub etcd: EtcdCluster,
    bridge: String,
    bridge_ip: IpAddr,
    castor: PathBuf,
    /// Flags of every agent started.
    pub agent_flags: Vec<String>,
}

/// A lab's settings.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Hosts.
    pub hosts: usize,
    /// etcd members (1 or 3).
    pub etcd_members: usize,
    /// RAM each host offers.
    pub host_mem: u64,
    /// More flags for every agent.
    pub agent_flags: Vec<String>,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            hosts: 3,
            etcd_members: 3,
            host_mem: 1 << 30,
            agent_flags: Vec::new(),
        }
    }
}

impl FleetLab {
    /// Makes the namespaces, the bridge, the certificates (one CA, one per
    /// host) and etcd, and starts an agent on every host (needs root).
    pub fn start(dir: &Path, spec: &FleetSpec) -> Result<FleetLab> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() + 7 * NEXT.fetch_add(1, Ordering::Relaxed)) % 250;
        let bridge = format!("cfl{n}br");
        let bridge_ip = IpAddr::V4(Ipv4Addr::new(10, 214, n as u8, 254));
        std::fs::create_dir_all(dir)?;
        let names: Vec<String> = (0..spec.hosts).map(|i| format!("h{i}")).collect();
        let castor = crate::pair::castor_exe()?;
        let certs = dir.join("certs");
        let out = Command::new(&castor)
            .args(["certs", "--dir"])
            .arg(&certs)
            .args(["--nodes", &names.join(",")])
            .output()?;
        if !out.status.success() {
            bail!("castor certs: {}", String::from_utf8_lossy(&out.stderr));
        }
        if link_exists(&bridge) {
            let _ = ip(&["link", "del", "dev", &bridge]);
        }
        ip(&["link", "add", "name", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{bridge_ip}/24"), "dev", &bridge])?;
        ip(&["link", "set", "dev", &bridge, "up"])?;
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let ns = format!("cfl{n}{name}");
            let veth = format!("cfl{n}{name}");
            // What a lab killed before its clean-up left behind.
            if netns_exists(&ns) {
                kill_ns(&ns);
                let _ = ip(&["netns", "del", &ns]);
            }
            if link_exists(&veth) {
                let _ = ip(&["link", "del", "dev", &veth]);
            }
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", "dev", &veth, "master", &bridge])?;
            ip(&["link", "set", "dev", &veth, "up"])?;
            let addr = IpAddr::V4(Ipv4Addr::new(10, 214, n as u8, i as u8 + 1));
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            hosts.push(Host {
                name: name.clone(),
                ns,
                addr,
                veth,
                agent: None,
            });
        }
        let etcd = EtcdCluster::start(&dir.join("etcd"), spec.etcd_members, &[bridge_ip])
            .context("starting etcd")?;
        let mut flags = vec!["--mem".to_string(), format!("{}M", spec.host_mem >> 20)];
        flags.extend(spec.agent_flags.iter().cloned());
        let mut lab = FleetLab {
            dir: dir.to_path_buf(),
            hosts,
            etcd,
            bridge,
            bridge_ip,
            castor,
            agent_flags: flags,
        };
        for i in 0..lab.hosts.len() {
            lab.start_agent(i)?;
        }
        Ok(lab)
    }

    /// `etcd=URL,…` on the bridge.
    pub fn witness(&self) -> String {
        self.etcd.spec_on(Some(self.bridge_ip))
    }

    /// A client of the fleet's etcd.
    pub fn store(&self) -> Result<Store> {
        Ok(Store::new(&self.etcd.endpoints())?)
    }

    /// The fleet now.
    pub fn view(&self) -> Result<FleetView> {
        Ok(FleetView::read(&self.store()?)?)
    }

    /// Every VM as `castor vm list` shows it.
    pub fn vms(&self) -> Result<Vec<VmLine>> {
        Ok(agent::keys::vm_lines(&self.view()?))
    }

    /// Host `i`'s log directory.
    pub fn host_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.hosts[i].name)
    }

    /// Starts host `i`'s agent.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let h = &self.hosts[i];
        let hd = self.dir.join(&h.name);
        std::fs::create_dir_all(&hd)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(hd.join("agent.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(&self.castor)
            .args(["agent", "--host", &h.name, "--addr", &h.addr.to_string()])
            .args(["--witness", &self.witness()])
            .arg("--certs")
            .arg(self.dir.join("certs"))
            .arg("--run-dir")
            .arg(hd.join("run"))
            .arg("--control")
            .arg(hd.join("agent.sock"))
            .arg("--image-dir")
            .arg(self.image_dir())
            .arg("--log-dir")
            .arg(hd.join("logs"))
            .args(&self.agent_flags)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting an agent")?;
        self.hosts[i].agent = Some(child);
        Ok(())
    }

    /// Where the hosts keep images (one tmpfs directory: files are named
    /// by host).
    pub fn image_dir(&self) -> PathBuf {
        let d = Path::new("/dev/shm").join(format!(
            "castor-fleet-{}",
            self.dir
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("lab")
        ));
        let _ = std::fs::create_dir_all(&d);
        d
    }

    /// Loses host `i`: every process of its namespace killed (SIGKILL), its
    /// link down.
    pub fn kill_host(&mut self, i: usize) -> Result<()> {
        ip(&["link", "set", "dev", &self.hosts[i].veth, "down"])?;
        kill_ns(&self.hosts[i].ns);
        if let Some(mut c) = self.hosts[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Host `i` returns: its link up, a new agent.
    pub fn return_host(&mut self, i: usize) -> Result<()> {
        ip(&["link", "set", "dev", &self.hosts[i].veth, "up"])?;
        self.start_agent(i)
    }

    /// Runs `castor ARGS… --witness …` (a fleet command) and returns its
    /// standard output, or its error.
    pub fn castor(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.castor)
            .args(args)
            .args(["--witness", &self.witness()])
            .output()?;
        if !out.status.success() {
            bail!(
                "castor {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `ok` holds of the VMs, or `timeout`.
    pub fn wait_vms(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&[VmLine]) -> bool,
    ) -> Result<Duration> {
        let t = Instant::now();
        let mut last = Vec::new();
        while t.elapsed() < timeout {
            if let Ok(v) = self.vms() {
                if ok(&v) {
                    return Ok(t.elapsed());
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{what}: not within {timeout:?}; the VMs: {}",
            describe(&last)
        )
    }

    /// Index of the host named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }
}

/// A VM is served by a primary whose backup holds a committed checkpoint.
pub fn protected(v: &VmLine) -> bool {
    v.report.as_ref().is_some_and(|r| {
        r.protected && Some(&r.host) == v.placement.primary.as_ref() && v.placement.backup.is_some()
    }) && v.health == node::fleet::Health::Protected
}

/// One line per VM, for messages.
pub fn describe(vms: &[VmLine]) -> String {
    vms.iter()
        .map(|v| {
            format!(
                "{}: {:?} p={} b={} m={} owner={} report={}",
                v.name,
                v.health,
                v.placement.primary.as_deref().unwrap_or("-"),
                v.placement.backup.as_deref().unwrap_or("-"),
                v.placement.moving_to.as_deref().unwrap_or("-"),
                v.owner
                    .as_ref()
                    .map_or("-".into(), |o| format!("{}/{}", o.0, o.1)),
                v.report.as_ref().map_or("-".into(), |r| format!(
                    "{}:{}{}",
                    r.host,
                    r.role,
                    if r.protected { " protected" } else { "" }
                ))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn kill_ns(ns: &str) {
    for _ in 0..3 {
        let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
            return;
        };
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids.into_iter().filter_map(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for FleetLab {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some(mut c) = h.agent.take() {
                // SIGTERM first: the agent stops its roles.
                if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(5) {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            kill_ns(&h.ns);
            let _ = ip(&["netns", "del", &h.ns]);
            if link_exists(&h.veth) {
                let _ = ip(&["link", "del", "dev", &h.veth]);
            }
        }
        let _ = ip(&["link", "del", "dev", &self.bridge]);
        let _ = std::fs::remove_dir_all(self.image_dir());
    }
}
