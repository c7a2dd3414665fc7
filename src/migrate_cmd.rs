//! The live-migration commands.
//!
//! - `castor migrate`: asks a running primary daemon (its control socket)
//!   to move its guest to a destination; answers with the report.
//! - `castor migrate-listen`: a destination: waits for one incoming guest,
//!   runs it and serves its console, and may move it on (`--to`), so a
//!   chain of listeners moves one guest back and forth.
//! - `castor migrate-run`: the lab flow: boots castor's guest (like `castor
//!   run`) and moves it after `--after`, without a daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lab::cli::{parse_duration, parse_rate, parse_size, parse_workload, LinkRate};
use node::console::ConsoleLog;
use tracing::{error, info, warn};
use vmm::console::{Console, MMIO_CONSOLE_BASE};
use vmm::{ExitReason, Machine, MachineConfig};

use migrate::dest::{DestConfig, Postcopy};
use migrate::plan::PlanConfig;
use migrate::SourceConfig;

/// The node's identity on the pair's mutual-TLS channel.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// Directory made by `castor certs`.
    #[arg(long)]
    pub certs: PathBuf,
    /// This node's name (its certificate is NODE.pem / NODE.key).
    #[arg(long)]
    pub node: String,
    /// The only name the other node's certificate may have.
    #[arg(long)]
    pub peer: String,
}

/// Where and when to move the guest (the lab flow and a listener).
#[derive(clap::Args, Debug, Clone)]
pub struct OutArgs {
    /// Move the guest to the node listening here (`castor migrate-listen`).
    #[arg(long)]
    pub to: Option<SocketAddr>,
    /// Start moving it this long after it started running here.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub after: Duration,
    #[command(flatten)]
    pub how: MoveArgs,
}

/// How to move the guest.
#[derive(clap::Args, Debug, Clone)]
pub struct MoveArgs {
    /// How pages are encoded: fgbi, xbzrle or remus (whole pages).
    #[arg(long, default_value = "fgbi")]
    pub mode: fgbi::Mode,
    /// fgbi block size (64..=1024, a power of two).
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// The longest stall allowed: pre-copy stops when the predicted
    /// stop-and-copy fits (e.g. 50ms).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub max_downtime: Duration,
    /// Never switch to post-copy: a migration that does not converge stops
    /// anyway after the planner gives up (or --max-rounds), with a longer
    /// stall (it says how long to expect).
    ///
    /// Post-copy runs the guest on the destination before all its memory
    /// arrived: from the switch until the last page is in, a failure of
    /// EITHER node (or of the link) loses the VM. Forbid it when that risk
    /// is worse than a long stall.
    #[arg(long)]
    pub no_postcopy: bool,
    /// Do not send a digest of the source's RAM at a pre-copy switch (the
    /// destination then runs the guest without checking its memory). The
    /// digest reads all of RAM in the pause: ~20-40 ms for 256 MiB here.
    #[arg(long)]
    pub no_verify: bool,
    /// Memory fgbi / xbzrle may keep about the destination's RAM during
    /// the migration (default: the guest's RAM size: a copy of every page
    /// sent, so a rewritten page is compared with its copy).
    #[arg(long, value_parser = parse_size)]
    pub budget: Option<u64>,
    /// Most pre-copy rounds.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Emulated link: limit the migration traffic to this rate (e.g. 1gbit).
    #[arg(long, default_value = "none", value_parser = parse_rate)]
    pub link_rate: LinkRate,
    /// Emulated link: one-way delay on the messages that end a step.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub link_delay: Duration,
}

impl MoveArgs {
    fn source_config(&self, node: &str) -> SourceConfig {
        SourceConfig {
            node: node.to_string(),
            mode: self.mode,
            block_size: self.block_size,
            plan: PlanConfig {
                max_downtime: self.max_downtime,
                postcopy: !self.no_postcopy,
                max_rounds: self.max_rounds.max(1),
                link_rate: self.link_rate.0,
                ..PlanConfig::default()
            },
            link: transport::link::LinkShape {
                rate_bytes_per_s: self.link_rate.0,
                delay: self.link_delay,
            },
            verify: !self.no_verify,
            budget: self.budget,
        }
    }
}

