//! A migration asked of the primary (`castor migrate`, a control request):
//! stand the backup down, move the guest with [`migrate::source`], hand the
//! VM's ownership to the destination at the witness just before it runs the
//! guest ([`node::ha::handover`]), and stop here — or, when the migration
//! fails before that point, carry on here and protect the guest again.
//!
//! While the guest moves it is not protected: the backup stood down (a
//! goodbye; it keeps its replica and will not take over), output is
//! released at once, and a failure of this node during pre-copy loses the
//! guest as an unprotected guest is lost. The destination runs the guest
//! unprotected until it has a backup of its own.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use migrate::source::{Failure, Switch};
use migrate::{MigrateError, SourceConfig};
use node::control::MigrateRequest;
use node::ha::Handover;
use protocol::EndReason;
use tracing::{error, info, warn};

use crate::epoch::EpochLoop;
use crate::net::NetEvent;
use crate::PrimaryError;

/// How long the session's end and the witness's decision may take when the
/// backup is stood down before a migration.
const STAND_DOWN_WAIT: Duration = Duration::from_secs(10);

/// How long the handover waits for an unreachable witness (the guest is
/// paused meanwhile) before the guest stays here.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// A migration request and where its answer goes.
#[derive(Debug)]
pub(crate) struct Order {
    /// What was asked.
    pub req: MigrateRequest,
    /// The answer: the report as JSON, or why it failed.
    pub reply: std_mpsc::Sender<Result<String, String>>,
}

impl Order {
    /// Answers that the order is not carried out.
    pub fn refuse(self, why: &str) {
        let _ = self.reply.send(Err(why.to_string()));
    }
}

/// The primary's side of the commit point: the witness hands the VM to the
/// destination before `Go`; after `Go` the console and the network hold end
/// here (clients move on to the destination).
struct Gate<'a> {
    witness: Option<&'a witness::Etcd>,
    /// This node's name (a handover taken back names it again).
    me: &'a str,
    dest: &'a str,
    token: u64,
    log: &'a node::console::ConsoleLog,
    packets: Option<&'a node::packets::PacketHold>,
    /// The token the witness gave the destination (0: none yet).
    given: std::sync::atomic::AtomicU64,
    /// The token this node holds again after taking the VM back (0: none).
    back: std::sync::atomic::AtomicU64,
    /// A fault for the tests: stop this process (SIGSTOP) right after the
    /// witness handed the VM over, before `Go`.
    stop_after_handover: bool,
}

/// The environment variable that makes a primary stop itself (SIGSTOP)
/// right after the witness hands its VM to a migration's destination, if
/// its value is this node's certificate directory: the tests' way to
/// freeze the source exactly at the handover.
pub const FAULT_STOP_AFTER_HANDOVER: &str = "CASTOR_FAULT_STOP_AFTER_HANDOVER";

impl Gate<'_> {
    /// Takes the VM back from the destination at the witness: a claim from
    /// the token the handover gave it, which wins only if the destination
    /// has not claimed the VM from that token itself. `Ok(Ok(token))`:
    /// this node owns it again; `Ok(Err((owner, token)))`: the witness
    /// names `owner`; `None`: the witness did not answer within
    /// [`HANDOVER_WAIT`].
    fn claim_back(&self) -> Option<Result<u64, (String, u64)>> {
        let w = self.witness.expect("a claim back needs a witness");
        let given = self.given.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + HANDOVER_WAIT;
        loop {
            match w.claim(self.me, given) {
                witness::Claim::Won { token } => {
                    self.back.store(token, std::sync::atomic::Ordering::Relaxed);
                    return Some(Ok(token));
                }
                witness::Claim::Lost { owner, token } => return Some(Err((owner, token))),
                witness::Claim::Unreachable if Instant::now() >= deadline => return None,
                witness::Claim::Unreachable => std::thread::sleep(crate::epoch::CLAIM_RETRY),
            }
        }
    }
}

