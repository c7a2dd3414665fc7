//! The role processes an agent runs: `castor primary`, `castor backup` and
//! `castor primary --incoming`, one per VM at most, each with its own
//! control socket, console port, log file and image files.
//!
//! Child processes rather than threads of the agent: each role is the
//! daemon castor already ships, started with the same flags a person would
//! give it, so a fleet runs exactly what a hand-started pair runs. A
//! guest's fault, a fenced primary's exit or a role's crash ends one
//! process and no other VM; process-wide settings of a role (signal
//! handlers, vCPU nice values, real-time threads) stay its own; and the
//! agent can be upgraded without touching the code path of a checkpoint.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child as Process, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::keys::{ports, VmSpec};
use crate::plan::Kind;

/// How long a stopped role has to exit before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// Where an agent keeps its roles' files, and what every role is given.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The castor binary.
    pub castor: PathBuf,
    /// This host's name (its certificate's; the roles' `--node`).
    pub host: String,
    /// The address roles listen on.
    pub addr: IpAddr,
    /// The first port of the slots.
    pub port_base: u16,
    /// The `castor certs` directory.
    pub certs: PathBuf,
    /// `--witness` of every role.
    pub witness: String,
    /// Control sockets: DIR/VM.sock.
    pub run_dir: PathBuf,
    /// Images (RAM, generations, disks): DIR/VM/HOST.*.
    pub image_dir: PathBuf,
    /// Logs: DIR/VM.ROLE.log.
    pub log_dir: PathBuf,
    /// More flags for every role (e.g. `--vcpu-nice=5`).
    pub extra: Vec<String>,
    /// More flags for every backup (e.g. `--heartbeat-timeout-ms=100`).
    pub backup_extra: Vec<String>,
}

impl Layout {
    /// A VM's control socket here.
    pub fn control(&self, vm: &str) -> PathBuf {
        self.run_dir.join(format!("{vm}.sock"))
    }

    /// A VM's disk copy here.
    pub fn disk(&self, vm: &str) -> PathBuf {
        self.image_dir.join(vm).join(format!("{}.disk", self.host))
    }

    /// The VMs whose RAM image this host keeps (DIR/VM/HOST.ram).
    pub fn images(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(&self.image_dir) else {
            return out;
        };
        for d in dirs.flatten() {
            let ram = d.path().join(format!("{}.ram", self.host));
            if ram.exists() {
                if let Some(name) = d.file_name().to_str() {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        out
    }

    /// Removes this host's files of VMs the fleet no longer has (`keep`:
    /// the VMs it has); returns the VMs whose files went.
    pub fn remove_stale(&self, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut gone = Vec::new();
        for vm in self.images() {
            if keep(&vm) {
                continue;
            }
            let dir = self.image_dir.join(&vm);
            for ext in ["ram", "gen", "disk", "disk.castor-journal"] {
                let _ = std::fs::remove_file(dir.join(format!("{}.{ext}", self.host)));
            }
            // The directory goes when no other host's files are left in it.
            let _ = std::fs::remove_dir(&dir);
            gone.push(vm);
        }
        gone
    }

    fn common(&self, spec: &VmSpec, peer: &str) -> Vec<String> {
        let p = ports(self.port_base, spec.slot);
        let mut a = vec![
            "--certs".into(),
            self.certs.display().to_string(),
            "--node".into(),
            self.host.clone(),
            "--peer".into(),
            peer.into(),
            "--witness".into(),
            self.witness.clone(),
            "--vm".into(),
            spec.name.clone(),
            "--console".into(),
            SocketAddr::new(self.addr, p.console).to_string(),
            "--control".into(),
            self.control(&spec.name).display().to_string(),
            "--image-dir".into(),
            self.image_dir.display().to_string(),
            "--epoch-ms".into(),
            spec.epoch_ms.clone(),
        ];
        a.extend(self.extra.iter().cloned());
        a
    }

    fn guest(&self, spec: &VmSpec) -> Vec<String> {
        let mut a = vec![
            "--mem".into(),
            format!("{}M", spec.mem_bytes >> 20),
            "--vcpus".into(),
            spec.vcpus.to_string(),
        ];
        match &spec.kernel {
            Some(k) => {
                a.extend(["--kernel".into(), k.display().to_string()]);
                if !spec.cmdline.is_empty() {
                    a.extend(["--cmdline".into(), spec.cmdline.clone()]);
                }
                if let Some(i) = &spec.initrd {
                    a.extend(["--initrd".into(), i.display().to_string()]);
                }
            }
            None => a.extend(["--workload".into(), spec.workload.clone()]),
        }
        a
    }

    /// A disk copy of the VM's size here, made sparse if missing.
    fn ensure_disk(&self, spec: &VmSpec) -> std::io::Result<Option<PathBuf>> {
        let Some(bytes) = spec.disk_bytes else {
            return Ok(None);
        };
        let path = self.disk(&spec.name);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        if f.metadata()?.len() != bytes {
            f.set_len(bytes)?;
        }
        Ok(Some(path))
    }

    /// The flags of `castor ROLE …` for this VM.
    pub fn args(
        &self,
        spec: &VmSpec,
        kind: &Kind,
        backup: Option<&(String, SocketAddr)>,
    ) -> std::io::Result<Vec<String>> {
        let p = ports(self.port_base, spec.slot);
        let disk = self.ensure_disk(spec)?;
        let mut a: Vec<String> = Vec::new();
        match kind {
            Kind::Primary | Kind::Incoming { .. } => {
                a.push("primary".into());
                let peer = backup.map_or("none", |b| b.0.as_str());
                a.extend(self.common(spec, peer));
                if let Some((_, at)) = backup {
                    a.extend(["--backup".into(), at.to_string()]);
                }
                if let Kind::Incoming { from } = kind {
                    a.extend([
                        "--incoming".into(),
                        SocketAddr::new(self.addr, p.quic).to_string(),
                        "--incoming-from".into(),
                        from.clone(),
                    ]);
                } else {
                    a.extend(self.guest(spec));
                }
            }
            Kind::Backup { peer } => {
                a.push("backup".into());
                a.extend(self.common(spec, peer));
                a.extend([
                    "--listen".into(),
                    SocketAddr::new(self.addr, p.quic).to_string(),
                    "--reuse".into(),
                ]);
                a.extend(self.backup_extra.iter().cloned());
            }
        }
        if let Some(d) = disk {
            a.extend(["--disk".into(), d.display().to_string()]);
        }
        Ok(a)
    }
}

/// One running role.
#[derive(Debug)]
pub struct Running {
    /// What it is.
    pub kind: Kind,
    /// The process.
    pub process: Process,
    /// Its log.
    pub log: PathBuf,
    /// When it was asked to stop.
    pub stopping: Option<Instant>,
}

/// The roles this agent runs, by VM.
#[derive(Debug, Default)]
pub struct Children {
    /// By VM.
    pub by_vm: BTreeMap<String, Running>,
}

fn role_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Primary => "primary",
        Kind::Backup { .. } => "backup",
        Kind::Incoming { .. } => "incoming",
    }
}

impl Children {
    /// Starts `kind` of `spec`.
    pub fn start(
        &mut self,
        layout: &Layout,
        spec: &VmSpec,
        kind: Kind,
        backup: Option<&(String, SocketAddr)>,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&layout.log_dir)?;
        let log = layout
            .log_dir
            .join(format!("{}.{}.log", spec.name, role_name(&kind)));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let args = layout.args(spec, &kind, backup)?;
        let process = Command::new(&layout.castor)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        info!(
            vm = spec.name,
            role = role_name(&kind),
            pid = process.id(),
            log = %log.display(),
            "started: castor {}",
            args.join(" ")
        );
        self.by_vm.insert(
            spec.name.clone(),
            Running {
                kind,
                process,
                log,
                stopping: None,
            },
        );
        Ok(())
    }

