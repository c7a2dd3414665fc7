//! `castor`: high availability for KVM virtual machines by continuous
//! checkpointing. This binary is the command-line edge: it parses flags, sets
//! up logging and signals, and drives the machine; the work lives in the
//! library crates (`castor-vmm`, `castor-guest`).
#![forbid(unsafe_code)]

mod epoch_flags;
mod fleet_cmd;
mod migrate_cmd;

use epoch_flags::{epoch_length, parse_epoch_ms, parse_percent, parse_positive_ms, EpochMs};

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use lab::cli::{parse_duration, parse_size, parse_workload};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing::{debug, error, info, warn};

use vmm::console::{Console, StdoutSink, MMIO_CONSOLE_BASE};
use vmm::{ExitReason, KvmKind, Machine, MachineConfig};

#[derive(Parser)]
#[command(
    name = "castor",
    version,
    args_override_self = true,
    about = "High availability for KVM virtual machines by continuous checkpointing",
    long_about = "castor runs a VM on KVM and keeps it protected by checkpointing it continuously.\n\n\
        The guest's console goes to standard output; castor's own log goes to standard error \
        (set RUST_LOG=debug for more). SIGINT or SIGTERM stop the VM cleanly."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Boot a guest and stream its console to stdout.
    ///
    /// Without --kernel it boots castor's own guest running --workload. With
    /// --snapshot-at it writes a snapshot of the running VM (machine state and
    /// RAM) into --snapshot-dir and keeps running; `castor restore` resumes it.
    Run(RunArgs),
    /// Resume a VM from a snapshot directory, in this fresh process.
    Restore(RestoreArgs),
    /// Make the pair's certificate authority and a certificate for each node.
    ///
    /// Writes into --dir what the daemons load: ca.pem (trusted by every node)
    /// and NODE.pem / NODE.key for each name in --nodes. The CA's private key
    /// goes to --ca-dir (DIR/ca by default), never into --dir: no daemon needs
    /// it, keep it offline. Certificates expire after --days. Keys are mode
    /// 0600; every file is written atomically. Each daemon is then given its
    /// own NODE files, ca.pem, and the name its peer must have; anyone else is
    /// refused during the TLS handshake.
    Certs(CertsArgs),
    /// Run the guest as the primary of an HA pair: checkpoint it every epoch
    /// to the backup, hold its console output until the backup acks.
    Primary(PrimaryArgs),
    /// Run the backup of an HA pair: keep a replica at the last committed
    /// checkpoint and take over when the primary is lost.
    Backup(BackupArgs),
    /// Print a running daemon's status: role, protection, pause, bytes, the
    /// last failover (`--json`: the typed status, one line), via its control
    /// socket.
    Status(StatusArgs),
    /// Ask a backup to take over now (a planned switchover or an operator's
    /// decision): it restores the last committed checkpoint and runs the
    /// guest; a primary that is still alive is told and stops its guest.
    Takeover(StatusArgs),
    /// The main job: a local HA pair on loopback, a failover, and its report.
    ///
    /// Starts a backup and a primary (two processes, certificates made in a
    /// temporary directory, castor's guest), lets them run, SIGKILLs the
    /// primary, and reports: epochs, pause p50/p99, bytes per epoch vs raw,
    /// failover time (SIGKILL to the first console byte from the survivor),
    /// and whether the console stream stayed gap- and duplicate-free.
    Demo(lab::DemoArgs),
    /// Failover drill: repeatedly SIGKILL the current primary at a random
    /// moment, let the backup take over, start a new backup where the dead
    /// primary was, and wait for re-protection. Reports every round and fails
    /// on any console gap or duplicate.
    Drill(lab::DrillArgs),
    /// The measurement suite: the real pair on loopback over workloads x
    /// modes (remus, xbzrle, fgbi) x epoch lengths, each beside the same
    /// guest unprotected and with dirty tracking only, over an emulated
    /// 1 Gbit/s link, plus failover drills.
    ///
    /// Prints a progress bar and, at the end, the markdown summary with the
    /// targets checked; writes points.csv, points.json, failover.csv,
    /// summary.md and PNG plots into --out. `--quick` (the CI smoke test)
    /// takes under 3 minutes, the full default matrix under 20.
    Bench(lab::BenchArgs),
    /// The guest network of a local pair (root): `up` makes the bridge
    /// castor0 (10.77.0.254/24), the taps castor-tap-a/-b on it and the
    /// client namespace castor-client (10.77.0.1/24) joined by a veth pair;
    /// `down` removes them. The guest is 10.77.0.2, MAC 52:54:00:ca:57:02.
    Net(lab::netlab::NetArgs),
    /// Load generator and checker for the guest's key-value service (UDP):
    /// PUTs and GETs at --rate with retries, at most one outstanding request
    /// per key; reports latency, the longest gap between replies, and every
    /// violation (a reply from state later lost, an acknowledged write lost),
    /// then reads back every acknowledged key. Fails on any violation.
    Loadgen(lab::loadgen::LoadgenArgs),
    /// Check a recorded key-value history for linearizability (Porcupine's
    /// search, per key): the file `castor loadgen --history-out` or a
    /// drill's `client-history.jsonl` wrote. Prints the verdict, the
    /// smallest failing sub-history of a violation, and the shape of any key
    /// the search's budget could not decide; fails on a violation.
    Linearize(lab::loadgen::LinearizeArgs),
    /// Live migration: ask a running primary (--node or --control) to move
    /// its guest, running, to the node listening at --to (a `castor
    /// migrate-listen` whose certificate names it --dest).
    ///
    /// The primary first stands its backup down (a goodbye: the backup
    /// commits the last checkpoint and will not take over); the guest is not
    /// protected while it moves. With a witness, the VM's ownership passes to
    /// --dest at the witness just before the destination runs the guest, so
    /// only one node may ever run it.
    ///
    /// Pre-copy rounds encoded by fgbi (or xbzrle / remus) over the pair's
    /// mutual-TLS QUIC channel, until the stall predicted from the writable
    /// working set fits --max-downtime; then the guest is paused, the rest
    /// and the machine state sent, the destination's memory checked against
    /// a digest of the source's, and the guest resumed there. When the
    /// history says pre-copy will never fit, the migration switches to
    /// post-copy: the destination runs the guest at once and fetches the
    /// pages it touches on demand while the rest is pushed. DURING POST-COPY
    /// A FAILURE OF EITHER NODE OR OF THE LINK LOSES THE VM (--no-postcopy
    /// forbids it). A migration that fails before the switch leaves the
    /// guest running on the source, protected again, and says why. Prints
    /// `MIGRATED {json}` on success; the source daemon then exits.
    Migrate(migrate_cmd::AskArgs),
    /// Live migration without a daemon (the lab flow): boot castor's guest
    /// here and move it to the node at --to after --after, as `castor
    /// migrate` does (see its help; post-copy: a failure of either node
    /// loses the VM). Prints `MIGRATED {json}` on success.
    MigrateRun(migrate_cmd::RunArgs),
    /// Live migration, destination: wait for one guest (`castor migrate`),
    /// run it and serve its console from the offset it had; with --to, move
    /// it on after --after. See `castor migrate --help` (post-copy: a
    /// failure of either node loses the VM).
    MigrateListen(migrate_cmd::ListenArgs),
    /// A fleet on this machine (each host an agent in a network namespace
    /// of its own, a three-member etcd), several protected VMs, a host lost,
    /// and its report: how long each VM's clients saw nothing, when every
    /// VM was protected again, and the fleet's cost at rest. Needs root.
    FleetDemo(lab::fleetdemo::FleetDemoArgs),
    /// Run a fleet host's agent: it registers this host in etcd, runs the
    /// primaries and backups the fleet's placement gives it as child
    /// processes, and re-protects every VM after a host is lost.
    ///
    /// One agent per host (deploy/castor-agent.service). The fleet's
    /// desired state is in the same etcd as the witness: `castor vm create`
    /// adds a VM, `castor host drain` empties a host. See docs/design.md,
    /// "The fleet".
    Agent(fleet_cmd::AgentArgs),
    /// The fleet's VMs: create, delete, list (desired state in etcd).
    #[command(subcommand)]
    Vm(fleet_cmd::VmCommand),
    /// The fleet's hosts: list, drain, undrain.
    #[command(subcommand)]
    Host(fleet_cmd::HostCommand),
    /// Ask a running primary to protect its guest toward another backup
    /// (e.g. a survivor after a failover): its current backup, if any, is
    /// stood down with a goodbye, and the new one gets a resync.
    Protect(fleet_cmd::ProtectArgs),
}

