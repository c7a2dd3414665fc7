//! The backup role: keeps a replica of the primary's guest at the last
//! committed checkpoint, and takes over when the primary is lost.
//!
//! One step per file:
//! - [`net`](crate::net): the session with the primary — checkpoints in,
//!   acks out, heartbeats — and each session's end reported to the core;
//! - [`replica`](crate::replica): the replica and the commit of a
//!   checkpoint: staged by the protocol's [`protocol::Receiver`], handed
//!   over only at its commit with a matching digest, applied by
//!   `fgbi::apply`, which validates the whole epoch before writing a byte —
//!   the replica only ever moves from one committed checkpoint to the next;
//!   with verification on, the pages written are checked against the
//!   primary's digest;
//! - [`watch`](crate::watch): the failure detector's timer, feeding the
//!   [`node::ha::BackupCore`] that decides the takeover;
//! - [`takeover`](crate::takeover): the standby VM kept over the replica RAM
//!   and the restore onto it;
//! - [`disk`]: the backup's disk, written at each commit through a journal,
//!   so that it is always at the last committed checkpoint like the RAM.
//!
//! [`run`] returns when the node is stopped, or with the running guest when
//! it took over: the caller then protects it as a primary.
#![forbid(unsafe_code)]

mod config;
pub mod disk;
mod net;
mod replica;
mod takeover;
mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node::control::{Request, Response};
use node::ha::{BackupCore, TakeoverAnswer};
use node::{BackupStatus, Role, Services, Status};
use tracing::{info, warn};
use transport::Listener;
use vmm::Machine;

pub use config::{BackupError, Config};
use replica::Shared;

/// How the backup role ended.
pub enum Outcome {
    /// Stopped on request.
    Stopped,
    /// This node took over: the guest runs here.
    TookOver(Box<Takeover>),
}

/// A guest this node took over.
pub struct Takeover {
    /// The running machine; its console goes to the node's log.
    pub machine: Machine,
    /// The committed checkpoint it resumed from.
    pub epoch: u64,
    /// The console offset it resumed at: the first byte of its history here.
    pub resumed_at: u64,
    /// The fencing token it won (0 without a witness).
    pub token: u64,
    /// The generations of the guest's pages (the replica's), which the
    /// primary role continues.
    pub gens: Option<Arc<vmm::image::GenTable>>,
}

