//! The one status both daemons report (`castor status`, the console
//! service's `status` word) and that demo, drill, bench and the tests read.
//!
//! It travels as one line of JSON; [`Status::to_json`] and
//! [`Status::from_json`] are the only places that know its shape.

use serde::{Deserialize, Serialize};

/// What a node is doing with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the guest it booted.
    Primary,
    /// Keeps a replica at the last committed checkpoint.
    Backup,
    /// Was a backup and took over: runs the guest from the replica.
    TakenOver,
}

impl Role {
    /// True for a node that runs the guest.
    pub fn runs_guest(self) -> bool {
        matches!(self, Role::Primary | Role::TakenOver)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::TakenOver => "primary (after failover)",
        })
    }
}

/// A node's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The role.
    pub role: Role,
    /// Console bytes visible to clients: `[.., console_released)`.
    pub console_released: u64,
    /// Console bytes the node has (released or held).
    pub console_end: u64,
    /// The console offset the guest resumed from on this node, if it took
    /// over: the first byte of its own history.
    pub resumed_at: Option<u64>,
    /// Checkpointing figures, on a node that runs the guest.
    pub primary: Option<PrimaryStatus>,
    /// Replica figures, on a backup.
    pub backup: Option<BackupStatus>,
}

/// The primary role's figures since the last `reset`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// A backup holds a committed checkpoint (it could take over).
    pub protected: bool,
    /// The backup it protects toward, `NODE@ADDR` (`None`: none, the guest
    /// runs unprotected).
    #[serde(default)]
    pub backup: Option<String>,
    /// The protocol version of the session with the backup, once agreed
    /// (`None`: no session; castor 0.1 does not report it).
    #[serde(default)]
    pub protocol: Option<u16>,
    /// Encoding mode (`remus`, `xbzrle`, `fgbi`).
    pub mode: String,
    /// Epoch length, ms: the fixed one, or the one `--epoch-ms auto` chose
    /// last (its probes aside).
    pub epoch_ms: u64,
    /// The length is chosen by the working-set model (`--epoch-ms auto`):
    /// what it aims for and what it chose.
    #[serde(default)]
    pub epoch_auto: Option<AutoEpochStatus>,
    /// Real epoch length p50 (pause start to pause start: longer than
    /// planned when checkpoints wait for acks), ms.
    #[serde(default)]
    pub epoch_len_p50_ms: f64,
    /// Checkpoint bytes a second: the epochs' bytes over their real lengths.
    #[serde(default)]
    pub bytes_per_s: f64,
    /// Epochs checkpointed (the full resync included).
    pub epochs: u64,
    /// Epochs in the figures (since the last reset; the resync left out).
    pub samples: u64,
    /// Pause p50, µs.
    pub pause_p50_us: f64,
    /// Pause p99, µs.
    pub pause_p99_us: f64,
    /// Pause max, µs.
    pub pause_max_us: f64,
    /// Harvest p50, µs.
    pub harvest_p50_us: f64,
    /// Page copy p50, µs.
    pub copy_p50_us: f64,
    /// State capture p50, µs.
    pub capture_p50_us: f64,
    /// Dirty pages per epoch, mean.
    pub dirty_pages_mean: f64,
    /// Pages per epoch copied before the pause, mean.
    pub precopied_mean: f64,
    /// Bytes sent per epoch, mean.
    pub bytes_per_epoch: f64,
    /// Raw bytes per epoch (dirty pages × 4096), mean.
    pub raw_bytes_per_epoch: f64,
    /// Of `bytes_per_epoch`, the disk's records, mean (0 without a disk).
    #[serde(default)]
    pub disk_bytes_per_epoch: f64,
    /// Disk blocks per epoch, mean.
    #[serde(default)]
    pub disk_blocks_mean: f64,
    /// Encode time p50, µs.
    pub encode_p50_us: f64,
    /// Encode time p99, µs.
    pub encode_p99_us: f64,
    /// Ack latency p50, µs.
    pub ack_p50_us: f64,
    /// Ack latency p99, µs.
    pub ack_p99_us: f64,
    /// Output-commit delay p50, µs: end of an epoch's pause → its console
    /// bytes released.
    pub release_p50_us: f64,
    /// Output-commit delay p99, µs.
    pub release_p99_us: f64,
    /// Epochs that waited for acks (in-flight limit).
    pub epochs_waited: u64,
    /// The guest's network output, if it has a network card.
    #[serde(default)]
    pub net: Option<crate::packets::HoldFigures>,
    /// The last session's first checkpoint: a full resync or a reuse of the
    /// backup's image.
    #[serde(default)]
    pub last_resync: Option<ResyncStatus>,
    /// Sessions with a backup begun since the daemon started (each one
    /// opened by a resync); not reset by `reset`. A count that grew over a
    /// measurement window means the pair lost its backup and resynced in it.
    #[serde(default)]
    pub sessions: u64,
}