#[derive(Args, Clone)]
struct PairArgs {
    /// Read settings from a TOML file: keys are these long flag names
    /// (`backup = "10.0.0.2:7400"`, `epoch-ms = 25`, `verify = true`);
    /// flags on the command line override the file. Default:
    /// /etc/castor/primary.toml or /etc/castor/backup.toml, if it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory made by `castor certs`.
    #[arg(long)]
    certs: PathBuf,
    /// This node's name (its certificate is NODE.pem / NODE.key).
    #[arg(long)]
    node: String,
    /// The only name the peer's certificate may have.
    #[arg(long)]
    peer: String,
    /// Console service address (clients send an offset, get the stream).
    #[arg(long, default_value = "127.0.0.1:0")]
    console: std::net::SocketAddr,
    /// The control socket (status, takeover, reset; owner only). Default:
    /// /run/castor/NODE.sock.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Console history kept for clients, released bytes (held output is
    /// bounded separately); older offsets get a clear error.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    console_keep: u64,
    /// Who decides which node owns the VM: `etcd=http://HOST:PORT[,http://HOST:PORT…]`
    /// (a backup takes over, and a primary carries on without its backup,
    /// only after winning a compare-and-swap there), or `none` (a single-machine
    /// demo: a paused, slow or cut-off primary and its backup can then both
    /// run the guest). Both nodes must name the same witness.
    #[arg(long, value_parser = witness::parse_spec, value_name = "etcd=URLS|none")]
    witness: witness::Spec,
    /// The protected VM's name: its key at the witness. Both nodes must agree.
    #[arg(long, default_value = "castor")]
    vm: String,
}

#[derive(Args, Clone)]
struct ProtectArgs {
    /// Epoch length: milliseconds (1..=10000), or `auto`. Output is held for
    /// an epoch, so shorter epochs answer clients sooner but pause the
    /// guest and send its hot pages more often. With `auto`, after every
    /// epoch the next one's length is chosen from the last 16 epochs'
    /// lengths, pauses and bytes (straight lines fitted against the
    /// length): the shortest that keeps the checkpoints within
    /// --link-budget and the pauses within --pause-share-pct of the guest's
    /// time, between --epoch-min-ms and --epoch-max-ms, in whole
    /// milliseconds, starting at 25 and lengthening by at most half at a
    /// time (now and then one epoch probes half the length, for the model
    /// to see another). A pause the model expects over
    /// --pause-target-ms is logged (the link's budget wins: a backlog grows
    /// without end, a long pause does not). `castor status` shows the
    /// length chosen and what decided it; the pre-copy window follows it.
    #[arg(long, default_value = "25", value_parser = parse_epoch_ms, value_name = "MS|auto", allow_negative_numbers = true)]
    epoch_ms: EpochMs,
    /// With --epoch-ms auto: the longest pause wanted, in milliseconds
    /// (default 2). The chooser reports, and logs, a choice whose expected
    /// pause is over it.
    #[arg(long, value_name = "MS", value_parser = parse_positive_ms)]
    pause_target_ms: Option<f64>,
    /// With --epoch-ms auto: checkpoint bytes a second the replication link
    /// may carry, e.g. 800mbit, 50MB (default: 80 % of --link-rate when it
    /// is given, else 80 % of 1 Gbit/s, i.e. 100 MB/s).
    #[arg(long, value_name = "RATE", value_parser = lab::cli::parse_rate)]
    link_budget: Option<lab::cli::LinkRate>,
    /// With --epoch-ms auto: largest share of the guest's time spent paused,
    /// in percent (default 5).
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pause_share_pct: Option<f64>,
    /// With --epoch-ms auto: the shortest epoch, in milliseconds (default 10).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    epoch_min_ms: Option<u64>,
    /// With --epoch-ms auto: the longest epoch, in milliseconds (default 200).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    epoch_max_ms: Option<u64>,
    /// What goes on the wire: remus (whole pages), xbzrle, or fgbi.
    #[arg(long, default_value = "fgbi")]
    mode: fgbi::Mode,
    /// fgbi block size (64..=1024, a power of two).
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Memory fgbi may keep about the backup's RAM (default: half the guest RAM).
    #[arg(long, value_parser = parse_size)]
    budget: Option<u64>,
    /// Most unacknowledged checkpoints before the next epoch waits.
    #[arg(long, default_value_t = 4)]
    max_in_flight: usize,
    /// Heartbeat period in milliseconds.
    #[arg(long, default_value_t = 5)]
    heartbeat_ms: u64,
    /// Declare the backup lost after this many milliseconds without an answer
    /// (heartbeats travel on their own UDP path, so a full link does not delay
    /// them). Output is held meanwhile; a false alarm costs a full resync, not
    /// safety: with a witness the primary then claims the VM first.
    #[arg(long, default_value_t = 200)]
    backup_timeout_ms: u64,
    /// While a new backup receives its first checkpoint, the full resync
    /// (the whole image: a second or more for a large guest): `release`
    /// lets the guest's output out as it is written, so no client waits for
    /// the resync, and the backup can take over from the first checkpoint
    /// after it; `hold` holds output from the resync's pause on, so the
    /// backup can take over from the resync itself (one epoch sooner) while
    /// clients wait for it. `release` needs protocol 7 on both nodes (an
    /// older peer: `hold`).
    #[arg(long, value_enum, default_value = "release")]
    resync_output: ResyncOutput,
    /// Send a memory digest with each checkpoint for the backup to verify.
    /// (A guest's disk is always verified: every checkpoint carries the
    /// disk's digest sum, and the backup compares its own after writing.)
    #[arg(long)]
    verify: bool,
    /// Scheduling nice value of the guest's vCPU threads (0..=19): above 0
    /// keeps heartbeats and checkpoints ahead of a spinning guest on a small host.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    vcpu_nice: i32,
    /// Emulated link (benchmarks): limit the replication traffic to this
    /// rate, e.g. 1gbit, 100mbit, 50MB; `none` for no limit. Applied by the
    /// primary to its checkpoint stream (see docs/design.md).
    #[arg(long, default_value = "none", value_parser = lab::cli::parse_rate)]
    link_rate: lab::cli::LinkRate,
    /// Emulated link: one-way delay added to checkpoints and acks, e.g. 100us, 1ms.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    link_delay: Duration,
    /// Packet faults on the replication path (tests, drills): each datagram
    /// this daemon sends to its peer — QUIC packets and heartbeats — is lost,
    /// sent twice or held back behind the next 1..=3 (at most `hold`), e.g.
    /// loss=2%,dup=1%,reorder=5%. Keys: loss, dup, reorder (percentages
    /// adding up to at most 100), hold (default 3ms), seed (default: drawn
    /// and logged; replays the draws). Give it to both daemons to impair
    /// both directions; `none`: no faults (see docs/design.md).
    #[arg(long, default_value = "none", value_name = "KEY=VALUE,...", value_parser = transport::lossy::LinkFaults::parse)]
    link_faults: transport::lossy::LinkFaults,
    /// Keep the guest's RAM and its per-page generations in files under
    /// DIR/VM/NODE.{ram,gen} (tmpfs: /dev/shm/castor is a good place) that
    /// outlive this process: a node that died, was fenced or stopped still
    /// holds the VM's last image, and started again as the backup with
    /// --reuse it gets only the pages that differ instead of a full
    /// resync. Without it RAM is anonymous memory (a backup still reuses
    /// its replica when its primary reconnects).
    #[arg(long, value_name = "DIR")]
    image_dir: Option<PathBuf>,
    /// Pre-copy window in milliseconds: this long before each epoch ends the
    /// pages dirtied so far are copied while the guest runs, so the pause
    /// only copies the pages dirtied since (0: copy everything in the
    /// pause). Default: a fifth of the epoch, at most 5 (with --epoch-ms
    /// auto, of the length chosen). Always shorter than the epoch.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    precopy_ms: Option<u64>,
}

