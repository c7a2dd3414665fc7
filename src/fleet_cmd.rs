//! `castor agent`, `castor vm …`, `castor host …` and `castor protect`:
//! the fleet's commands. The agent's work is in the `agent` crate; here
//! are its flags and the operators' reads and writes of the desired state,
//! every write a create-only or a compare-and-swap so that two operators
//! never lose each other's change.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent::keys::{self, FleetView, VmSpec};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lab::cli::parse_size;
use tracing::info;
use witness::store::Store;

#[derive(Args)]
pub struct EtcdArg {
    /// The fleet's etcd (the witness's): `etcd=http://HOST:PORT[,http://HOST:PORT…]`,
    /// every member.
    #[arg(long, value_parser = witness::parse_spec, value_name = "etcd=URLS")]
    witness: witness::Spec,
}

impl EtcdArg {
    fn store(&self) -> Result<Store> {
        match &self.witness {
            witness::Spec::Etcd(e) => Ok(Store::new(e)?),
            witness::Spec::None => {
                bail!("a fleet keeps its state in etcd: give --witness etcd=URLS")
            }
        }
    }
}

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    etcd: EtcdArg,
    /// This host's name: its certificate is NAME.pem / NAME.key in --certs,
    /// and it is the owner's name at the witness for the VMs it runs.
    #[arg(long)]
    host: String,
    /// The address this host's roles listen on (its replication and console
    /// ports). Default: the address of the default route.
    #[arg(long)]
    addr: Option<std::net::IpAddr>,
    /// Directory made by `castor certs` (one CA; a certificate per host).
    #[arg(long)]
    certs: PathBuf,
    /// Failure-domain label (rack, zone): a VM's backup is placed in another
    /// domain than its primary when one has room.
    #[arg(long, default_value = "")]
    domain: String,
    /// RAM this host offers to VMs, primaries and backups alike (a backup
    /// keeps a replica). Default: 3/4 of MemTotal.
    #[arg(long, value_parser = parse_size)]
    mem: Option<u64>,
    /// vCPUs this host offers to primaries. Default: 4 per core.
    #[arg(long)]
    vcpus: Option<u32>,
    /// The first of the ports the roles use: a VM in slot N listens on
    /// BASE+2N (QUIC) and BASE+2N+1 (console) on every host that holds one
    /// of its roles. Every host of a fleet must use the same base.
    #[arg(long, default_value_t = 7400)]
    port_base: u16,
    /// The roles' control sockets (DIR/VM.sock).
    #[arg(long, default_value = "/run/castor/fleet")]
    run_dir: PathBuf,
    /// The VMs' images (RAM, generations, disks): DIR/VM/HOST.* — tmpfs is
    /// a good place; they outlive the roles, so a host that returns
    /// resyncs its backups by reuse.
    #[arg(long, default_value = vmm::image::DEFAULT_DIR)]
    image_dir: PathBuf,
    /// The agent's control socket (`castor status --control PATH [--vm
    /// NAME]`). Default: /run/castor/agent-HOST.sock.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The roles' logs (DIR/VM.ROLE.log).
    #[arg(long, default_value = "/var/log/castor")]
    log_dir: PathBuf,
    /// Seconds a host stays in the fleet after its agent last renewed its
    /// lease: a lost host's backups are replaced this long after it is lost
    /// (its primaries are taken over at once by their backups, which does
    /// not wait for this).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    lease_ttl: u64,
    /// How often the agent reads the fleet, ms.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=10_000))]
    tick_ms: u64,
    /// Rebalancing moves the leader starts per tick.
    #[arg(long, default_value_t = 2)]
    max_moves: usize,
    /// A flag for every role this agent starts (repeat it), e.g.
    /// `--role-flag=--vcpu-nice=5`.
    #[arg(long = "role-flag", value_name = "FLAG", allow_hyphen_values = true)]
    role_flags: Vec<String>,
    /// A flag for every backup this agent starts (repeat it), e.g.
    /// `--backup-flag=--heartbeat-timeout-ms=100`.
    #[arg(long = "backup-flag", value_name = "FLAG", allow_hyphen_values = true)]
    backup_flags: Vec<String>,
}