impl Switch for Gate<'_> {
    fn approve(&self) -> Result<(), MigrateError> {
        let Some(w) = self.witness else {
            return Ok(());
        };
        let deadline = Instant::now() + HANDOVER_WAIT;
        loop {
            let claim = w.claim(self.dest, self.token);
            match node::ha::handover(claim, self.dest, Instant::now() >= deadline) {
                Handover::Go { token } => {
                    info!(
                        dest = self.dest,
                        token, "the witness gives the VM to the destination"
                    );
                    self.given
                        .store(token, std::sync::atomic::Ordering::Relaxed);
                    if self.stop_after_handover {
                        warn!(
                            "fault injection: stopping this process (SIGSTOP) after the handover"
                        );
                        let _ = rustix::process::kill_process(
                            rustix::process::getpid(),
                            rustix::process::Signal::STOP,
                        );
                    }
                    return Ok(());
                }
                Handover::Fenced(why) => return Err(MigrateError::Fenced(why)),
                Handover::Stay(why) => return Err(MigrateError::Handover(why)),
                Handover::Retry => std::thread::sleep(crate::epoch::CLAIM_RETRY),
            }
        }
    }

    fn revoke(&self) -> Result<(), MigrateError> {
        if self.witness.is_none() {
            return Ok(());
        }
        let Some(answer) = self.claim_back() else {
            return Err(MigrateError::Fenced(format!(
                "the VM was handed to {} but no Go was sent, and the witness did not answer to take it back: the guest stops here (it runs nowhere)",
                self.dest
            )));
        };
        match answer {
            Ok(token) => {
                info!(
                    token,
                    "the witness gives the VM back to this node (no Go was sent)"
                );
                Ok(())
            }
            Err((owner, token)) => Err(MigrateError::Fenced(format!(
                "the VM was handed to {} but no Go was sent, and the witness now gives it to {owner} (token {token})",
                self.dest
            ))),
        }
    }

    fn reclaim(&self) -> Result<bool, MigrateError> {
        if self.witness.is_none() {
            return Ok(false);
        }
        let Some(answer) = self.claim_back() else {
            return Err(MigrateError::Fenced(format!(
                "Go was sent to {} but not confirmed, and the witness did not answer to take the VM back: the guest stops here (it runs there only if that node claims it)",
                self.dest
            )));
        };
        match answer {
            Ok(token) => {
                info!(
                    token,
                    "the witness gives the VM back to this node: the destination had not claimed it"
                );
                Ok(true)
            }
            Err((owner, token)) if owner == self.dest => {
                info!(
                    token,
                    "the destination claimed the VM at the witness: it runs there"
                );
                Ok(false)
            }
            Err((owner, token)) => Err(MigrateError::Fenced(format!(
                "the VM was handed to {}, and the witness now gives it to {owner} (token {token})",
                self.dest
            ))),
        }
    }

    fn committed(&self) {
        self.log.close();
        if let Some(p) = self.packets {
            p.close();
        }
    }
}

