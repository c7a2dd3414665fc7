//! The primary role: keeps a running guest protected.
//!
//! A node runs the primary role for the guest it booted (`castor primary`)
//! or for the guest it took over as a backup (`castor backup
//! --then-protect`). Either way the node's [`node::Services`] — runtime,
//! console log, command words — stay, and this role takes them over.
//!
//! One step of the data path per file:
//! - [`epoch`](crate::epoch): the epoch loop — timing, pause, resume, the
//!   [`node::ha::PrimaryCore`] fed with network events and its actions
//!   (release output, start a session, fence) carried out;
//! - [`copy`](crate::copy): the copies of the dirty pages, with the pre-copy;
//! - [`checkpoint`](crate::checkpoint): copies, state and console bytes
//!   encoded into one checkpoint's frames;
//! - [`net_output`]: the guest's network frames, held behind the same
//!   output commit as its console ([`node::packets`]);
//! - [`net`](crate::net): the connection to the backup (frames out, acks
//!   in, heartbeats), which decides nothing;
//! - [`metrics`]: the figures behind `castor status`.
//!
//! Without a backup the guest keeps running, the role says loudly that it
//! is unprotected, releases output at once, and keeps trying to reach the
//! backup; a backup that comes (back) gets a full resync.

mod checkpoint;
mod config;
mod copy;
mod epoch;
mod metrics;
mod net;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use node::console::ConsoleLog;
use node::control::{Request, Response};
use node::ha::PrimaryCore;
use node::packets::PacketHold;
use node::{PrimaryStatus, Role, Services, Status};
use tokio::sync::mpsc;
use tracing::{info, warn};
use vmm::Machine;

pub use config::{precopy_window, Config, EpochLength, PrimaryError, AUTO_START};
pub use metrics::{EpochFigures, Metrics};

/// How the guest came to run on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node booted it.
    Booted {
        /// The fencing token it acquired at the witness (0 without one).
        token: u64,
    },
    /// This node took it over as a backup.
    TookOver {
        /// The console offset of the first byte of this node's history.
        resumed_at: u64,
        /// The fencing token it won at the witness (0 without one).
        token: u64,
    },
}

impl Origin {
    fn token(self) -> u64 {
        match self {
            Origin::Booted { token } | Origin::TookOver { token, .. } => token,
        }
    }
}