#[derive(Args)]
struct PrimaryArgs {
    #[command(flatten)]
    machine: MachineArgs,
    #[command(flatten)]
    pair: PairArgs,
    #[command(flatten)]
    protect: ProtectArgs,
    /// Where the backup listens (UDP, QUIC). Without it the guest runs
    /// unprotected until a backup is named (`castor protect`, or a fleet's
    /// agent); --peer is then not used.
    #[arg(long)]
    backup: Option<std::net::SocketAddr>,
    /// Workload of castor's guest (see `castor run --help`).
    #[arg(long, default_value = "counter", value_parser = parse_workload)]
    workload: guest::Workload,
    /// Boot this kernel instead of castor's guest: a multiboot v1 kernel, a
    /// Linux bzImage or a 64-bit Linux vmlinux (ELF), recognised by content.
    #[arg(long, conflicts_with = "workload")]
    kernel: Option<PathBuf>,
    /// Kernel command line (with --kernel), e.g. "console=ttyS0" for a Linux
    /// kernel's console on castor's serial port.
    #[arg(long, requires = "kernel", default_value = "")]
    cmdline: String,
    /// Initramfs for a Linux --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Stop after this long; default: run until SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Boot a new generation of the VM here even though the witness says
    /// another node owns it (it booted the VM or took it over, and may be
    /// running it: its guest is then fenced and its state lost). Without
    /// this, such a start is refused.
    #[arg(long)]
    take_ownership: bool,
    /// How long to wait for a witness that does not answer before giving
    /// up (e.g. 30s; 0: not at all). Default: until it answers — a daemon
    /// started at boot may come up before its etcd; it says so and retries.
    /// SIGTERM stops the wait.
    #[arg(long, value_parser = parse_wait, value_name = "DURATION|forever", default_value = "forever")]
    witness_wait: WitnessWait,
    /// Boot nothing: wait on this address (UDP, QUIC) for the guest a
    /// running primary moves here (`castor migrate --dest THIS-NODE`), then
    /// protect it toward --backup. With a witness the guest runs only if the
    /// witness names this node its owner (the source hands the VM over at
    /// the switch). The guest flags (--mem, --workload, …) are not used.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["kernel", "take_ownership"])]
    incoming: Option<std::net::SocketAddr>,
    /// With --incoming: the source's node name (its certificate's); no
    /// other node may connect.
    #[arg(long, value_name = "NODE", requires = "incoming")]
    incoming_from: Option<String>,
}

#[derive(Args)]
struct BackupArgs {
    #[command(flatten)]
    pair: PairArgs,
    #[command(flatten)]
    protect: ProtectArgs,
    /// Address to listen on for the primary (UDP, QUIC).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Fail over after this many milliseconds without hearing from the primary.
    #[arg(long, default_value_t = 30)]
    heartbeat_timeout_ms: u64,
    /// After a failover, protect the guest toward a backup at this address
    /// (this node then acts as the primary).
    #[arg(long)]
    then_protect: Option<std::net::SocketAddr>,
    /// KVM device for the VM after failover.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Offer the primary the VM's image this node kept (from --image-dir,
    /// /dev/shm/castor by default): after this node died, was fenced or
    /// stopped, only the pages that changed since are sent, checked page by
    /// page by digest, instead of a full resync.
    #[arg(long)]
    reuse: bool,
    /// This node's tap for the guest's network card after a takeover (the
    /// guest keeps its MAC; it is announced on this tap at once).
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Most bytes one checkpoint may stage; a larger one is refused (the
    /// session ends, the primary resyncs). For a small guest the bound is
    /// lower: its RAM as raw records, plus 16 MiB of machine state and
    /// 64 MiB of console output.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    max_epoch_bytes: u64,
    /// Largest guest RAM this backup replicates (e.g. 2G); a primary with
    /// more is refused at its hello (and logs why). Default: this host's
    /// physical RAM (MemTotal in /proc/meminfo).
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Most vCPUs of a guest this backup replicates; a primary with more is
    /// refused at its hello.
    #[arg(long, default_value_t = 64)]
    max_vcpus: u32,
    /// This node's copy of the guest's disk (a raw image file or a block
    /// device of exactly the primary's disk's size; one castor at a time).
    /// It is written only when a checkpoint commits, through a journal
    /// beside it (FILE.castor-journal), so it is always at the last
    /// committed checkpoint; after a takeover it is the guest's disk. A
    /// primary with a disk is refused by a backup without one, and the other
    /// way round. Only the blocks that differ from the primary's are sent
    /// when a session starts (checked by digest).
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
}

/// `--witness-wait`: a bound, or none.
type WitnessWait = Option<Duration>;

fn parse_wait(s: &str) -> std::result::Result<WitnessWait, String> {
    if s == "forever" {
        return Ok(None);
    }
    if s == "0" {
        return Ok(Some(Duration::ZERO));
    }
    parse_duration(s).map(Some)
}

/// This host's physical RAM (`MemTotal`), the default `--max-memory`.
fn host_memory() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow::anyhow!("no MemTotal in /proc/meminfo; give --max-memory"))
}