/// `castor migrate`: ask a running primary to move its guest.
#[derive(clap::Args, Debug)]
pub struct AskArgs {
    /// The primary's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "node")]
    pub control: Option<PathBuf>,
    /// The primary's node name: its control socket is /run/castor/NODE.sock.
    #[arg(long)]
    pub node: Option<String>,
    /// Where the destination listens (`castor migrate-listen --listen`).
    #[arg(long)]
    pub to: SocketAddr,
    /// The destination's node name: its certificate must carry it (from the
    /// same `castor certs` CA), and the witness gives it the VM.
    #[arg(long)]
    pub dest: String,
    /// Give up waiting for the answer after this long (the migration itself
    /// goes on; `castor status` then says where the guest is).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub wait: Duration,
    #[command(flatten)]
    pub how: MoveArgs,
}

/// `castor migrate`.
pub fn ask(a: AskArgs) -> Result<()> {
    let path = match (&a.control, &a.node) {
        (Some(p), _) => p.clone(),
        (None, Some(n)) => node::control::default_path(n),
        (None, None) => bail!("say which daemon: --node NAME or --control PATH"),
    };
    let h = &a.how;
    let req = node::control::MigrateRequest {
        to: a.to,
        dest: a.dest.clone(),
        mode: h.mode.to_string(),
        block_size: h.block_size as u32,
        max_downtime_ms: h.max_downtime.as_millis().max(1) as u64,
        postcopy: !h.no_postcopy,
        verify: !h.no_verify,
        max_rounds: h.max_rounds.max(1),
        budget: h.budget,
        link_rate: h.link_rate.0,
        link_delay_us: h.link_delay.as_micros() as u64,
    };
    eprintln!(
        "castor: asking {} to move its guest to {} at {} (the backup stands down first)",
        path.display(),
        a.dest,
        a.to
    );
    match node::control::request(&path, &node::control::Request::Migrate(req), a.wait)? {
        node::control::Response::Ok(report) => {
            println!("MIGRATED {report}");
            Ok(())
        }
        node::control::Response::Error(e) => bail!("migration refused or failed: {e}"),
        node::control::Response::Status(_) => bail!("unexpected answer from the daemon"),
    }
}

/// `castor migrate-run`: boot a guest here and move it.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    out: OutArgs,
    /// Guest RAM (at most 3 GiB for a migration).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Workload of castor's guest (see `castor run --help`).
    #[arg(long, default_value = "counter", value_parser = parse_workload)]
    workload: guest::Workload,
    /// KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Console service (clients send an offset, get the stream; it ends
    /// when the guest has moved, and continues on the destination's).
    #[arg(long, default_value = "127.0.0.1:0")]
    console: SocketAddr,
    /// Stop after this long (if the guest is still here); default: until
    /// it has moved, or SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

/// `castor migrate-listen`: receive one guest and run it.
#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    out: OutArgs,
    /// Where to listen for the source (UDP, QUIC).
    #[arg(long)]
    listen: SocketAddr,
    /// Console service for the guest once it runs here.
    #[arg(long, default_value = "127.0.0.1:0")]
    console: SocketAddr,
    /// KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Largest guest RAM accepted.
    #[arg(long, default_value = "3G", value_parser = parse_size)]
    max_memory: u64,
    /// Stop after this long once the guest runs here; default: until it has
    /// moved on (--to), or SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the network runtime")
}

fn tls(a: &TlsArgs) -> Result<transport::NodeTls> {
    transport::NodeTls::from_dir(&a.certs, &a.node, &a.peer)
        .with_context(|| format!("loading {}'s certificates", a.node))
}

