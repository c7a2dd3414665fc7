//! Step 2 of an epoch, after the resume: the staged copies, the machine
//! state and the console bytes become one checkpoint's frames.

use std::time::{Duration, Instant};

use fgbi::Encoder;
use node::console::ConsoleLog;
use protocol::message::{CAP_REUSE, CAP_VERIFY};
use protocol::version::Range;
use protocol::{payload, Hello, Sender, VERSION};

use crate::copy::Staging;
use crate::{Config, PrimaryError};

/// The data path of one session with a backup: the protocol's sender and
/// the encoder, whose knowledge of the replica starts empty with each
/// session (the first checkpoint is the full resync).
pub(crate) struct Session {
    sender: Sender,
    encoder: Encoder,
    next_epoch: u64,
    /// Console offset where the next checkpoint's output starts in the log.
    out_start: u64,
    /// Released console history the first checkpoint carries before the
    /// log's bytes from `out_start` (see [`BACKUP_HISTORY`]).
    history: Vec<u8>,
    verify: bool,
    /// The hello's session id.
    id: u64,
}

/// One encoded checkpoint.
pub(crate) struct Built {
    pub epoch: u64,
    pub frames: Vec<u8>,
    pub encode: Duration,
}

/// The most released console history a new backup receives with its first
/// checkpoint. A backup's console starts where its session does; without
/// history, a console client that had not yet read up to the release point
/// when the backup joined found its offset "older than the oldest kept"
/// after a failover to it, and lost the output in between (found by
/// `castor drill`: after a takeover by a backup that had joined moments
/// before, the drill's client was refused for the rest of a long run).
/// 1 MiB: minutes of a busy console, ~8 ms on a 1 Gbit/s link.
pub const BACKUP_HISTORY: usize = 1 << 20;

impl Session {
    /// A new session for a guest of `pages` pages, `vcpus` vCPUs and a disk
    /// of `disk_bytes` (0: none) whose output from `out_start` on is not
    /// released yet, and whose released `history` ends at `out_start`
    /// (the first checkpoint carries it), whose hello offers `versions`;
    /// returns the hello.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: &Config,
        pages: u64,
        vcpus: u32,
        disk_bytes: u64,
        out_start: u64,
        history: Vec<u8>,
        token: u64,
        beat: (u16, [u8; 32]),
        versions: Range,
    ) -> Result<(Session, Vec<u8>), PrimaryError> {
        let id: u64 = rand::random();
        let hello = Hello {
            version: VERSION,
            lowest_version: protocol::version::V5,
            session: id,
            node: cfg.node.clone(),
            capabilities: CAP_REUSE | if cfg.verify { CAP_VERIFY } else { 0 },
            mode: cfg.mode,
            block_size: cfg.block_size as u32,
            memory_bytes: pages * 4096,
            vcpus,
            output_offset: out_start - history.len() as u64,
            token,
            beat_port: beat.0,
            beat_key: beat.1,
            disk_bytes,
        }
        .offering(versions);
        let encoder = Encoder::new(
            fgbi::Config {
                mode: cfg.mode,
                block_size: cfg.block_size,
                budget_bytes: cfg.budget_bytes.unwrap_or(pages * 4096 / 2),
                key: rand::random(),
            },
            pages,
        )?;
        let (sender, hello) = Sender::new(hello);
        let session = Session {
            sender,
            encoder,
            next_epoch: 1,
            out_start,
            history,
            verify: cfg.verify,
            id,
        };
        Ok((session, hello))
    }

    /// The session's id (the hello's).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The protocol's sender (the hello's versions and the backup's answer).
    pub fn sender(&mut self) -> &mut Sender {
        &mut self.sender
    }

    /// The backup reuses an image: nothing is known of the pages the first
    /// checkpoint does not carry (see `fgbi::Encoder::replica_unknown`).
    pub fn replica_unknown(&mut self) {
        self.encoder.replica_unknown();
    }

    /// The number the next checkpoint gets.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The last epoch sent in full in this session (0: none yet).
    pub fn last_epoch(&self) -> u64 {
        self.sender.last_committed()
    }

    /// Encodes the staged pages, the machine state (`state`, encoded), the
    /// console bytes up to `out_end` and the disk's records with their
    /// commit part as the next checkpoint; `held`: it says that its output
    /// was held from its pause on (protocol 7 on: the backup may resume
    /// from it).
    pub fn checkpoint(
        &mut self,
        staging: &Staging,
        state: &[u8],
        log: &ConsoleLog,
        out_end: u64,
        disk: Option<(&[u8], protocol::disk::DiskCommit)>,
        held: bool,
    ) -> Result<Built, PrimaryError> {
        let te = Instant::now();
        let frames = staging.frames();
        let mut records = Vec::with_capacity(frames.len() * 64);
        let mut touched = Vec::new();
        for (i, &f) in frames.iter().enumerate() {
            let before = records.len();
            self.encoder.encode_page(f, staging.page(i), &mut records);
            if records.len() > before {
                touched.push(i);
            }
        }
        let memory_digest = self
            .verify
            .then(|| payload::memory_digest(touched.iter().map(|&i| &staging.page(i)[..])));
        let encode = te.elapsed();
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let bytes = log.slice(self.out_start, out_end);
        if bytes.len() as u64 != out_end - self.out_start {
            // Output released while not held (a v7 resync) and forgotten by
            // the log before it was checkpointed: the backup's console would
            // have a gap. The log pins what is not checkpointed yet, so this
            // is a bug, not input.
            return Err(PrimaryError::Console(format!(
                "the console log no longer holds bytes {}..{out_end} for checkpoint {epoch}",
                self.out_start
            )));
        }
        let output = if self.history.is_empty() {
            bytes
        } else {
            // The session's first checkpoint: the history, then the log.
            let mut h = std::mem::take(&mut self.history);
            h.extend_from_slice(&bytes);
            h
        };
        self.out_start = out_end;
        log.keep_from(Some(out_end));
        let state = payload::pack_state(state);
        let s = &mut self.sender;
        let mut f = Vec::with_capacity(records.len() + state.len() + output.len() + 256);
        s.begin(
            epoch,
            frames.len() as u32,
            frames.len() as u64 * 4096,
            &mut f,
        )?;
        s.records(&records, &mut f)?;
        s.state(&state, &mut f)?;
        s.output(&output, &mut f)?;
        if let Some((records, _)) = disk {
            s.disk(records, &mut f)?;
        }
        if held {
            s.held(&mut f)?;
        }
        s.commit(memory_digest, disk.map(|d| d.1), &mut f)?;
        Ok(Built {
            epoch,
            frames: f,
            encode,
        })
    }
}