#[derive(Args)]
struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "node")]
    control: Option<PathBuf>,
    /// The daemon's node name: its control socket is /run/castor/NODE.sock.
    #[arg(long)]
    node: Option<String>,
    /// Print the typed status as one line of JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// Ask a fleet host's agent (--control /run/castor/agent-HOST.sock)
    /// about its role of this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
}

impl StatusArgs {
    fn socket(&self) -> Result<PathBuf> {
        match (&self.control, &self.node) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(n)) => Ok(node::control::default_path(n)),
            (None, None) => bail!("say which daemon: --control PATH or --node NAME"),
        }
    }
}

#[derive(Args)]
struct CertsArgs {
    /// Directory to write the certificates into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Node names, comma separated (DNS-name syntax).
    #[arg(long, value_delimiter = ',', default_value = "primary,backup")]
    nodes: Vec<String>,
    /// Where to write the CA's private key (created mode 0700 if missing);
    /// default DIR/ca. No daemon reads it: keep it offline.
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Days every certificate is valid for, from now (1..=36500).
    #[arg(long, default_value_t = transport::certs::DEFAULT_DAYS, value_parser = parse_days)]
    days: u32,
    /// Replace an existing CA in --dir (every node then needs new files).
    #[arg(long)]
    force: bool,
}

fn parse_days(s: &str) -> std::result::Result<u32, String> {
    let days: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of days"))?;
    transport::certs::check_days(days).map_err(|_| {
        format!(
            "a certificate must be valid for 1 to {} days",
            transport::certs::MAX_DAYS
        )
    })?;
    Ok(days)
}

#[derive(Args)]
struct MachineArgs {
    /// Guest RAM, e.g. 512M, 1G (16M..=256G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs (castor's guest supports up to 16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: u32,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Give the guest a virtio-net card whose host side is this tap device
    /// (an existing tap, e.g. one `castor net up` made, or a new transient
    /// one). A protected guest's frames leave only after the backup has the
    /// checkpoint of the epoch that sent them. The `net` workload gets a card
    /// without this flag too (its frames then go nowhere).
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// The card's MAC address.
    #[arg(long, default_value = "52:54:00:ca:57:02", value_parser = parse_mac)]
    mac: [u8; 6],
    /// Give the guest a virtio-blk disk over this file: a raw image (e.g.
    /// made with `truncate -s 1G disk.img`) or a block device, opened
    /// read-write. Its size (a multiple of 4096 bytes) is the disk's. One
    /// castor at a time: the file is locked while the VM runs. The `kvdisk`
    /// workload needs one.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
}

impl MachineArgs {
    /// The card's MAC, if the guest has one (`--tap`, or a workload that
    /// needs one).
    fn net(&self, workload: Option<&guest::Workload>) -> Option<[u8; 6]> {
        (self.tap.is_some()
            || workload.is_some_and(|w| matches!(w.kind, guest::Kind::Net | guest::Kind::KvDisk)))
        .then_some(self.mac)
    }

    /// Opens `--disk`, before any VM exists; a workload that needs a disk
    /// is refused without one.
    fn disk(&self, workload: Option<&guest::Workload>) -> Result<Option<Arc<vmm::disk::Disk>>> {
        let needs = workload.is_some_and(|w| w.kind == guest::Kind::KvDisk);
        open_disk(self.disk.as_deref(), needs)
    }
}

/// Opens a `--disk FILE` (`needs`: the workload cannot run without one).
fn open_disk(path: Option<&std::path::Path>, needs: bool) -> Result<Option<Arc<vmm::disk::Disk>>> {
    match path {
        None if needs => bail!(
            "the kvdisk workload needs a disk: add --disk FILE (a raw image, e.g. truncate -s 64M disk.img)"
        ),
        None => Ok(None),
        Some(p) => {
            let d = vmm::disk::Disk::open(p)?;
            if needs {
                d.require(guest::KVDISK_MIN_BYTES)?;
            }
            Ok(Some(Arc::new(d)))
        }
    }
}

/// The disk's counters, as `castor run` prints them at exit.
fn report_disk(machine: &Machine) {
    if let Some(b) = machine.disk() {
        let s = b.stats();
        info!(
            disk = %b.disk().path().display(),
            reads = s.reads,
            writes = s.writes,
            flushes = s.flushes,
            read_bytes = s.read_bytes,
            write_bytes = s.write_bytes,
            bad_requests = s.bad_requests,
            io_errors = s.io_errors,
            unsupported = s.unsupported,
            "disk counters"
        );
    }
}

/// Opens `--tap NAME`, which must exist (a mistyped name would otherwise
/// make a new tap that reaches no one).
fn open_tap(name: &Option<String>) -> Result<Option<Arc<vmm::tap::Tap>>> {
    let Some(n) = name.as_deref() else {
        return Ok(None);
    };
    if !n.contains('/') && !std::path::Path::new("/sys/class/net").join(n).exists() {
        bail!(
            "--tap {n}: no such network device; create it first (castor net up, or: ip tuntap add dev {n} mode tap; ip link set {n} master BRIDGE up)"
        );
    }
    Ok(Some(Arc::new(vmm::tap::Tap::open(n)?)))
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("'{s}' is not a MAC address such as 52:54:00:ca:57:02");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s} is a multicast address: a card needs a unicast one"
        ));
    }
    Ok(mac)
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Workload of castor's guest: NAME[,key=value...]. Names: counter,
    /// sparse, pages, kv, log, verify, net, kvdisk (net's key-value service
    /// with a durable log on --disk). Keys: rate (ops/s per vCPU, 0 =
    /// unlimited), mib (working set per vCPU), interval_ms (progress lines),
    /// record (log record bytes), seed, irq=1 (counter only: ring-0,
    /// timer-interrupt driven).
    #[arg(long, default_value = "counter", value_parser = parse_workload, verbatim_doc_comment)]
    workload: guest::Workload,
    /// Boot this kernel instead of castor's guest: a multiboot v1 kernel, a
    /// Linux bzImage or a 64-bit Linux vmlinux (ELF), recognised by content.
    #[arg(long, conflicts_with = "workload")]
    kernel: Option<PathBuf>,
    /// Kernel command line (with --kernel), e.g. "console=ttyS0" for a Linux
    /// kernel's console on castor's serial port.
    #[arg(long, requires = "kernel", default_value = "")]
    cmdline: String,
    /// Initramfs for a Linux --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Stop after this long (e.g. 10s, 500ms, 2m); default: run until SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Take a snapshot this long after boot (e.g. 3s).
    #[arg(long, value_parser = parse_duration, requires = "snapshot_dir")]
    snapshot_at: Option<Duration>,
    /// Directory for the snapshot (created if missing).
    #[arg(long, requires = "snapshot_at")]
    snapshot_dir: Option<PathBuf>,
    /// Turn dirty-page tracking on and harvest the log every this many
    /// milliseconds, without checkpointing: the platform's cost of tracking
    /// alone (`castor bench` uses it as a baseline).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    track_ms: Option<u64>,
}