/// `--epoch-ms auto`: the model's target and its choices since the last
/// `reset`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoEpochStatus {
    /// Shortest epoch allowed, ms.
    pub min_ms: u64,
    /// Longest epoch allowed, ms.
    pub max_ms: u64,
    /// The pause target, ms.
    pub pause_target_ms: f64,
    /// Checkpoint bytes a second the link may carry.
    pub link_budget: f64,
    /// Largest share of the guest's time spent paused.
    pub pause_share: f64,
    /// What decided the current length (`shortest allowed`, `link budget`,
    /// `pause share`); empty before the first choice.
    pub bound: String,
    /// That bound cannot be kept within the lengths allowed (it asks for
    /// more than the longest, or the link's budget is over at every
    /// length): the nearest allowed is chosen.
    pub capped: bool,
    /// The pause the model expects at the current length, ms.
    pub expected_pause_ms: f64,
    /// It is over the pause target (the link's budget wins).
    pub pause_over_target: bool,
    /// The length chosen for the figures' epochs (probes left out): p50,
    /// ms.
    pub chosen_p50_ms: f64,
    /// Shortest chosen, ms.
    pub chosen_min_ms: f64,
    /// Longest chosen, ms.
    pub chosen_max_ms: f64,
    /// Times the chosen length changed between consecutive epochs.
    pub changes: u64,
    /// Probes: single epochs at half the length chosen, run when the last
    /// window of epochs were all about as long, for the model to see
    /// another length (left out of the figures above).
    #[serde(default)]
    pub probes: u64,
}

/// How a session's first checkpoint went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// The backup offered an image and only the pages that differ were sent.
    pub reused: bool,
    /// Why there was a full resync (no image, a bad offer ...); empty if reused.
    pub reason: String,
    /// Pages of the guest.
    pub pages: u64,
    /// Pages sent.
    pub pages_sent: u64,
    /// Of those, pages whose generation differed (or was unknown).
    pub by_generation: u64,
    /// Of those, pages whose generation was equal but digest not.
    pub stale: u64,
    /// Bytes of the first checkpoint.
    pub bytes: u64,
    /// The guest's pause for it, ms.
    pub pause_ms: f64,
    /// Hello sent → the backup's offer complete, ms.
    pub offer_ms: f64,
    /// Hello sent → the first checkpoint acknowledged (protected), ms.
    pub protected_ms: Option<f64>,
    /// Blocks of the guest's disk (0: none).
    #[serde(default)]
    pub disk_blocks: u64,
    /// Disk blocks sent: those that differed from the backup's, and those
    /// written since the session began.
    #[serde(default)]
    pub disk_blocks_sent: u64,
    /// Of `bytes`, the disk's records.
    #[serde(default)]
    pub disk_bytes: u64,
}

/// The backup role's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    /// A primary is connected.
    pub connected: bool,
    /// The protocol version of the session with the primary (`None`: no
    /// session; castor 0.1 does not report it).
    #[serde(default)]
    pub protocol: Option<u16>,
    /// The session sends memory digests and the backup checks them.
    pub verifying: bool,
    /// The replica's checkpoint.
    pub committed_epoch: u64,
    /// The session it belongs to.
    pub session: u64,
    /// Checkpoints applied (all sessions).
    pub checkpoints_applied: u64,
    /// Replica digests that did not match the primary's.
    pub verify_mismatches: u64,
    /// The guest's disk on this node (path and size), if it has one.
    #[serde(default)]
    pub disk: Option<String>,
    /// Why the last checkpoint refused was refused (a disk that cannot be
    /// written, a mismatch ...), if one was.
    #[serde(default)]
    pub last_refusal: Option<String>,
}

/// A status line that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("not a castor status line ({err}): {line}")]
pub struct StatusError {
    line: String,
    err: String,
}