/// `castor migrate-run`.
pub fn run(a: RunArgs) -> Result<()> {
    let Some(to) = a.out.to else {
        bail!("--to ADDR is needed: where a `castor migrate-listen` waits");
    };
    let tls = tls(&a.tls)?;
    let rt = runtime()?;
    let w = &a.workload;
    let need = w.mib_per_vcpu() * (1 << 20) * a.vcpus as u64 + (16 << 20);
    if a.mem > vmm::memory::MMIO_HOLE_START || need > a.mem {
        bail!(
            "--mem must hold the workload ({} MiB) and be at most 3 GiB",
            need >> 20
        );
    }
    let tsc = vmm::host_tsc_khz(&a.kvm_device)?;
    let cmdline = w.cmdline(a.vcpus, tsc, Some(MMIO_CONSOLE_BASE));
    let log = ConsoleLog::new(0);
    log.set_hold(false);
    let console = rt.block_on(node::console::serve(a.console, log.clone()))?;
    info!(%console, "console service");
    let mut machine = Machine::boot(
        &MachineConfig::new(a.mem, a.vcpus),
        guest::KERNEL,
        &cmdline,
        Console::new(node::console::sink(log.clone()), 0),
    )?;
    info!(workload = %w, mem_mib = a.mem >> 20, "VM started; moving it to {to} in {:?}", a.out.after);
    host(
        &rt,
        &mut machine,
        &log,
        &tls,
        &a.tls,
        Some((to, &a.out)),
        a.duration,
        None,
        &*stop_flag()?,
    )
}

/// `castor migrate-listen`.
pub fn listen(a: ListenArgs) -> Result<()> {
    let tls = tls(&a.tls)?;
    let rt = runtime()?;
    let listener = {
        let _g = rt.enter();
        transport::Listener::bind(a.listen, &tls)?
    };
    info!(listen = %listener.local_addr()?, "waiting for a migration");
    let cfg = DestConfig {
        kvm_device: a.kvm_device.clone(),
        max_memory: a.max_memory,
    };
    let stop = stop_flag()?;
    let arrival = migrate::dest::Arrival {
        stop_after_verified: fault_stop_after_verified(&a.tls.certs),
        ..Default::default()
    };
    let Some(incoming) = wait_for_guest(rt.handle(), &listener, &cfg, &arrival, &stop)? else {
        return Ok(());
    };
    let migrate::dest::Incoming {
        mut machine,
        log,
        report,
        postcopy,
    } = incoming;
    println!(
        "ARRIVED {}",
        serde_json::to_string(&report).unwrap_or_default()
    );
    let console = rt.block_on(node::console::serve(a.console, log.clone()))?;
    info!(%console, "console service");
    let out = a.out.to.map(|to| (to, &a.out));
    host(
        &rt,
        &mut machine,
        &log,
        &tls,
        &a.tls,
        out,
        a.duration,
        postcopy,
        &stop,
    )
}

/// Takes incoming migrations on `listener` until one brings a guest that
/// runs here; a migration that fails before its switch is logged and the
/// next one awaited. `None`: `stop` was set first. A guest that arrived but
/// may not run here (`Arrival::claim`) is an error.
fn wait_for_guest(
    rt: &tokio::runtime::Handle,
    listener: &transport::Listener,
    cfg: &DestConfig,
    arrival: &migrate::dest::Arrival,
    stop: &AtomicBool,
) -> Result<Option<migrate::dest::Incoming>> {
    loop {
        let r = rt.block_on(async {
            tokio::select! {
                r = migrate::dest::accept_one(listener, cfg, arrival) => Some(r),
                _ = wait_flag(stop) => None,
            }
        });
        match r {
            None => return Ok(None),
            Some(Ok(i)) => return Ok(Some(i)),
            Some(Err(migrate::MigrateError::Fenced(why))) => {
                bail!("the guest arrived but may not run here: {why}")
            }
            Some(Err(e)) => warn!("{e}; waiting for the next migration"),
        }
    }
}

/// The tests' fault [`migrate::dest::FAULT_STOP_AFTER_VERIFIED`], set to
/// this node's certificate directory.
fn fault_stop_after_verified(certs: &std::path::Path) -> bool {
    std::env::var_os(migrate::dest::FAULT_STOP_AFTER_VERIFIED)
        .is_some_and(|v| std::path::Path::new(&v) == certs)
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handlers")?;
    }
    Ok(flag)
}