/// Runs the backup role on `services` until `stop` is set or it takes over.
pub fn run(
    cfg: &Config,
    services: &Services,
    stop: Arc<AtomicBool>,
) -> Result<Outcome, BackupError> {
    let disk = match &cfg.disk {
        Some(d) => {
            let (disk, _) =
                disk::BackupDisk::open(d.clone()).map_err(|err| BackupError::Journal {
                    path: disk::journal_path(d.path()),
                    err,
                })?;
            info!(disk = %d.path().display(), mib = d.bytes() >> 20, "the guest's disk is kept here");
            Some(disk)
        }
        None => None,
    };
    let shared = Shared::new(
        BackupCore::new(cfg.timeouts, cfg.witness.is_some()),
        services.metrics.clone(),
        cfg.image.clone(),
        disk,
    );
    if cfg.reuse {
        if let Some(paths) = &cfg.image {
            shared.load_image(paths);
        }
    }
    let log = services.log.clone();
    services
        .control
        .replace(control(shared.clone(), log.clone()));
    let listener = services
        .rt
        .block_on(async { Listener::bind_impaired(cfg.listen, &cfg.tls, &cfg.link_faults) })?;
    info!(listen = %listener.local_addr()?, peer = %cfg.tls.peer_name, "backup listening");
    let (decided_tx, decided) = std::sync::mpsc::channel();
    services.rt.spawn(net::accept_loop(
        listener,
        shared.clone(),
        log.clone(),
        cfg.limits(),
    ));
    let witness = cfg.witness.clone().map(|w| (w, cfg.node.clone()));
    let (sh, st) = (shared.clone(), stop.clone());
    let watchdog = std::thread::Builder::new()
        .name("castor-watchdog".into())
        .spawn(move || {
            // As the heartbeat threads, above the network runtimes: a
            // spinning guest or a busy runtime must not delay it.
            let _ = vmm::set_current_thread_realtime(vmm::priority::LIVENESS);
            watch::watchdog(sh, witness, decided_tx, st)
        })
        .map_err(BackupError::Watchdog)?;
    // It ends by itself: when it decides, or when `stop` is set.
    drop(watchdog);

    // Wait for a takeover or a stop; meanwhile keep a standby VM over the
    // session's replica RAM.
    let mut standby = takeover::Standby::default();
    let decision = loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(Outcome::Stopped);
        }
        if let Ok(d) = decided.recv_timeout(Duration::from_millis(20)) {
            break d;
        }
        standby.refresh(&shared, &cfg.kvm_device);
    };
    let t = Instant::now();
    let (machine, resumed_at, gens) = takeover::restore(&shared, standby, &log, &cfg.kvm_device)?;
    services.metrics.takeovers.inc();
    warn!(
        epoch = decision.epoch,
        console_offset = resumed_at,
        silent_ms = decision.silent.as_millis() as u64,
        asked = decision.asked,
        token = decision.token,
        beats = decision.heard.beats,
        since_beat_ms = decision.heard.since_beat_ms,
        since_datagram_ms = decision.heard.since_datagram_ms,
        restore_ms = t.elapsed().as_secs_f64() * 1e3,
        "FAILOVER: the primary is lost; the guest runs here from the last committed checkpoint"
    );
    Ok(Outcome::TookOver(Box::new(Takeover {
        machine,
        epoch: decision.epoch,
        resumed_at,
        token: decision.token,
        gens,
    })))
}

/// The control requests a backup answers.
fn control(shared: Arc<Shared>, log: Arc<node::console::ConsoleLog>) -> node::control::Handler {
    Arc::new(move |req: &Request| {
        match req {
        Request::Takeover => {
            let answer: TakeoverAnswer = shared.core().ask_takeover();
            let text = answer.to_string();
            match answer {
                TakeoverAnswer::Accepted => {
                    Response::Ok(text.trim_start_matches("ok: ").to_string())
                }
                _ => Response::Error(text.trim_start_matches("error: ").to_string()),
            }
        }
        Request::Vm(_) => Response::Error(
            "this is a VM's daemon; a request for a VM by name is asked of its host's agent".into(),
        ),
        Request::Reset => Response::Error("a backup has no figures to reset".into()),
        Request::Protect(_) => Response::Error(
            "this node is a backup: a new backup is asked of the primary (or of this node once it has taken over)".into(),
        ),
        Request::Migrate(_) => Response::Error(
            "this node is a backup: a migration is asked of the node running the guest".into(),
        ),
        Request::Status => {
            let r = shared.replica();
            let taken_over = shared.core().taken_over();
            Response::Status(Box::new(Status {
                role: if taken_over {
                    Role::TakenOver
                } else {
                    Role::Backup
                },
                console_released: log.released(),
                console_end: log.end(),
                resumed_at: None,
                primary: None,
                backup: Some(BackupStatus {
                    connected: shared.connected.load(Ordering::Relaxed),
                    protocol: Some(shared.protocol.load(Ordering::Relaxed)).filter(|&v| v != 0),
                    verifying: r.verifying,
                    committed_epoch: r.epoch,
                    session: r.session,
                    checkpoints_applied: shared.applied.load(Ordering::Relaxed),
                    verify_mismatches: shared.mismatches.load(Ordering::Relaxed),
                    disk: shared.disk.as_ref().map(|d| {
                        format!(
                            "{}, {} MiB, kept at the committed checkpoint",
                            d.disk().path().display(),
                            d.disk().bytes() >> 20
                        )
                    }),
                    last_refusal: shared
                        .last_refusal
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                }),
            }))
        }
    }
    })
}