impl Status {
    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a status always serialises")
    }

    /// Parses [`Status::to_json`]'s output (or names what is wrong: an
    /// `error: …` answer is returned in the error).
    pub fn from_json(line: &str) -> Result<Status, StatusError> {
        serde_json::from_str(line.trim()).map_err(|e| StatusError {
            line: line.chars().take(200).collect(),
            err: e.to_string(),
        })
    }

    /// The primary figures, or the defaults when this node is not primary.
    pub fn figures(&self) -> PrimaryStatus {
        self.primary.clone().unwrap_or_default()
    }

    /// The node runs the guest and a backup holds a committed checkpoint.
    pub fn protected(&self) -> bool {
        self.primary.as_ref().is_some_and(|p| p.protected)
    }

    /// A few lines for a person (`castor status`): role, protection,
    /// console, pause, bytes and the last failover.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let ms = |us: f64| format!("{:.2} ms", us / 1e3);
        let _ = write!(o, "role       {}", self.role);
        if let Some(p) = &self.primary {
            let _ = write!(
                o,
                ", {}",
                if p.protected {
                    "protected"
                } else {
                    "UNPROTECTED (no backup holds a committed checkpoint)"
                }
            );
        }
        let _ = writeln!(o);
        let protocol = match (&self.primary, &self.backup) {
            (Some(p), _) => p.protocol.map(|v| (v, "backup")),
            (_, Some(b)) => b.protocol.map(|v| (v, "primary")),
            _ => None,
        };
        if let Some((v, peer)) = protocol {
            let _ = writeln!(o, "protocol   version {v} with the {peer}");
        }
        let _ = writeln!(
            o,
            "console    {} bytes released, {} held",
            self.console_released,
            self.console_end.saturating_sub(self.console_released)
        );
        if let Some(p) = &self.primary {
            let _ = writeln!(
                o,
                "epochs     {} ({}, {}{} ms); pause p50 {}, p99 {}, max {}",
                p.epochs,
                p.mode,
                if p.epoch_auto.is_some() { "auto: " } else { "" },
                p.epoch_ms,
                ms(p.pause_p50_us),
                ms(p.pause_p99_us),
                ms(p.pause_max_us)
            );
            if let Some(a) = &p.epoch_auto {
                let _ = writeln!(
                    o,
                    "auto       {} ms now ({}{}), expected pause {:.2} ms{}; chosen p50 {:.0} ms, {:.0}..{:.0} ms, {} changes, {} probes; allowed {}..{} ms",
                    p.epoch_ms,
                    if a.bound.is_empty() { "no figures yet" } else { &a.bound },
                    match (a.capped, a.bound.as_str(), p.epoch_ms) {
                        (false, ..) => "",
                        (true, "pause share", e) if e < a.max_ms => ", not kept by any length",
                        (true, "link budget", e) if e <= a.min_ms => {
                            ", not kept even at the shortest"
                        }
                        (true, ..) => ", capped at the longest",
                    },
                    a.expected_pause_ms,
                    if a.pause_over_target {
                        format!(", OVER the {:.2} ms target", a.pause_target_ms)
                    } else {
                        String::new()
                    },
                    a.chosen_p50_ms,
                    a.chosen_min_ms,
                    a.chosen_max_ms,
                    a.changes,
                    a.probes,
                    a.min_ms,
                    a.max_ms
                );
            }
            let _ = writeln!(
                o,
                "bytes      {:.1} KiB per epoch (raw {:.1} KiB, {:.0} dirty pages), {:.2} MB/s; ack p50 {}, p99 {}",
                p.bytes_per_epoch / 1024.0,
                p.raw_bytes_per_epoch / 1024.0,
                p.dirty_pages_mean,
                p.bytes_per_s / 1e6,
                ms(p.ack_p50_us),
                ms(p.ack_p99_us)
            );
            if p.disk_blocks_mean > 0.0 || p.disk_bytes_per_epoch > 0.0 {
                let _ = writeln!(
                    o,
                    "disk       {:.1} blocks, {:.1} KiB per epoch (of the bytes above)",
                    p.disk_blocks_mean,
                    p.disk_bytes_per_epoch / 1024.0
                );
            }
        }
        if let Some(r) = self.primary.as_ref().and_then(|p| p.last_resync.as_ref()) {
            let _ = writeln!(
                o,
                "resync     {}: {} of {} pages sent ({} by generation, {} stale), {:.1} MiB, pause {:.1} ms, protected after {}",
                if r.reused {
                    "reused the backup's image".to_string()
                } else {
                    format!("full ({})", r.reason)
                },
                r.pages_sent,
                r.pages,
                r.by_generation,
                r.stale,
                r.bytes as f64 / (1 << 20) as f64,
                r.pause_ms,
                r.protected_ms
                    .map_or("-".to_string(), |m| format!("{m:.0} ms"))
            );
        }
        if let Some(n) = self.primary.as_ref().and_then(|p| p.net) {
            let _ = writeln!(
                o,
                "network    {} frames sent by the guest, {} released, {} held ({} bytes), {} dropped (hold full), {} discarded (fenced)",
                n.frames, n.released, n.held, n.held_bytes, n.dropped, n.discarded
            );
        }
        if let Some(b) = &self.backup {
            let _ = writeln!(
                o,
                "replica    epoch {} of session {}; primary {}; {} checkpoints applied{}",
                b.committed_epoch,
                b.session,
                if b.connected {
                    "connected"
                } else {
                    "NOT connected"
                },
                b.checkpoints_applied,
                if b.verifying {
                    format!("; verified, {} mismatches", b.verify_mismatches)
                } else {
                    String::new()
                }
            );
            if let Some(d) = &b.disk {
                let _ = writeln!(o, "disk       {d}");
            }
            if let Some(r) = &b.last_refusal {
                let _ = writeln!(o, "refused    {r}");
            }
        }
        let _ = writeln!(
            o,
            "failover   {}",
            match self.resumed_at {
                Some(at) =>
                    format!("this node took over, resuming the guest at console offset {at}"),
                None => "none on this node".into(),
            }
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_bad_lines() {
        let s = Status {
            role: Role::TakenOver,
            console_released: 10,
            console_end: 12,
            resumed_at: Some(7),
            primary: Some(PrimaryStatus {
                protected: true,
                mode: "fgbi".into(),
                epochs: 3,
                pause_p99_us: 700.0,
                ..Default::default()
            }),
            backup: None,
        };
        let line = s.to_json();
        assert!(!line.contains('\n'));
        assert_eq!(Status::from_json(&line).unwrap(), s);
        assert!(Status::from_json(&line).unwrap().protected());
        let e = Status::from_json("error: nothing committed yet").unwrap_err();
        assert!(
            e.to_string().contains("error: nothing committed yet"),
            "{e}"
        );
        assert_eq!(Role::TakenOver.to_string(), "primary (after failover)");
        let text = s.summary();
        assert!(
            text.starts_with("role       primary (after failover), protected\n"),
            "{text}"
        );
        assert!(text.contains("pause p50 0.00 ms, p99 0.70 ms"), "{text}");
        assert!(
            text.contains("resuming the guest at console offset 7"),
            "{text}"
        );
        assert!(!text.contains("auto"), "{text}");
        // An auto epoch says what it chose and why.
        let mut s = s;
        let p = s.primary.as_mut().unwrap();
        p.epoch_ms = 140;
        p.epoch_auto = Some(AutoEpochStatus {
            min_ms: 10,
            max_ms: 200,
            bound: "link budget".into(),
            chosen_p50_ms: 139.0,
            ..Default::default()
        });
        assert_eq!(Status::from_json(&s.to_json()).unwrap(), s);
        let text = s.summary();
        assert!(text.contains("(fgbi, auto: 140 ms)"), "{text}");
        assert!(
            text.contains("auto       140 ms now (link budget)")
                && text.contains("allowed 10..200 ms"),
            "{text}"
        );
        // A status from before these fields still parses.
        let old = r#"{"role":"primary","console_released":1,"console_end":1,"resumed_at":null,"primary":{"protected":true,"mode":"fgbi","epoch_ms":25,"epochs":3,"samples":2,"pause_p50_us":1.0,"pause_p99_us":1.0,"pause_max_us":1.0,"harvest_p50_us":1.0,"copy_p50_us":1.0,"capture_p50_us":1.0,"dirty_pages_mean":1.0,"precopied_mean":1.0,"bytes_per_epoch":1.0,"raw_bytes_per_epoch":1.0,"encode_p50_us":1.0,"encode_p99_us":1.0,"ack_p50_us":1.0,"ack_p99_us":1.0,"release_p50_us":1.0,"release_p99_us":1.0,"epochs_waited":0},"backup":null}"#;
        let p = Status::from_json(old).unwrap().figures();
        assert!(p.epoch_auto.is_none() && p.bytes_per_s == 0.0);
    }
}