async fn wait_flag(f: &AtomicBool) {
    while !f.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the guest here until it stops, a signal, `duration`, or it has
/// moved to `out`'s node.
#[allow(clippy::too_many_arguments)]
fn host(
    rt: &tokio::runtime::Runtime,
    machine: &mut Machine,
    log: &Arc<ConsoleLog>,
    tls: &transport::NodeTls,
    id: &TlsArgs,
    out: Option<(SocketAddr, &OutArgs)>,
    duration: Option<Duration>,
    postcopy: Option<Postcopy>,
    stop: &AtomicBool,
) -> Result<()> {
    let t0 = Instant::now();
    let mut pending = out;
    let mut post_done = false;
    let result = loop {
        if let Some(reason) = machine.wait_exit(Duration::from_millis(10)) {
            break match reason {
                ExitReason::Stopped | ExitReason::Shutdown => Ok(()),
                ExitReason::Error(e) => Err(anyhow::anyhow!("the VM failed: {e}")),
            };
        }
        // A post-copy in progress is never cut short by --duration: the
        // source has no copy of the guest any more.
        let post_busy = postcopy.as_ref().is_some_and(|p| !p.complete());
        if stop.load(Ordering::Relaxed)
            || (duration.is_some_and(|d| t0.elapsed() >= d) && !post_busy)
        {
            break Ok(());
        }
        if let Some(p) = &postcopy {
            if p.failed() {
                break Err(anyhow::anyhow!(
                    "post-copy failed before every page arrived: the VM is lost"
                ));
            }
            if !post_done && p.complete() {
                post_done = true;
                println!("POSTCOPY_COMPLETE demand={}", p.demand());
            }
        }
        if let Some((to, o)) = pending {
            if t0.elapsed() >= o.after && !post_busy {
                pending = None;
                let cfg = o.how.source_config(&id.node);
                let on_commit = || log.close();
                let r = rt.block_on(migrate::source::migrate_out(
                    machine, to, tls, &cfg, &on_commit,
                ));
                match r {
                    Ok(rep) => {
                        println!(
                            "MIGRATED {}",
                            serde_json::to_string(&rep).unwrap_or_default()
                        );
                        // Console clients get everything up to the switch,
                        // then the end of the stream.
                        log.close();
                        std::thread::sleep(Duration::from_millis(300));
                        return Ok(());
                    }
                    Err(f) if f.running_here => {
                        println!("MIGRATION_FAILED {}", f.error);
                        error!(
                            "migration to {to} failed: {}; the VM keeps running here",
                            f.error
                        );
                    }
                    Err(f) => {
                        println!("MIGRATION_LOST {}", f.error);
                        log.close();
                        return Err(anyhow::anyhow!(
                            "migration to {to} failed after the switch: {}",
                            f.error
                        ));
                    }
                }
            }
        }
    };
    machine.stop();
    log.close();
    std::thread::sleep(Duration::from_millis(100));
    drop(postcopy);
    result
}

/// `castor primary --incoming ADDR --incoming-from NODE`: a primary whose
/// guest arrives by migration instead of booting here, then is protected
/// toward `--backup` like any other.
pub(crate) fn incoming_primary(a: &super::PrimaryArgs, addr: SocketAddr) -> Result<()> {
    let Some(from) = a.incoming_from.clone() else {
        bail!("--incoming needs --incoming-from NODE: the name in the source's certificate");
    };
    let witness = super::witness_of(&a.pair)?;
    let mut cfg = super::primary_config(&a.pair, &a.protect, a.backup, witness.clone(), None)?;
    cfg.tap = super::open_tap(&a.machine.tap)?;
    let tls = transport::NodeTls::from_dir(&a.pair.certs, &a.pair.node, &from)
        .with_context(|| format!("loading {}'s certificates", a.pair.node))?;
    let stop = super::stop_after(a.duration)?;
    let node = super::services("castor-net", &a.pair)?;
    let listener = {
        let _g = node.rt.enter();
        transport::Listener::bind(addr, &tls)?
    };
    let token = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let claim = witness.clone().map(|w| {
        let (me, token) = (a.pair.node.clone(), token.clone());
        Box::new(move || {
            let t = claim_arrival(&w, &me)?;
            token.store(t, Ordering::Relaxed);
            info!(token = t, "the witness gives this node the VM");
            Ok(())
        }) as Box<dyn Fn() -> Result<(), String> + Send + Sync>
    });
    if claim.is_none() {
        warn!("no witness: the guest that arrives runs here without a check of its ownership");
    }
    let arrival = migrate::dest::Arrival {
        log: Some(node.log.clone()),
        claim,
        stop_after_verified: fault_stop_after_verified(&a.pair.certs),
    };
    let dest = DestConfig {
        kvm_device: a.machine.kvm_device.clone(),
        max_memory: vmm::memory::MMIO_HOLE_START,
    };
    info!(listen = %listener.local_addr()?, %from, "waiting for the guest (castor migrate)");
    let Some(incoming) = wait_for_guest(node.rt.handle(), &listener, &dest, &arrival, &stop)?
    else {
        return Ok(());
    };
    listener.close();
    let migrate::dest::Incoming {
        mut machine,
        report,
        postcopy,
        ..
    } = incoming;
    info!(
        verified = report.verified,
        resume_ms = format!("{:.2}", report.resume_ms),
        missing = report.missing,
        "the guest arrived and runs here"
    );
    // A post-copy guest is protected once all its memory is here (a
    // checkpoint reads every page): unprotected until then.
    if let Some(p) = &postcopy {
        info!("post-copy: protection starts when every page has arrived");
        while !p.complete() {
            if p.failed() {
                machine.stop();
                bail!("post-copy failed before every page arrived: the VM is lost");
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let origin = primary::Origin::Booted {
        token: token.load(Ordering::Relaxed),
    };
    let metrics = primary::protect(&cfg, &node, machine, origin, None, stop)?;
    drop(postcopy);
    metrics.log_summary("primary stopped");
    Ok(())
}

/// How long a destination that has `Go` asks a silent witness for the VM.
/// The source sent `Go` only after it won the witness's swap to this node,
/// and waits, paused, for this node's `Finished` or the witness's word:
/// waiting costs nothing but the wait, and giving up may lose the VM (the
/// simulator found that with a 2 s bound: ~4 % of its runs with witness
/// outages of 0.1-3 s lost the VM here).
const OWNER_WAIT: Duration = Duration::from_secs(60);

/// Claims the VM at the witness for the guest that arrived with `Go`: a
/// claim from the token of the handover (the one that names `me`), so that
/// this node and a source that never heard its `Finished` and takes the VM
/// back (`Switch::reclaim`, a claim from the same token) never both run
/// it. The new token; asked for up to [`OWNER_WAIT`] while the witness
/// does not answer.
fn claim_arrival(w: &witness::Etcd, me: &str) -> Result<u64, String> {
    let start = Instant::now();
    let handed = owned_token(w, me)?;
    loop {
        match w.claim(me, handed) {
            witness::Claim::Won { token } => return Ok(token),
            witness::Claim::Lost { owner, token } => {
                return Err(format!(
                    "the witness gives the VM to {owner} (token {token}): the source took it back"
                ))
            }
            witness::Claim::Unreachable if start.elapsed() >= OWNER_WAIT => {
                return Err("the witness did not answer this node's claim of the VM".into())
            }
            witness::Claim::Unreachable => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The token of the VM's ownership if the witness names `me` its owner,
/// asked for up to [`OWNER_WAIT`] while it does not answer.
fn owned_token(w: &witness::Etcd, me: &str) -> Result<u64, String> {
    let start = Instant::now();
    let deadline = start + OWNER_WAIT;
    let mut said = Duration::ZERO;
    loop {
        match w.read() {
            Ok(Some((o, _))) if o.owner == me => return Ok(o.token),
            Ok(Some((o, _))) => {
                return Err(format!(
                    "the witness names {} (token {}) the VM's owner, not this node",
                    o.owner, o.token
                ))
            }
            Ok(None) => return Err("the witness names no owner of the VM".into()),
            Err(e) if Instant::now() >= deadline => return Err(format!("{e}")),
            Err(e) => {
                if start.elapsed() >= said + Duration::from_secs(2) {
                    said = start.elapsed();
                    tracing::warn!(
                        waited_s = said.as_secs(),
                        "the witness does not answer: the guest waits here until it names this node ({e})"
                    );
                }
                std::thread::sleep(Duration::from_millis(100))
            }
        }
    }
}