/// Protects `machine`, whose console goes to `services.log`, until `stop`
/// is set, the guest stops, or this node is fenced. Answers `status` and
/// `reset` on the node's control socket from now on.
///
/// `gens` are the generations of the guest's pages (its image's table, or
/// after a takeover the replica's); `None`: a table in memory, every page
/// unknown until the first full resync.
pub fn protect(
    cfg: &Config,
    services: &Services,
    machine: Machine,
    origin: Origin,
    gens: Option<Arc<vmm::image::GenTable>>,
    stop: Arc<AtomicBool>,
) -> Result<Arc<Metrics>, PrimaryError> {
    if vmm::memory::ram_size(machine.memory()) > vmm::memory::MMIO_HOLE_START {
        return Err(PrimaryError::Layout);
    }
    let metrics = Arc::new(Metrics::new(cfg.mode, cfg.epoch, services.metrics.clone()));
    let packets = net_output(cfg, &machine);
    services.control.replace(control(
        metrics.clone(),
        services.log.clone(),
        origin,
        packets.clone(),
    ));
    let pages = vmm::memory::ram_size(machine.memory()) / 4096;
    let log = services.log.clone();
    let gens = gens
        .filter(|g| g.pages() == pages)
        .unwrap_or_else(|| Arc::new(vmm::image::GenTable::in_memory(pages)));
    // The guest runs on this RAM: the tags describe it only as sent.
    let h = gens.header();
    gens.set_header(false, h.session, h.epoch);
    // Dirty tracking starts with the first session (a full resync copies
    // everything anyway): after a failover the guest runs at once, without
    // waiting for KVM to re-register its memory with dirty logging.
    let (out_tx, out_rx) = mpsc::channel(cfg.max_in_flight.max(1) + 1);
    let (events_tx, events_rx) = std_mpsc::channel();
    let claims = events_tx.clone();
    // Without a backup only claims send events; the loop runs unprotected
    // until stopped.
    let mut beat = (0, [0u8; 32]);
    let mut net_task = None;
    let farewell = net::Farewell::new();
    if let Some(backup) = cfg.backup {
        // The heartbeat path: a UDP socket of its own, a key for the hello.
        let any = transport::any_addr_for(backup);
        let sock = std::net::UdpSocket::bind(any).map_err(PrimaryError::Beat)?;
        sock.set_nonblocking(true).map_err(PrimaryError::Beat)?;
        beat = (
            sock.local_addr().map_err(PrimaryError::Beat)?.port(),
            rand::random(),
        );
        let path = net::BeatPath { sock, key: beat.1 };
        let net = net::run(
            cfg.clone(),
            backup,
            path,
            out_rx,
            events_tx,
            stop.clone(),
            farewell.clone(),
        );
        net_task = Some(services.rt.spawn(net));
    }
    let mut lp = epoch::EpochLoop {
        cfg,
        machine,
        log: log.clone(),
        packets: packets.clone(),
        metrics: metrics.clone(),
        out: out_tx,
        core: PrimaryCore::new(cfg.max_in_flight, cfg.witness.is_some(), origin.token()),
        claims,
        rt: services.rt.handle().clone(),
        held_pause: false,
        beat,
        pages,
        gens,
        awaiting: None,
        hello_at: None,
        session: None,
        staging: copy::Staging::new(pages),
        rt_pause: false,
    };
    let result = lp.run(&events_rx, &stop);
    // A planned stop: the network task says goodbye naming the last
    // checkpoint queued and keeps the session — heartbeats included — until
    // the backup has committed it and ended the session, or `GOODBYE_WAIT`
    // passes. Until the goodbye arrives, silence would mean a takeover.
    stop.store(true, Ordering::Relaxed);
    if let Some(task) = net_task {
        lp.goodbye(&farewell);
        let wait = net::GOODBYE_WAIT + Duration::from_millis(500);
        let _ = services
            .rt
            .block_on(async move { tokio::time::timeout(wait, task).await });
    }
    lp.machine.stop();
    // Held output stays held, also on a planned stop: the goodbye may not
    // reach a backup whose link is full, and a backup that takes over
    // continues from its last committed checkpoint, which may not contain
    // it. (Unprotected, nothing is held.)
    log.close();
    if let Some(p) = &packets {
        p.close();
    }
    result.map(|()| metrics)
}

/// The guest's network output: a hold in front of this node's tap (or of
/// nothing, without `--tap`), attached to the machine's card, which
/// announces the guest on the tap (`vmm::virtio_net::NetDevice::attach`).
fn net_output(cfg: &Config, machine: &Machine) -> Option<Arc<PacketHold>> {
    let dev = machine.net()?;
    let out: Arc<dyn vmm::virtio_net::NetBackend> = match &cfg.tap {
        Some(tap) => {
            info!(tap = tap.name(), "the guest's network card is on this tap");
            tap.clone()
        }
        None => {
            warn!("the guest has a network card but this node has no --tap: its frames go nowhere and it receives none");
            Arc::new(vmm::virtio_net::Discard)
        }
    };
    let hold = PacketHold::new(out);
    dev.attach(hold.clone(), cfg.tap.clone());
    Some(hold)
}

/// The control requests a node running the guest answers.
fn control(
    metrics: Arc<Metrics>,
    log: Arc<ConsoleLog>,
    origin: Origin,
    packets: Option<Arc<PacketHold>>,
) -> node::control::Handler {
    Arc::new(move |req: &Request| match req {
        Request::Status => Response::Status(Box::new(Status {
            role: match origin {
                Origin::Booted { .. } => Role::Primary,
                Origin::TookOver { .. } => Role::TakenOver,
            },
            console_released: log.released(),
            console_end: log.end(),
            resumed_at: match origin {
                Origin::Booted { .. } => None,
                Origin::TookOver { resumed_at, .. } => Some(resumed_at),
            },
            primary: Some(PrimaryStatus {
                net: packets.as_ref().map(|p| p.figures()),
                ..metrics.figures()
            }),
            backup: None,
        })),
        Request::Reset => {
            metrics.reset();
            Response::Ok("figures reset".into())
        }
        Request::Takeover => {
            Response::Error("this node runs the guest; a takeover is asked of its backup".into())
        }
    })
}