#[derive(Args)]
struct RestoreArgs {
    /// Snapshot directory written by `castor run --snapshot-at`.
    dir: PathBuf,
    /// Stop after this long; default: run until SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// The tap for the guest's network card, if the snapshot has one.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// The disk image, if the snapshot has a disk: the same file (same
    /// size) the snapshotted guest used, with what it wrote since.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handlers")?;
    }
    Ok(flag)
}

/// Runs `machine` until a stop signal, the duration, or the guest stops;
/// `on_tick` is called every few milliseconds with the time since start.
fn supervise(
    machine: &mut Machine,
    duration: Option<Duration>,
    tick: Duration,
    mut on_tick: impl FnMut(&mut Machine, Duration) -> Result<()>,
) -> Result<()> {
    let stop = stop_flag()?;
    let t0 = Instant::now();
    loop {
        if let Some(reason) = machine.wait_exit(tick) {
            machine.stop();
            return match reason {
                ExitReason::Stopped => Ok(()),
                ExitReason::Shutdown => {
                    info!("the guest shut down");
                    Ok(())
                }
                ExitReason::Error(e) => bail!("the VM failed: {e}"),
            };
        }
        if stop.load(Ordering::Relaxed) {
            info!("stop signal received: stopping the VM");
            break;
        }
        if duration.is_some_and(|d| t0.elapsed() >= d) {
            info!(
                "ran for {:?}: stopping the VM",
                duration.unwrap_or_default()
            );
            break;
        }
        on_tick(machine, t0.elapsed())?;
    }
    machine.stop();
    Ok(())
}

/// On kvm_pvm, says what a stock Linux kernel needs and how far it gets.
fn hint_linux_on_pvm(image: &[u8], cmdline: &str) {
    let linux = matches!(
        vmm::linux::detect(image),
        Ok(vmm::linux::KernelFormat::BzImage | vmm::linux::KernelFormat::Vmlinux { .. })
    );
    if linux && KvmKind::detect() == KvmKind::Pvm {
        if !(cmdline.contains("noxsave") && cmdline.contains("clearcpuid=smap")) {
            warn!("kvm_pvm cannot emulate XSAVE or SMAP: add \"noxsave clearcpuid=smap\" to a stock Linux kernel's --cmdline");
        }
        info!("on kvm_pvm a stock Linux kernel runs its ring 0 emulated (~100x slower): a bzImage decompresses for minutes (boot the uncompressed vmlinux), and the kernel stops on an INT3 before user space");
    }
}

/// Reads the --initrd file, if any.
fn read_initrd(path: Option<&std::path::Path>) -> Result<Option<Vec<u8>>> {
    path.map(|p| {
        std::fs::read(p).with_context(|| format!("cannot read the initramfs {}", p.display()))
    })
    .transpose()
}

