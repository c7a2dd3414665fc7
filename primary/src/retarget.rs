//! A change of backup asked on the control socket ([`Request::Protect`]):
//! a fleet's agent names the backup a primary protects its guest toward,
//! after the old one was lost or is being moved to another host.
//!
//! The current session, if any, ends as a planned stop ends it: with a
//! goodbye naming the last checkpoint queued, so that the old backup
//! commits it and stands down (it will not take over), and with the
//! witness's decision if the core had to claim the VM to carry on alone.
//! Then a new network task connects to the new backup, whose certificate
//! must carry the name given, and its session starts with a resync (by
//! reuse when that host keeps an image of the VM).
//!
//! [`Request::Protect`]: node::control::Request::Protect

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;

use node::control::ProtectRequest;
use tracing::{info, warn};

use crate::epoch::EpochLoop;
use crate::net::NetEvent;
use crate::PrimaryError;

/// The backup a primary protects toward.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    /// This node's TLS, accepting only the backup's name.
    pub tls: transport::NodeTls,
}

impl Target {
    /// `NODE@ADDR`, for the status and the logs.
    pub fn describe(&self) -> String {
        format!("{}@{}", self.tls.peer_name, self.addr)
    }
}

/// A change of backup and where its answer goes.
#[derive(Debug)]
pub(crate) struct Order {
    /// What was asked.
    pub req: ProtectRequest,
    /// The answer: what was done, or why not.
    pub reply: std_mpsc::Sender<Result<String, String>>,
}

impl Order {
    /// Answers that the order is not carried out.
    pub fn refuse(self, why: &str) {
        let _ = self.reply.send(Err(why.to_string()));
    }
}

impl EpochLoop<'_> {
    /// Carries out a change of backup between epochs.
    pub(crate) fn retarget(
        &mut self,
        order: Order,
        events: &std_mpsc::Receiver<NetEvent>,
    ) -> Result<(), PrimaryError> {
        let Order { req, reply } = order;
        if req.peer == self.cfg.node {
            let _ = reply.send(Err(format!(
                "{} is this node: a guest's backup runs on another node",
                req.peer
            )));
            return Ok(());
        }
        if let Some(t) = &self.target {
            if t.addr == req.to && t.tls.peer_name == req.peer && self.net.is_some() {
                let _ = reply.send(Ok(format!("already protected toward {}", t.describe())));
                return Ok(());
            }
        }
        let new = Target {
            addr: req.to,
            tls: transport::NodeTls {
                peer_name: req.peer.clone(),
                ..self.cfg.tls.clone()
            },
        };
        let old = self.target.as_ref().map(Target::describe);
        info!(
            from = old.as_deref().unwrap_or("none"),
            to = new.describe(),
            "a new backup is asked: standing the current one down first"
        );
        match self.stand_down(events) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                warn!(
                    "the backup stays {}: {why}",
                    old.as_deref().unwrap_or("none")
                );
                let _ = reply.send(Err(format!("the backup is not changed: {why}")));
                return Ok(());
            }
            Err(e) => {
                let _ = reply.send(Err(format!("standing the backup down: {e}")));
                return Err(e);
            }
        }
        let described = new.describe();
        self.target = Some(new);
        self.metrics.set_backup(Some(described.clone()));
        self.restart_protection()?;
        let _ = reply.send(Ok(format!(
            "protecting toward {described}; protected again once it has resynced"
        )));
        Ok(())
    }
}