pub fn agent(a: AgentArgs) -> Result<()> {
    if !keys::valid_name(&a.host) {
        bail!(
            "--host {}: a host's name is a DNS label (a-z, 0-9, -)",
            a.host
        );
    }
    let endpoints = match &a.etcd.witness {
        witness::Spec::Etcd(e) => e.clone(),
        witness::Spec::None => bail!("a fleet keeps its state in etcd: give --witness etcd=URLS"),
    };
    // The certificate is checked now: a host that cannot be paired with is
    // refused before it registers.
    transport::NodeTls::from_dir(&a.certs, &a.host, &a.host)
        .with_context(|| format!("the certificate of host {}", a.host))?;
    let addr = match a.addr {
        Some(a) => a,
        None => agent::default_addr().context("no default route: give --addr")?,
    };
    let mem = match a.mem {
        Some(m) => m,
        None => super::host_memory()? / 4 * 3,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    for d in [&a.run_dir, &a.image_dir, &a.log_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("making {}", d.display()))?;
    }
    let cfg = agent::Config {
        layout: agent::children::Layout {
            castor: std::env::current_exe().context("the castor binary's path")?,
            host: a.host.clone(),
            addr,
            port_base: a.port_base,
            certs: a.certs.clone(),
            witness: format!("etcd={}", endpoints.join(",")),
            run_dir: a.run_dir.clone(),
            image_dir: a.image_dir.clone(),
            log_dir: a.log_dir.clone(),
            extra: a.role_flags.clone(),
            backup_extra: a.backup_flags.clone(),
        },
        endpoints,
        domain: a.domain.clone(),
        mem_bytes: mem,
        vcpus: a.vcpus.unwrap_or(cores * 4),
        lease_ttl: Duration::from_secs(a.lease_ttl),
        tick: Duration::from_millis(a.tick_ms),
        control: a
            .control
            .clone()
            .unwrap_or_else(|| node::control::default_path(&format!("agent-{}", a.host))),
        policy: node::fleet::Policy {
            max_moves: a.max_moves,
            ..Default::default()
        },
    };
    let stop = super::stop_flag()?;
    agent::run(cfg, stop)?;
    Ok(())
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum VmCommand {
    /// Ask for a new protected VM: the fleet boots it on one host and backs
    /// it up on another. Refused if the name exists (two operators creating
    /// one name at once: exactly one wins).
    Create(CreateArgs),
    /// Delete a VM: its roles stop on every host (its guest is lost).
    Delete(DeleteArgs),
    /// Every VM: its hosts and roles, protected or not, its last failover,
    /// pause and bytes figures.
    List(ListArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    etcd: EtcdArg,
    /// The VM's name (a DNS label).
    name: String,
    /// Guest RAM, e.g. 64M.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: u32,
    /// Workload of castor's guest (see `castor run --help`).
    #[arg(long, default_value = "counter", value_parser = super::parse_workload)]
    workload: guest::Workload,
    /// Boot this kernel instead (the same path on every host).
    #[arg(long, conflicts_with = "workload")]
    kernel: Option<PathBuf>,
    /// Its command line.
    #[arg(long, requires = "kernel", default_value = "")]
    cmdline: String,
    /// Its initramfs.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Give it a disk of this size (each host keeps its copy beside the
    /// VM's image), e.g. 64M.
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    /// Its primary's --epoch-ms.
    #[arg(long, default_value = "25")]
    epoch_ms: String,
}

pub fn vm(c: VmCommand) -> Result<()> {
    match c {
        VmCommand::Create(a) => create(a),
        VmCommand::Delete(a) => delete(a),
        VmCommand::List(a) => list(a),
    }
}

fn create(a: CreateArgs) -> Result<()> {
    if !keys::valid_name(&a.name) {
        bail!(
            "{}: a VM's name is a DNS label (a-z, 0-9, -, at most 63)",
            a.name
        );
    }
    if a.disk.is_some_and(|d| d == 0 || d % 4096 != 0) {
        bail!("--disk: a disk is a whole number of 4 KiB blocks");
    }
    super::epoch_flags::parse_epoch_ms(&a.epoch_ms).map_err(anyhow::Error::msg)?;
    vmm::memory::layout(a.mem)?;
    let store = a.etcd.store()?;
    let workload = a.workload.to_string();
    for _ in 0..64 {
        let view = FleetView::read(&store)?;
        if view.vms.contains_key(&a.name) {
            bail!("a VM named {} exists already (castor vm list)", a.name);
        }
        let slot = view
            .free_slot()
            .context("every port slot is taken: delete a VM first")?;
        // The slot first (create-only): two creates never share one.
        if !store.create(&keys::slot_key(slot), a.name.as_bytes(), None)? {
            continue;
        }
        let spec = VmSpec {
            name: a.name.clone(),
            slot,
            mem_bytes: a.mem,
            vcpus: a.vcpus,
            workload: workload.clone(),
            kernel: a.kernel.clone(),
            cmdline: a.cmdline.clone(),
            initrd: a.initrd.clone(),
            disk_bytes: a.disk,
            epoch_ms: a.epoch_ms.clone(),
        };
        let value = serde_json::to_vec(&spec)?;
        if store.create(&keys::vm_key(&a.name), &value, None)? {
            info!(vm = a.name, slot, "created");
            println!(
                "created {} ({} MiB, {} vCPU, slot {slot}): the fleet boots it and backs it up",
                a.name,
                a.mem >> 20,
                a.vcpus
            );
            return Ok(());
        }
        let _ = store.delete(&keys::slot_key(slot));
        bail!(
            "a VM named {} was created by someone else meanwhile",
            a.name
        );
    }
    bail!("the fleet's slots kept changing; try again")
}

#[derive(Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    etcd: EtcdArg,
    /// The VM.
    name: String,
}

fn delete(a: DeleteArgs) -> Result<()> {
    let store = a.etcd.store()?;
    let key = keys::vm_key(&a.name);
    let Some(kv) = store.get(&key)? else {
        bail!("no VM named {}", a.name);
    };
    if !store.delete_if(&key, kv.mod_revision)? {
        bail!("{} changed meanwhile; look again (castor vm list)", a.name);
    }
    println!("deleted {}: its roles stop on every host", a.name);
    Ok(())
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    etcd: EtcdArg,
    /// One line of JSON per VM instead of a table.
    #[arg(long)]
    json: bool,
}

fn list(a: ListArgs) -> Result<()> {
    let store = a.etcd.store()?;
    let view = FleetView::read(&store)?;
    let lines = keys::vm_lines(&view);
    if a.json {
        for l in &lines {
            println!("{}", serde_json::to_string(l)?);
        }
        return Ok(());
    }
    println!(
        "{:<12} {:<12} {:<10} {:<10} {:<10} {:>9} {:>10} {:>11}  last failover",
        "VM", "health", "primary", "backup", "moving to", "pause p50", "bytes/ep", "console"
    );
    for l in &lines {
        let r = l.report.as_ref();
        println!(
            "{:<12} {:<12} {:<10} {:<10} {:<10} {:>9} {:>10} {:>11}  {}",
            l.name,
            format!("{:?}", l.health).to_lowercase(),
            l.placement.primary.as_deref().unwrap_or("-"),
            l.placement.backup.as_deref().unwrap_or("-"),
            l.placement.moving_to.as_deref().unwrap_or("-"),
            r.map_or("-".into(), |r| format!("{:.2} ms", r.pause_p50_us / 1e3)),
            r.map_or("-".into(), |r| format!("{:.0}", r.bytes_per_epoch)),
            r.map_or("-".into(), |r| r.console.to_string()),
            r.and_then(|r| r.failover.as_ref())
                .map_or("-".into(), |f| format!(
                    "{} → {} at {} ms",
                    f.from, f.to, f.at_unix_ms
                )),
        );
    }
    for k in &view.unreadable {
        println!("(unreadable key: {k})");
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum HostCommand {
    /// Every host: alive or lost, drained, capacity, roles, images.
    List(HostListArgs),
    /// Move every role off a host (its primaries by live migration, its
    /// backups elsewhere), waiting until it holds none.
    Drain(DrainArgs),
    /// Let a drained host take roles again.
    Undrain(DrainArgs),
}

#[derive(Args)]
pub struct HostListArgs {
    #[command(flatten)]
    etcd: EtcdArg,
}

#[derive(Args)]
pub struct DrainArgs {
    #[command(flatten)]
    etcd: EtcdArg,
    /// The host.
    host: String,
    /// Return at once instead of waiting until the host holds no role.
    #[arg(long)]
    no_wait: bool,
    /// The longest wait.
    #[arg(long, default_value = "10m", value_parser = lab::cli::parse_duration)]
    timeout: Duration,
}

pub fn host(c: HostCommand) -> Result<()> {
    match c {
        HostCommand::List(a) => host_list(a),
        HostCommand::Drain(a) => drain(a, true),
        HostCommand::Undrain(a) => drain(a, false),
    }
}

fn host_list(a: HostListArgs) -> Result<()> {
    let store = a.etcd.store()?;
    let view = FleetView::read(&store)?;
    let leader = view.leader.as_ref().map(|l| l.value.clone());
    println!(
        "{:<10} {:<6} {:<16} {:<8} {:>9} {:>6} {:>5} {:>5}  images",
        "host", "state", "addr", "domain", "mem MiB", "vcpus", "prim", "back"
    );
    for h in view.host_views() {
        let count = |f: fn(&node::fleet::Assignment) -> &Option<String>| {
            view.placements
                .values()
                .filter(|a| f(&a.value).as_deref() == Some(h.name.as_str()))
                .count()
        };
        let rec = view.hosts.get(&h.name);
        println!(
            "{:<10} {:<6} {:<16} {:<8} {:>9} {:>6} {:>5} {:>5}  {}{}",
            h.name,
            match (h.alive, h.drained) {
                (false, _) => "LOST",
                (true, true) => "drain",
                (true, false) => "up",
            },
            rec.map_or("-".into(), |r| r.addr.to_string()),
            if h.domain.is_empty() { "-" } else { &h.domain },
            h.mem_bytes >> 20,
            h.vcpus,
            count(|a| &a.primary),
            count(|a| &a.backup),
            h.images.iter().cloned().collect::<Vec<_>>().join(","),
            if leader.as_deref() == Some(h.name.as_str()) {
                "  (leader)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn drain(a: DrainArgs, on: bool) -> Result<()> {
    let store = a.etcd.store()?;
    let key = keys::drain_key(&a.host);
    if !on {
        store.delete(&key)?;
        println!("{} takes roles again", a.host);
        return Ok(());
    }
    store.put(&key, b"drained", None)?;
    println!(
        "{}: draining (its primaries move by live migration, its backups elsewhere)",
        a.host
    );
    if a.no_wait {
        return Ok(());
    }
    let t = Instant::now();
    let mut last = usize::MAX;
    loop {
        let view = FleetView::read(&store)?;
        let held: Vec<String> = view
            .placements
            .iter()
            .filter(|(_, p)| {
                let p = &p.value;
                [&p.primary, &p.backup]
                    .into_iter()
                    .any(|r| r.as_deref() == Some(a.host.as_str()))
            })
            .map(|(vm, _)| vm.clone())
            .collect();
        if held.is_empty() {
            println!(
                "{} is drained: it holds no role ({:.1} s)",
                a.host,
                t.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if held.len() != last {
            println!("  {} role(s) left: {}", held.len(), held.join(", "));
            last = held.len();
        }
        if t.elapsed() > a.timeout {
            bail!(
                "{} still holds {} role(s) after {:?}: {}",
                a.host,
                held.len(),
                a.timeout,
                held.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[derive(Args)]
pub struct ProtectArgs {
    /// The primary's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "node")]
    control: Option<PathBuf>,
    /// The primary's node name: its control socket is /run/castor/NODE.sock.
    #[arg(long)]
    node: Option<String>,
    /// Where the new backup listens.
    #[arg(long)]
    to: std::net::SocketAddr,
    /// The new backup's node name (its certificate's).
    #[arg(long)]
    peer: String,
}

pub fn protect(a: ProtectArgs) -> Result<()> {
    let path = match (&a.control, &a.node) {
        (Some(p), _) => p.clone(),
        (None, Some(n)) => node::control::default_path(n),
        (None, None) => bail!("say which primary: --control PATH or --node NAME"),
    };
    let req = node::control::Request::Protect(node::control::ProtectRequest {
        to: a.to,
        peer: a.peer,
    });
    match node::control::request(&path, &req, Duration::from_secs(30))? {
        node::control::Response::Ok(s) => {
            println!("{s}");
            Ok(())
        }
        node::control::Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}