fn run(args: RunArgs) -> Result<()> {
    let kind = KvmKind::detect();
    info!("{}", kind.describe());
    let m = &args.machine;
    vmm::memory::layout(m.mem)?;
    let disk = m.disk(args.kernel.is_none().then_some(&args.workload))?;
    let (image, cmdline) = match &args.kernel {
        Some(path) => {
            let image = std::fs::read(path)
                .with_context(|| format!("cannot read the kernel {}", path.display()))?;
            (image, args.cmdline.clone())
        }
        None => {
            let w = &args.workload;
            if m.vcpus > guest::MAX_CPUS {
                bail!(
                    "castor's guest supports at most {} vCPUs (asked for {})",
                    guest::MAX_CPUS,
                    m.vcpus
                );
            }
            let need = w.mib_per_vcpu() * (1 << 20) * m.vcpus as u64 + (16 << 20);
            if need > m.mem.min(vmm::memory::MMIO_HOLE_START) {
                bail!(
                    "workload '{w}' needs {} MiB per vCPU x {} vCPUs plus 16 MiB for the guest kernel, more than --mem {} MiB (below 3 GiB) holds: lower mib= or raise --mem",
                    w.mib_per_vcpu(),
                    m.vcpus,
                    m.mem >> 20
                );
            }
            let tsc = vmm::host_tsc_khz(&m.kvm_device)?;
            (
                guest::KERNEL.to_vec(),
                w.cmdline(m.vcpus, tsc, Some(MMIO_CONSOLE_BASE)),
            )
        }
    };
    let config = MachineConfig {
        mem_bytes: m.mem,
        vcpus: m.vcpus,
        dirty_tracking: args.track_ms.is_some(),
        kvm_device: m.kvm_device.clone(),
        net: m.net(args.kernel.is_none().then_some(&args.workload)),
        ram_file: None,
        disk,
    };
    let initrd = read_initrd(args.initrd.as_deref())?;
    hint_linux_on_pvm(&image, &cmdline);
    let tap = open_tap(&m.tap)?;
    let t0 = Instant::now();
    let mut machine = Machine::boot_image(
        &config,
        &image,
        initrd.as_deref(),
        &cmdline,
        Console::new(Box::new(StdoutSink), 0),
    )?;
    attach_unprotected(&machine, tap);
    info!(
        mem_mib = m.mem >> 20,
        vcpus = m.vcpus,
        cmdline = %cmdline,
        "VM started in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut snapshot = args.snapshot_at.zip(args.snapshot_dir.clone());
    let track = args.track_ms.map(Duration::from_millis);
    let mut next_harvest = track.unwrap_or_default();
    let (mut harvests, mut dirty_pages) = (0u64, 0u64);
    let tick = if track.is_some() {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(10)
    };
    let r = supervise(&mut machine, args.duration, tick, |machine, elapsed| {
        if let Some(every) = track {
            if elapsed >= next_harvest {
                dirty_pages += machine.harvest_dirty()?.frames().count() as u64;
                harvests += 1;
                next_harvest += every;
                if next_harvest < elapsed {
                    next_harvest = elapsed + every;
                }
            }
        }
        if let Some((at, dir)) = &snapshot {
            if elapsed >= *at {
                let t = Instant::now();
                machine.pause()?;
                let state = machine.capture()?;
                let written = vmm::snapshot::write(dir, &state, machine.memory());
                machine.resume()?;
                written?;
                info!(
                    dir = %dir.display(),
                    console_offset = state.console_offset,
                    "snapshot written in {:.1} ms",
                    t.elapsed().as_secs_f64() * 1e3
                );
                snapshot = None;
            }
        }
        Ok(())
    });
    report_disk(&machine);
    if track.is_some() {
        info!(
            harvests,
            dirty_pages_mean = dirty_pages as f64 / harvests.max(1) as f64,
            "dirty tracking (no checkpointing)"
        );
    }
    r
}

fn restore(args: RestoreArgs) -> Result<()> {
    info!("{}", KvmKind::detect().describe());
    let t0 = Instant::now();
    let snap = vmm::snapshot::Snapshot::open(&args.dir)?;
    let state = &snap.state;
    if state.disk.is_some() && args.disk.is_none() {
        bail!(
            "the snapshot in {} has a disk: add --disk FILE (the image the snapshotted guest used)",
            args.dir.display()
        );
    }
    let disk = open_disk(args.disk.as_deref(), false)?;
    let mut machine = Machine::restore(
        state,
        |mem| snap.fill_memory(mem).map_err(std::io::Error::other),
        Box::new(StdoutSink),
        false,
        &args.kvm_device,
        disk,
    )?;
    attach_unprotected(&machine, open_tap(&args.tap)?);
    info!(
        dir = %args.dir.display(),
        vcpus = state.vcpus.len(),
        mem_mib = state.memory_size() >> 20,
        console_offset = state.console_offset,
        "VM restored in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let r = supervise(
        &mut machine,
        args.duration,
        Duration::from_millis(10),
        |_, _| Ok(()),
    );
    report_disk(&machine);
    r
}

/// Where this node keeps the VM's image (`--image-dir`), if anywhere.
fn image_paths(pair: &PairArgs, p: &ProtectArgs) -> Result<Option<vmm::image::ImagePaths>> {
    p.image_dir
        .as_deref()
        .map(|d| vmm::image::ImagePaths::new(d, &pair.vm, &pair.node))
        .transpose()
        .map_err(Into::into)
}

/// An unprotected guest's card sends straight to its tap (or nowhere).
fn attach_unprotected(machine: &Machine, tap: Option<Arc<vmm::tap::Tap>>) {
    if let Some(dev) = machine.net() {
        match tap {
            Some(t) => dev.attach(t.clone(), Some(t)),
            None => {
                warn!("the guest has a network card but no --tap: its frames go nowhere");
                dev.attach(Arc::new(vmm::virtio_net::Discard), None)
            }
        }
    }
}

/// The witness of a pair's flags, and the one-line warning of `none`.
fn witness_of(pair: &PairArgs) -> Result<Option<witness::Etcd>> {
    match &pair.witness {
        witness::Spec::None => {
            warn!("--witness none: only a crashed primary is handled safely; a paused, slow or cut-off primary and a backup that took over can both run the guest and release output");
            Ok(None)
        }
        witness::Spec::Etcd(endpoints) => Ok(Some(witness::Etcd::new(endpoints, &pair.vm)?)),
    }
}

/// `--link-faults` with its seed drawn, once for the whole daemon (its
/// primary and backup roles share it), and logged.
fn resolve_link_faults(p: &mut ProtectArgs) {
    p.link_faults = p.link_faults.resolved();
    if p.link_faults.is_active() {
        warn!(faults = %p.link_faults, "--link-faults: the datagrams this node sends to its peer are impaired");
    }
}

fn primary_config(
    pair: &PairArgs,
    p: &ProtectArgs,
    backup: Option<std::net::SocketAddr>,
    witness: Option<witness::Etcd>,
    tap: Option<Arc<vmm::tap::Tap>>,
) -> Result<primary::Config> {
    fgbi::check_block_size(p.block_size)?;
    let epoch = epoch_length(p)?;
    let tls = transport::NodeTls::from_dir(&pair.certs, &pair.node, &pair.peer)?;
    Ok(primary::Config {
        tap,
        witness,
        hold_limit: HOLD_LIMIT,
        budget_bytes: p.budget,
        node: pair.node.clone(),
        backup,
        tls,
        certs: pair.certs.clone(),
        epoch,
        mode: p.mode,
        block_size: p.block_size,
        max_in_flight: p.max_in_flight.max(1),
        heartbeat: Duration::from_millis(p.heartbeat_ms.max(1)),
        backup_timeout: Duration::from_millis(p.backup_timeout_ms.max(10)),
        verify: p.verify,
        link: transport::link::LinkShape {
            rate_bytes_per_s: p.link_rate.0,
            delay: p.link_delay,
        },
        link_faults: p.link_faults,
        precopy: p.precopy_ms.map(Duration::from_millis),
        resync_releases_output: p.resync_output == ResyncOutput::Release,
    })
}

/// `--resync-output`: what a full resync does with the guest's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ResyncOutput {
    /// Released as written; the backup takes over from the checkpoint after
    /// the resync.
    Release,
    /// Held from the resync's pause; the backup may take over from it.
    Hold,
}

/// The runtime and console service of a daemon; its threads run at
/// real-time priority so that heartbeats, acks and the failure detector are
/// not starved by a spinning guest.
fn services(name: &str, pair: &PairArgs) -> Result<node::Services> {
    raise_fd_limit();
    let at = node::services::Endpoints {
        console: pair.console,
        control: pair
            .control
            .clone()
            .unwrap_or_else(|| node::control::default_path(&pair.node)),
        metrics: pair.metrics,
        console_keep: usize::try_from(pair.console_keep).unwrap_or(usize::MAX),
    };
    node::Services::start(
        name,
        &at,
        std::sync::Arc::new(|_: &node::control::Request| {
            node::control::Response::Error("starting".into())
        }),
        || {
            let _ = vmm::set_current_thread_realtime(vmm::priority::NETWORK);
        },
    )
    .context("starting the node's services")
}

/// Raises the soft limit on open files to the hard one: console clients
/// each hold one, and a failover needs some (vCPUs, the VM, sockets).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        let raised = Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!("cannot raise the open-file limit: {e}");
        }
    }
}

fn stop_after(duration: Option<Duration>) -> Result<Arc<AtomicBool>> {
    let stop = stop_flag()?;
    if let Some(d) = duration {
        let s = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            s.store(true, Ordering::Relaxed);
        });
    }
    Ok(stop)
}

