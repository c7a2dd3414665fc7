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
#![forbid(unsafe_code)]

mod checkpoint;
mod config;
mod copy;
mod disk;
mod epoch;
mod metrics;
mod migration;
mod net;
mod retarget;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

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
    let (events_tx, events_rx) = std_mpsc::channel();
    services.control.replace(control(
        metrics.clone(),
        services.log.clone(),
        origin,
        packets.clone(),
        events_tx.clone(),
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
    // Without a backup only claims and control requests send events; the
    // loop runs unprotected until stopped (or the guest moves).
    let alive = net::Alive::new();
    alive.touch();
    let target = cfg.backup.map(|addr| retarget::Target {
        addr,
        tls: cfg.tls.clone(),
    });
    metrics.set_backup(target.as_ref().map(retarget::Target::describe));
    let mut lp = epoch::EpochLoop {
        cfg,
        machine,
        log: log.clone(),
        packets: packets.clone(),
        metrics: metrics.clone(),
        out: mpsc::channel(1).0,
        core: PrimaryCore::new(cfg.max_in_flight, cfg.witness.is_some(), origin.token()),
        claims: events_tx,
        rt: services.rt.handle().clone(),
        held_pause: false,
        beat: (0, [0u8; 32]),
        pages,
        gens,
        awaiting: None,
        hello_at: None,
        session: None,
        staging: copy::Staging::new(pages),
        rt_pause: false,
        net: None,
        migration: None,
        target,
        retarget: None,
        disk_diff: None,
        alive,
        versions: protocol::version::Fallback::new(protocol::version::SUPPORTED),
    };
    lp.restart_protection()?;
    let result = lp.run(&events_rx, &stop);
    // A planned stop: the network task says goodbye naming the last
    // checkpoint queued and keeps the session — heartbeats included — until
    // the backup has committed it and ended the session, or `GOODBYE_WAIT`
    // passes. Until the goodbye arrives, silence would mean a takeover.
    stop.store(true, Ordering::Relaxed);
    lp.end_protection();
    // A migration asked meanwhile is not carried out.
    while let Ok(ev) = events_rx.try_recv() {
        match ev {
            net::NetEvent::Migrate(o) => o.refuse("the primary is stopping"),
            net::NetEvent::Protect(o) => o.refuse("the primary is stopping"),
            _ => {}
        }
    }
    if let Some(o) = lp.migration.take() {
        o.refuse("the primary is stopping");
    }
    if let Some(o) = lp.retarget.take() {
        o.refuse("the primary is stopping");
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
            // Frames that queued while this node did not run the guest (a
            // backup keeps its tap open to take over at once) were the
            // other node's to handle: the guest must not read them again.
            let stale = tap.discard_pending();
            info!(
                tap = tap.name(),
                discarded = stale,
                "the guest's network card is on this tap (frames queued before the guest ran here are discarded)"
            );
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

/// The control requests a node running the guest answers. A migration is
/// carried out by the epoch loop (`events`); the answer waits for it.
fn control(
    metrics: Arc<Metrics>,
    log: Arc<ConsoleLog>,
    origin: Origin,
    packets: Option<Arc<PacketHold>>,
    events: std_mpsc::Sender<net::NetEvent>,
) -> node::control::Handler {
    let events = std::sync::Mutex::new(events);
    Arc::new(move |req: &Request| match req {
        Request::Migrate(m) => {
            let (reply, answer) = std_mpsc::channel();
            let order = migration::Order {
                req: m.clone(),
                reply,
            };
            let sent = events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(net::NetEvent::Migrate(Box::new(order)));
            if sent.is_err() {
                return Response::Error("the guest no longer runs on this node".into());
            }
            match answer.recv() {
                Ok(Ok(report)) => Response::Ok(report),
                Ok(Err(why)) => Response::Error(why),
                Err(_) => Response::Error("the primary stopped during the migration".into()),
            }
        }
        Request::Protect(p) => {
            let (reply, answer) = std_mpsc::channel();
            let order = retarget::Order {
                req: p.clone(),
                reply,
            };
            let sent = events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(net::NetEvent::Protect(Box::new(order)));
            if sent.is_err() {
                return Response::Error("the guest no longer runs on this node".into());
            }
            match answer.recv() {
                Ok(Ok(done)) => Response::Ok(done),
                Ok(Err(why)) => Response::Error(why),
                Err(_) => Response::Error("the primary stopped before changing its backup".into()),
            }
        }
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
        Request::Vm(_) => Response::Error(
            "this is a VM's daemon; a request for a VM by name is asked of its host's agent".into(),
        ),
        Request::Takeover => {
            Response::Error("this node runs the guest; a takeover is asked of its backup".into())
        }
    })
}