impl EpochLoop<'_> {
    /// Carries out a migration order. True: the guest runs on the
    /// destination now and this role ends; false: it runs here, protected
    /// again if there is a backup. An error: this node was fenced, or the
    /// guest was lost after the switch.
    pub(crate) fn migrate(
        &mut self,
        order: Order,
        events: &std_mpsc::Receiver<NetEvent>,
    ) -> Result<bool, PrimaryError> {
        let Order { req, reply } = order;
        if self.machine.disk().is_some() {
            let _ = reply.send(Err(
                "the guest has a disk, and live migration does not move disks yet: the guest stays here, protected (move it by a switchover to its backup instead: castor takeover on the backup)".into(),
            ));
            return Ok(false);
        }
        let t = Instant::now();
        let cfg = match self.source_config(&req) {
            Ok(c) => c,
            Err(why) => {
                let _ = reply.send(Err(why));
                return Ok(false);
            }
        };
        let tls = match transport::NodeTls::from_dir(&self.cfg.certs, &self.cfg.node, &req.dest) {
            Ok(t) => t,
            Err(e) => {
                let _ = reply.send(Err(format!(
                    "certificates for a connection to {}: {e}",
                    req.dest
                )));
                return Ok(false);
            }
        };
        info!(to = %req.to, dest = %req.dest, "migration asked: standing the backup down first");
        match self.stand_down(events) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                let _ = reply.send(Err(format!("the guest stays here: {why}")));
                return Ok(false);
            }
            Err(e) => {
                let _ = reply.send(Err(format!("standing the backup down: {e}")));
                return Err(e);
            }
        }
        let gate = Gate {
            witness: self.cfg.witness.as_ref(),
            me: &self.cfg.node,
            dest: &req.dest,
            token: self.core.token(),
            log: &self.log,
            packets: self.packets.as_deref(),
            given: Default::default(),
            back: Default::default(),
            stop_after_handover: std::env::var_os(FAULT_STOP_AFTER_HANDOVER)
                .is_some_and(|v| std::path::Path::new(&v) == self.cfg.certs.as_path()),
        };
        let r = self.rt.block_on(migrate::source::migrate_out(
            &mut self.machine,
            req.to,
            &tls,
            &cfg,
            &gate,
        ));
        let taken_back = gate.back.load(std::sync::atomic::Ordering::Relaxed);
        if taken_back != 0 {
            // The next claim (the backup lost again) expects this token.
            self.core.took_back(taken_back);
        }
        match r {
            Ok(report) => {
                info!(
                    to = %req.to,
                    dest = %req.dest,
                    path = %report.path,
                    pause_ms = format!("{:.1}", report.pause_ms),
                    total_ms = format!("{:.0}", t.elapsed().as_secs_f64() * 1e3),
                    "MIGRATED: the guest runs on {} now; this node stops",
                    req.dest
                );
                let json = serde_json::to_string(&report).unwrap_or_default();
                let _ = reply.send(Ok(json));
                Ok(true)
            }
            Err(Failure {
                error,
                running_here: true,
            }) => {
                warn!(
                    "migration to {} failed before the switch: {error}; the guest runs on here",
                    req.to
                );
                let _ = reply.send(Err(format!(
                    "{error}; the guest runs on here{}",
                    if self.target.is_some() {
                        " and is protected again as soon as its backup resyncs"
                    } else {
                        ""
                    }
                )));
                self.restart_protection()?;
                Ok(false)
            }
            Err(Failure { error, .. }) => {
                let _ = reply.send(Err(error.to_string()));
                match error {
                    MigrateError::Fenced(why) => Err(PrimaryError::Fenced(EndReason::Refused(why))),
                    other => {
                        error!("migration to {} failed after the switch: {other}", req.to);
                        Err(PrimaryError::Migration(other.to_string()))
                    }
                }
            }
        }
    }

    /// Ends the session with a goodbye (the backup commits the last
    /// checkpoint and stands down) and lets the core settle: its output
    /// released, and with a witness its claim to carry on alone decided.
    /// `Ok(Err(why))`: it did not settle; the guest stays here (protection
    /// restarts once the claim is decided).
    pub(crate) fn stand_down(
        &mut self,
        events: &std_mpsc::Receiver<NetEvent>,
    ) -> Result<Result<(), String>, PrimaryError> {
        if self.net.is_none() {
            return Ok(Ok(()));
        }
        self.end_protection();
        let deadline = Instant::now() + STAND_DOWN_WAIT;
        while self.core.in_session() || self.core.claiming() || self.awaiting.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(NetEvent::Migrate(o)) => o.refuse("a migration is under way"),
                Ok(NetEvent::Protect(o)) => o.refuse("the backup is being stood down"),
                Ok(NetEvent::Connected) => {}
                Ok(ev) => self.on_event(ev)?,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if self.core.claiming() {
                        // What is held stays held: the witness has not said this
                        // node may carry on. The claim goes on as usual;
                        // a backup that connects meanwhile waits for it.
                        self.restart_protection()?;
                        return Ok(Err(
                            "the witness did not decide whether this node still owns the VM".into(),
                        ));
                    }
                    // The network task ended without reporting the end.
                    self.feed(node::ha::PrimaryInput::Ended(EndReason::Goodbye(
                        "stood down (a migration or a change of backup)".into(),
                    )))?;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(Ok(()))
    }

    fn source_config(&self, req: &MigrateRequest) -> Result<SourceConfig, String> {
        let mode: fgbi::Mode = req
            .mode
            .parse()
            .map_err(|e| format!("mode {:?}: {e}", req.mode))?;
        fgbi::check_block_size(req.block_size as usize).map_err(|e| e.to_string())?;
        Ok(SourceConfig {
            node: self.cfg.node.clone(),
            mode,
            block_size: req.block_size as usize,
            plan: migrate::PlanConfig {
                max_downtime: Duration::from_millis(req.max_downtime_ms.max(1)),
                postcopy: req.postcopy,
                max_rounds: req.max_rounds.max(1),
                link_rate: req.link_rate,
                ..migrate::PlanConfig::default()
            },
            link: transport::link::LinkShape {
                rate_bytes_per_s: req.link_rate,
                delay: Duration::from_micros(req.link_delay_us),
            },
            verify: req.verify,
            budget: req.budget,
        })
    }
}