    /// Asks `vm`'s role to stop (SIGTERM), once.
    pub fn stop(&mut self, vm: &str, why: &str) {
        let Some(r) = self.by_vm.get_mut(vm) else {
            return;
        };
        if r.stopping.is_some() {
            return;
        }
        info!(
            vm,
            role = role_name(&r.kind),
            pid = r.process.id(),
            "stopping: {why}"
        );
        signal(&r.process, rustix::process::Signal::TERM);
        r.stopping = Some(Instant::now());
    }

    /// Reaps the roles that exited (and kills those that outlived their
    /// stop's grace); returns the VMs whose role ended.
    pub fn reap(&mut self) -> Vec<(String, String)> {
        let mut gone = Vec::new();
        for (vm, r) in self.by_vm.iter_mut() {
            match r.process.try_wait() {
                Ok(Some(status)) => {
                    let how = status.to_string();
                    if r.stopping.is_some() || status.success() {
                        info!(vm, role = role_name(&r.kind), "exited: {how}");
                    } else {
                        warn!(
                            vm,
                            role = role_name(&r.kind),
                            log = %r.log.display(),
                            "exited unasked: {how}"
                        );
                    }
                    gone.push((vm.clone(), how));
                }
                Ok(None) => {
                    if r.stopping.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                        warn!(vm, "did not stop within {STOP_GRACE:?}: killed");
                        let _ = r.process.kill();
                    }
                }
                Err(e) => warn!(vm, "waiting for its role: {e}"),
            }
        }
        for (vm, _) in &gone {
            self.by_vm.remove(vm);
        }
        gone
    }

    /// Stops every role and waits for them (the agent's own stop).
    pub fn stop_all(&mut self, grace: Duration) {
        let vms: Vec<String> = self.by_vm.keys().cloned().collect();
        for vm in &vms {
            self.stop(vm, "the agent stops");
        }
        let t = Instant::now();
        while !self.by_vm.is_empty() && t.elapsed() < grace {
            self.reap();
            std::thread::sleep(Duration::from_millis(50));
        }
        for r in self.by_vm.values_mut() {
            let _ = r.process.kill();
            let _ = r.process.wait();
        }
        self.by_vm.clear();
    }
}

fn signal(p: &Process, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(p.id() as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}