/// Makes this node the VM's owner at the witness (a new generation),
/// waiting for a witness that does not answer yet — a daemon started at
/// boot may come up before its etcd — for at most `wait` (`None`: until
/// it answers or `stop`). `Ok(None)`: stopped while waiting.
fn acquire_waiting(
    w: &witness::Etcd,
    node: &str,
    take_ownership: bool,
    wait: Option<Duration>,
    stop: &AtomicBool,
) -> Result<Option<u64>> {
    let t0 = Instant::now();
    let mut pause = Duration::from_millis(200);
    let mut told = false;
    loop {
        match w.acquire(node, take_ownership) {
            Ok(t) => return Ok(Some(t)),
            Err(e @ witness::WitnessError::OwnedBy { .. }) => bail!(
                "{e}: it booted or took over the VM and may be running it; this node does not \
                 boot a new generation over it. Start this node as its backup instead \
                 (castor backup), or pass --take-ownership if that node is gone for good \
                 or its guest may be discarded"
            ),
            Err(e @ witness::WitnessError::Unreachable(_)) => {
                if wait.is_some_and(|d| t0.elapsed() >= d) {
                    return Err(e).with_context(|| {
                        format!(
                            "{}: a primary does not start without its witness (waited {:.0} s, --witness-wait)",
                            w.describe(),
                            t0.elapsed().as_secs_f64()
                        )
                    });
                }
                if !told {
                    warn!(
                        witness = %w.describe(),
                        "the witness does not answer ({e}); waiting for it: a primary does not boot its guest before the witness names it the owner"
                    );
                    told = true;
                } else {
                    debug!("the witness still does not answer: {e}");
                }
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{}: a primary does not start without its witness",
                        w.describe()
                    )
                })
            }
        }
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

fn primary_cmd(mut a: PrimaryArgs) -> Result<()> {
    info!("{}", KvmKind::detect().describe());
    vmm::set_vcpu_nice(a.protect.vcpu_nice);
    if let Some(addr) = a.incoming {
        return migrate_cmd::incoming_primary(&a, addr);
    }
    let m = &a.machine;
    vmm::memory::layout(m.mem)?;
    if m.mem > vmm::memory::MMIO_HOLE_START {
        bail!(
            "replication supports guests of at most 3 GiB for now (asked for {} MiB)",
            m.mem >> 20
        );
    }
    let disk = m.disk(a.kernel.is_none().then_some(&a.workload))?;
    let tsc = vmm::host_tsc_khz(&m.kvm_device)?;
    let image = image_paths(&a.pair, &a.protect)?;
    let machine = MachineConfig {
        mem_bytes: m.mem,
        vcpus: m.vcpus,
        dirty_tracking: true,
        kvm_device: m.kvm_device.clone(),
        net: m.net(a.kernel.is_none().then_some(&a.workload)),
        ram_file: image.as_ref().map(|p| p.ram.clone()),
        disk,
    };
    let (kernel, cmdline) = match &a.kernel {
        Some(path) => (
            std::fs::read(path)
                .with_context(|| format!("cannot read the kernel {}", path.display()))?,
            a.cmdline.clone(),
        ),
        None => (
            guest::KERNEL.to_vec(),
            a.workload.cmdline(m.vcpus, tsc, Some(MMIO_CONSOLE_BASE)),
        ),
    };
    let witness = witness_of(&a.pair)?;
    resolve_link_faults(&mut a.protect);
    // Local configuration first (certificates, sizes): a bad one fails
    // before anything changes at the witness.
    let mut cfg = primary_config(&a.pair, &a.protect, a.backup, witness.clone(), None)?;
    cfg.tap = open_tap(&m.tap)?;
    // Signals first: a primary waiting for its witness stops on SIGTERM.
    let stop = stop_after(a.duration)?;
    // A primary that boots the VM starts a new generation of its ownership.
    let token = match &witness {
        Some(w) => {
            let Some(token) =
                acquire_waiting(w, &a.pair.node, a.take_ownership, a.witness_wait, &stop)?
            else {
                info!("stopped while waiting for the witness");
                return Ok(());
            };
            info!(token, witness = %w.describe(), "this node owns the VM");
            token
        }
        None => 0,
    };
    let node = services("castor-net", &a.pair)?;
    let initrd = read_initrd(a.initrd.as_deref())?;
    hint_linux_on_pvm(&kernel, &cmdline);
    let vm = Machine::boot_image(
        &machine,
        &kernel,
        initrd.as_deref(),
        &cmdline,
        Console::new(node::console::sink(node.log.clone()), 0),
    )?;
    let gens = match &image {
        Some(p) => Some(Arc::new(
            vmm::image::GenTable::open(&p.gen, m.mem / 4096, false)?.0,
        )),
        None => None,
    };
    let metrics = primary::protect(
        &cfg,
        &node,
        vm,
        primary::Origin::Booted { token },
        gens,
        stop,
    )?;
    metrics.log_summary("primary stopped");
    Ok(())
}

fn backup_cmd(mut a: BackupArgs) -> Result<()> {
    info!("{}", KvmKind::detect().describe());
    vmm::set_vcpu_nice(a.protect.vcpu_nice);
    let tls = transport::NodeTls::from_dir(&a.pair.certs, &a.pair.node, &a.pair.peer)?;
    // What the node does as a primary if it takes over (no backup: it runs
    // the guest unprotected).
    let witness = witness_of(&a.pair)?;
    resolve_link_faults(&mut a.protect);
    let mut then = primary_config(&a.pair, &a.protect, a.then_protect, witness.clone(), None)?;
    then.tap = open_tap(&a.tap)?;
    let silence = Duration::from_millis(a.heartbeat_timeout_ms.max(1));
    let cfg = backup::Config {
        listen: a.listen,
        tls,
        timeouts: node::ha::Timeouts {
            silence,
            // Without a witness a false takeover splits the VM, so the
            // detector is patient while a resync's backlog drains; with one
            // it is safe (the loser is fenced) and the detector stays quick.
            after_resync: if witness.is_some() {
                silence
            } else {
                RESYNC_TIMEOUT
            },
            resync_grace: RESYNC_GRACE,
        },
        kvm_device: a.kvm_device,
        max_epoch_bytes: usize::try_from(a.max_epoch_bytes).unwrap_or(usize::MAX),
        max_memory_bytes: match a.max_memory {
            Some(m) => m,
            None => host_memory()?,
        },
        max_vcpus: a.max_vcpus,
        node: a.pair.node.clone(),
        witness,
        image: match (&a.protect.image_dir, a.reuse) {
            (None, true) => Some(vmm::image::ImagePaths::new(
                std::path::Path::new(vmm::image::DEFAULT_DIR),
                &a.pair.vm,
                &a.pair.node,
            )?),
            _ => image_paths(&a.pair, &a.protect)?,
        },
        reuse: a.reuse,
        disk: match &a.disk {
            Some(p) => Some(Arc::new(vmm::disk::Disk::open(p)?)),
            None => None,
        },
        link_faults: a.protect.link_faults,
    };
    let stop = stop_flag()?;
    let node = services("castor-backup", &a.pair)?;
    match backup::run(&cfg, &node, stop.clone())? {
        backup::Outcome::Stopped => {}
        backup::Outcome::TookOver(t) => {
            let origin = primary::Origin::TookOver {
                resumed_at: t.resumed_at,
                token: t.token,
            };
            let metrics = primary::protect(&then, &node, t.machine, origin, t.gens, stop)?;
            metrics.log_summary("primary (after failover) stopped");
        }
    }
    node.log.close();
    Ok(())
}

/// Console bytes a primary holds while the witness decides before it
/// pauses the guest.
const HOLD_LIMIT: u64 = 4 << 20;

/// How long after a full resync the longer failure-detector timeout applies.
const RESYNC_GRACE: Duration = Duration::from_secs(2);
/// The failure detector's timeout during that time without a witness: the
/// primary catches up a backlog after a resync (its guest was paused for it).
const RESYNC_TIMEOUT: Duration = Duration::from_millis(500);

fn control(a: &StatusArgs, req: node::control::Request) -> Result<node::control::Response> {
    let path = a.socket()?;
    let req = match &a.vm {
        Some(vm) => node::control::Request::Vm(node::control::VmRequest {
            vm: vm.clone(),
            request: Box::new(req),
        }),
        None => req,
    };
    Ok(node::control::request(
        &path,
        &req,
        Duration::from_secs(10),
    )?)
}

fn status_cmd(a: StatusArgs) -> Result<()> {
    match control(&a, node::control::Request::Status)? {
        node::control::Response::Status(s) if a.json => println!("{}", s.to_json()),
        node::control::Response::Status(s) => print!("{}", s.summary()),
        node::control::Response::Ok(m) => println!("{m}"),
        node::control::Response::Error(e) => bail!("{e}"),
    }
    Ok(())
}

fn takeover_cmd(a: StatusArgs) -> Result<()> {
    match control(&a, node::control::Request::Takeover)? {
        node::control::Response::Ok(m) => println!("ok: {m}"),
        node::control::Response::Status(s) => println!("{}", s.to_json()),
        node::control::Response::Error(e) => bail!("{e}"),
    }
    Ok(())
}

/// Expands `--config FILE` (TOML: keys are long flag names, e.g.
/// `epoch-ms = 25`, `verify = true`) into flags placed before the others, so
/// that flags given on the command line win.
///
/// Without `--config`, `castor primary` and `castor backup` read
/// `/etc/castor/ROLE.toml` when it exists (`$CASTOR_CONFIG_DIR` instead of
/// `/etc/castor` if set), as a service manager would start them.
fn expand_config(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>> {
    let (i, path) = match args.iter().position(|a| a == "--config") {
        Some(i) => (
            Some(i),
            args.get(i + 1).context("--config needs a file")?.clone(),
        ),
        None => match default_config(&args) {
            Some(p) => {
                eprintln!("castor: reading {}", p.display());
                (None, p.into_os_string())
            }
            None => return Ok(args),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.to_string_lossy()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.to_string_lossy()))?;
    let mut flags: Vec<std::ffi::OsString> = Vec::new();
    for (k, v) in table {
        let key = format!("--{}", k.replace('_', "-"));
        match v {
            toml::Value::Boolean(true) => flags.push(key.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => flags.extend([key.into(), s.into()]),
            toml::Value::Integer(n) => flags.extend([key.into(), n.to_string().into()]),
            toml::Value::Float(f) => flags.extend([key.into(), f.to_string().into()]),
            other => bail!(
                "{}: '{k}' must be a string, number or boolean, not {}",
                path.to_string_lossy(),
                other.type_str()
            ),
        }
    }
    // castor SUBCOMMAND [config flags] [the rest]
    let mut out: Vec<std::ffi::OsString> = args[..2.min(args.len())].to_vec();
    out.extend(flags);
    out.extend(
        args[2.min(args.len())..]
            .iter()
            .enumerate()
            .filter(|(j, _)| i.is_none_or(|i| *j + 2 != i && *j + 2 != i + 1))
            .map(|(_, a)| a.clone()),
    );
    Ok(out)
}

/// `/etc/castor/ROLE.toml` for `castor primary|backup`, if it exists.
fn default_config(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let role = args.get(1)?.to_str()?;
    if !matches!(role, "primary" | "backup") || args.iter().any(|a| a == "--help" || a == "-h") {
        return None;
    }
    let dir = std::env::var_os("CASTOR_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/castor"));
    let p = dir.join(format!("{role}.toml"));
    p.is_file().then_some(p)
}

fn certs(args: CertsArgs) -> Result<()> {
    let made = transport::certs::create_with(&transport::certs::Options {
        dir: args.dir.clone(),
        ca_dir: args.ca_dir.clone(),
        nodes: args.nodes.clone(),
        days: args.days,
        force: args.force,
    })?;
    let until = transport::certs::date(made.not_after);
    println!(
        "node files, in {} (each node needs ca.pem and its own NODE.pem, NODE.key):",
        args.dir.display()
    );
    for f in &made.node_files {
        println!("  {}", f.display());
    }
    println!("valid until {until} ({} days)", args.days);
    println!(
        "CA private key: {}\n  no daemon needs it; keep it offline (it signs certificates any node will trust)",
        made.ca_key.display()
    );
    if let Some(old) = &made.removed_legacy_ca_key {
        println!(
            "removed the old CA key {} from the node directory",
            old.display()
        );
    }
    info!(dir = %args.dir.display(), nodes = ?args.nodes, days = args.days, "certificate authority and node certificates written");
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = match expand_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("castor: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Restore(a) => restore(a),
        Command::Certs(a) => certs(a),
        Command::Primary(a) => primary_cmd(a),
        Command::Backup(a) => backup_cmd(a),
        Command::Status(a) => status_cmd(a),
        Command::Takeover(a) => takeover_cmd(a),
        Command::Demo(a) => lab::demo(a),
        Command::Drill(a) => lab::drill(a),
        Command::Bench(a) => lab::bench(a),
        Command::Net(a) => lab::netlab::net(a),
        Command::Loadgen(a) => lab::loadgen::loadgen(a),
        Command::Linearize(a) => lab::loadgen::linearize_file(a),
        Command::Migrate(a) => migrate_cmd::ask(a),
        Command::MigrateRun(a) => migrate_cmd::run(a),
        Command::MigrateListen(a) => migrate_cmd::listen(a),
        Command::Agent(a) => fleet_cmd::agent(a),
        Command::FleetDemo(a) => lab::fleetdemo::fleet_demo(a),
        Command::Vm(c) => fleet_cmd::vm(c),
        Command::Host(c) => fleet_cmd::host(c),
        Command::Protect(a) => fleet_cmd::protect(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("castor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
