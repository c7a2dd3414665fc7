//! The session state machines, sans I/O: the primary's [`Sender`] turns a
//! checkpoint into frames; the backup's [`Receiver`] checks that the frames
//! it gets form valid checkpoints and hands each one over only when its
//! commit arrives and its digest matches. Nothing here touches a socket.
//!
//! Order on the data stream: `Hello`, then for each epoch `EpochStart`,
//! any number of `Records`, at most one `State` (exactly one before the
//! commit), any number of `Output` and (with a disk) `Disk`, from version 7
//! at most one `Held` (the checkpoint may be resumed from), then `Commit`. Epochs are consecutive
//! from 1 (the full resync): every mode sends only the pages dirtied since
//! the previous epoch, and xbzrle and fgbi encode against the replica as
//! the previous epoch left it, so a missing epoch would leave the replica
//! without writes. Console output offsets are contiguous across epochs.
//! Acks travel back on the control stream, in epoch order. A `Goodbye`
//! (on the control stream) names the last epoch sent; the receiver ends
//! the session on it only once that epoch is committed.
//!
//! The commit digest is blake3 over, for each content message in order, its
//! type name, epoch, offset (output only), length and bytes.

use crate::disk::DiskCommit;
use crate::message::{Hello, Message, CAP_REUSE, CAP_VERIFY, MAX_OUTPUT_CHUNK, MAX_RECORDS_CHUNK};
use crate::version::{self, Range};
use crate::ProtocolError;

fn hash_content(h: &mut blake3::Hasher, kind: &str, epoch: u64, offset: u64, data: &[u8]) {
    h.update(kind.as_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(&offset.to_le_bytes());
    h.update(&(data.len() as u64).to_le_bytes());
    h.update(data);
}

/// The primary's side of a session.
#[derive(Debug)]
pub struct Sender {
    hello: Hello,
    epoch: Option<u64>,
    last_committed: u64,
    last_acked: u64,
    hasher: blake3::Hasher,
    state_sent: bool,
    output_next: u64,
    /// The session's protocol version, once known: at once for a v5 hello,
    /// from the backup's answer for a later one.
    version: Option<u16>,
    /// The current epoch carries `Held`.
    held: bool,
    /// A committed checkpoint carried `Held`: every later one must.
    held_since: Option<u64>,
}

impl Sender {
    /// Starts a session; returns the sender and the `Hello` frame.
    pub fn new(hello: Hello) -> (Self, Vec<u8>) {
        let frame = Message::Hello(hello.clone()).to_frame();
        let output_next = hello.output_offset;
        let version = (hello.version < version::NEGOTIATED).then_some(hello.version);
        (
            Sender {
                version,
                hello,
                epoch: None,
                last_committed: 0,
                last_acked: 0,
                hasher: blake3::Hasher::new(),
                state_sent: false,
                output_next,
                held: false,
                held_since: None,
            },
            frame,
        )
    }

    /// The session's hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The versions the hello offers.
    pub fn offered(&self) -> Range {
        Range::of_hello(&self.hello)
    }

    /// The session's protocol version: known at once for a v5 hello, from
    /// the backup's answer ([`Sender::on_versions`]) for a later one.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// The backup answered the hello ([`Message::Versions`]).
    pub fn answered(&self) -> bool {
        self.hello.version >= version::NEGOTIATED && self.version.is_some()
    }

    /// Takes the backup's answer to the hello: the version it chose must be
    /// one the hello offered and one the backup says it speaks. Returns the
    /// session's version.
    pub fn on_versions(
        &mut self,
        chosen: u16,
        lowest: u16,
        highest: u16,
    ) -> Result<u16, ProtocolError> {
        if self.version.is_some() {
            return Err(ProtocolError::Unexpected {
                message: "Versions",
                state: if self.answered() {
                    "after the backup's answer"
                } else {
                    "in a v5 session"
                },
            });
        }
        let offered = self.offered();
        let theirs = Range::new(lowest, highest);
        if !offered.contains(chosen) || !theirs.is_some_and(|r| r.contains(chosen)) {
            return Err(ProtocolError::BadVersionAnswer { chosen, offered });
        }
        self.version = Some(chosen);
        Ok(chosen)
    }

    /// Begins epoch `epoch`: the one after the last committed (1 first).
    pub fn begin(
        &mut self,
        epoch: u64,
        dirty_pages: u32,
        raw_bytes: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        if self.epoch.is_some() {
            return Err(ProtocolError::Order(
                "an epoch began before the previous one was committed",
            ));
        }
        if epoch != self.last_committed + 1 {
            return Err(ProtocolError::EpochNotNext {
                got: epoch,
                last: self.last_committed,
            });
        }
        self.epoch = Some(epoch);
        self.hasher = blake3::Hasher::new();
        self.state_sent = false;
        self.held = false;
        Message::EpochStart {
            epoch,
            dirty_pages,
            raw_bytes,
        }
        .encode(out);
        Ok(())
    }

    fn current(&self) -> Result<u64, ProtocolError> {
        self.epoch
            .ok_or(ProtocolError::Order("content sent outside an epoch"))
    }

    /// The epoch's fgbi records, split into chunks.
    pub fn records(&mut self, records: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let epoch = self.current()?;
        for chunk in records.chunks(MAX_RECORDS_CHUNK) {
            hash_content(&mut self.hasher, "Records", epoch, 0, chunk);
            Message::Records {
                epoch,
                data: chunk.to_vec(),
            }
            .encode(out);
        }
        Ok(())
    }

    /// The machine state (once per epoch).
    pub fn state(&mut self, state: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let epoch = self.current()?;
        if self.state_sent {
            return Err(ProtocolError::Order("two machine states in one epoch"));
        }
        self.state_sent = true;
        hash_content(&mut self.hasher, "State", epoch, 0, state);
        Message::State {
            epoch,
            data: state.to_vec(),
        }
        .encode(out);
        Ok(())
    }

    /// Console output produced in the epoch (continues the stream).
    pub fn output(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let epoch = self.current()?;
        for chunk in bytes.chunks(MAX_OUTPUT_CHUNK) {
            hash_content(&mut self.hasher, "Output", epoch, self.output_next, chunk);
            Message::Output {
                epoch,
                offset: self.output_next,
                data: chunk.to_vec(),
            }
            .encode(out);
            self.output_next += chunk.len() as u64;
        }
        Ok(())
    }

    /// The epoch's disk records ([`crate::disk`]), split into chunks at
    /// record boundaries.
    pub fn disk(&mut self, records: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let epoch = self.current()?;
        if self.hello.disk_bytes == 0 {
            return Err(ProtocolError::Disk(
                "disk records in a session without a disk",
            ));
        }
        let mut rest = records;
        while !rest.is_empty() {
            let cut = crate::disk::chunk_end(rest, 1 << 20);
            let (chunk, tail) = rest.split_at(cut);
            hash_content(&mut self.hasher, "Disk", epoch, 0, chunk);
            Message::Disk {
                epoch,
                data: chunk.to_vec(),
            }
            .encode(out);
            rest = tail;
        }
        Ok(())
    }

    /// Commits the epoch.
    pub fn commit(
        &mut self,
        memory_digest: Option<[u8; 32]>,
        disk: Option<DiskCommit>,
        out: &mut Vec<u8>,
    ) -> Result<u64, ProtocolError> {
        let epoch = self.current()?;
        if !self.state_sent {
            return Err(ProtocolError::Order("commit without a machine state"));
        }
        if disk.is_some() != (self.hello.disk_bytes > 0) {
            return Err(ProtocolError::Disk(
                "a commit's disk part must be present exactly when the session has a disk",
            ));
        }
        if self.held_since.is_some() && !self.held {
            return Err(ProtocolError::Order(
                "a checkpoint without Held after one with it (output stays held to the session's end)",
            ));
        }
        if self.held {
            self.held_since.get_or_insert(epoch);
        }
        let digest = *self.hasher.finalize().as_bytes();
        Message::Commit {
            epoch,
            digest,
            memory_digest,
            disk,
        }
        .encode(out);
        self.epoch = None;
        self.last_committed = epoch;
        Ok(epoch)
    }

    /// The session's checkpoints say whether they may be resumed from
    /// (version 7 on, [`Message::Held`]); below, every one may.
    pub fn marks_held(&self) -> bool {
        self.version.is_some_and(|v| v >= version::HELD)
    }

    /// The current epoch's output was held from its pause on: the backup
    /// may resume from it ([`Message::Held`]; version 7 on). Once one
    /// checkpoint of the session carries it, every later one must.
    pub fn held(&mut self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let epoch = self.current()?;
        if !self.marks_held() {
            return Err(ProtocolError::Unexpected {
                message: "Held",
                state: "in a session below version 7",
            });
        }
        if self.held {
            return Err(ProtocolError::Order("two Held in one epoch"));
        }
        hash_content(&mut self.hasher, "Held", epoch, 0, &[]);
        Message::Held { epoch }.encode(out);
        self.held = true;
        Ok(())
    }

    /// The first checkpoint of the session that carried `Held`.
    pub fn held_since(&self) -> Option<u64> {
        self.held_since
    }

    /// Takes an ack from the backup; returns the epoch it acknowledges.
    pub fn on_ack(&mut self, epoch: u64) -> Result<u64, ProtocolError> {
        if epoch <= self.last_acked || epoch > self.last_committed {
            return Err(ProtocolError::BadAck {
                epoch,
                last_acked: self.last_acked,
                last_committed: self.last_committed,
            });
        }
        self.last_acked = epoch;
        Ok(epoch)
    }

    /// Last epoch the backup acknowledged.
    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }

    /// Last epoch committed (sent in full).
    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }
}

/// A complete checkpoint, handed over at its commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Epoch.
    pub epoch: u64,
    /// The epoch's fgbi records (for `fgbi::apply`).
    pub records: Vec<u8>,
    /// Encoded machine state.
    pub state: Vec<u8>,
    /// Console stream offset of `output[0]`.
    pub output_offset: u64,
    /// Console output produced in the epoch.
    pub output: Vec<u8>,
    /// Digest of the dirty pages after the checkpoint, if verifying.
    pub memory_digest: Option<[u8; 32]>,
    /// The epoch's disk records ([`crate::disk::parse`] them).
    pub disk: Vec<u8>,
    /// With a disk: the disk's digest sum at the pause, and whether the
    /// guest flushed.
    pub disk_commit: Option<DiskCommit>,
    /// The backup may resume from this checkpoint: the primary held its
    /// output from the checkpoint's pause on (version 7: it carried
    /// [`Message::Held`]; below 7: always).
    pub resumable: bool,
}

/// What a received message means to the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session began.
    Hello(Hello),
    /// Content was staged; nothing to do yet.
    Staged,
    /// A checkpoint is complete and verified: apply it, then ack.
    Checkpoint(Checkpoint),
    /// A heartbeat to echo.
    Heartbeat {
        /// Its sequence number.
        seq: u64,
        /// Its timestamp.
        sent_us: u64,
    },
    /// A heartbeat echo.
    HeartbeatEcho {
        /// Its sequence number.
        seq: u64,
        /// The original timestamp.
        sent_us: u64,
    },
    /// The primary stops on purpose after epoch `last_epoch`, which is not
    /// committed yet: stand down (no takeover), keep committing, and end
    /// the session once [`Receiver::goodbye_due`] says so (or the data
    /// stream ends).
    Leaving {
        /// The last epoch the primary sent.
        last_epoch: u64,
    },
    /// The primary stops on purpose and everything it sent is committed:
    /// end the session (no takeover).
    Goodbye(String),
}

/// What a backup accepts from a primary: checked against its hello, and
/// the bound on one epoch's staging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes one epoch may stage (records, state and output together);
    /// lowered further to [`staging_bound`] of the hello's machine.
    pub max_epoch_bytes: usize,
    /// Largest guest RAM accepted.
    pub max_memory_bytes: u64,
    /// Most vCPUs accepted.
    pub max_vcpus: u32,
    /// The name the peer's certificate was verified for (the TLS layer pins
    /// it): the hello must name the same node. `None`: not checked (tests).
    pub peer_name: Option<String>,
    /// The backup's disk size in bytes (0: none): the hello's must equal it.
    pub disk_bytes: u64,
}

impl Limits {
    /// No limit but the staging bound; any node name.
    pub fn staging_only(max_epoch_bytes: usize) -> Limits {
        Limits {
            max_epoch_bytes,
            max_memory_bytes: u64::MAX,
            max_vcpus: u32::MAX,
            peer_name: None,
            disk_bytes: 0,
        }
    }
}

/// Most bytes of console output one epoch may carry in the staging bound
/// (a guest printing flat out through the MMIO console writes well under
/// this in an epoch).
pub const MAX_EPOCH_OUTPUT: usize = 64 << 20;

/// Most bytes of fgbi records per page: a raw page (4096 bytes) plus its
/// varint page number and kind. No record is larger (the encoder always
/// has the raw page as a candidate), and each page has one record an epoch.
pub const MAX_RECORD_PER_PAGE: usize = 4096 + 16;

/// The most one epoch of a machine with `memory_bytes` of RAM and a disk
/// of `disk_bytes` can stage: every page as a raw record, the largest
/// machine state, [`MAX_EPOCH_OUTPUT`] of console output and every disk
/// block raw. A backup stages no more than this, whatever its
/// `--max-epoch-bytes`.
pub fn staging_bound(memory_bytes: u64, disk_bytes: u64) -> usize {
    let pages = usize::try_from(memory_bytes.div_ceil(4096)).unwrap_or(usize::MAX);
    pages
        .saturating_mul(MAX_RECORD_PER_PAGE)
        .saturating_add(crate::message::MAX_STATE)
        .saturating_add(MAX_EPOCH_OUTPUT)
        .saturating_add(crate::disk::staging_bound(disk_bytes))
}

/// The backup's side of a session.
#[derive(Debug)]
pub struct Receiver {
    limits: Limits,
    max_epoch_bytes: usize,
    /// The primary's goodbye: (reason, last epoch sent).
    goodbye: Option<(String, u64)>,
    hello: Option<Hello>,
    last_committed: u64,
    staging: Option<Staging>,
    output_next: u64,
    /// The versions this backup speaks.
    versions: Range,
    /// The session's version, once the hello is accepted.
    version: Option<u16>,
    /// A committed checkpoint carried `Held`: every later one must.
    held_since: Option<u64>,
}

#[derive(Debug)]
struct Staging {
    epoch: u64,
    /// It carried `Held`.
    held: bool,
    hasher: blake3::Hasher,
    records: Vec<u8>,
    state: Option<Vec<u8>>,
    output_offset: u64,
    output: Vec<u8>,
    disk: Vec<u8>,
}

impl Staging {
    fn bytes(&self) -> usize {
        self.records.len()
            + self.state.as_ref().map_or(0, Vec::len)
            + self.output.len()
            + self.disk.len()
    }
}

impl Receiver {
    /// A receiver staging at most `max_epoch_bytes` of one epoch's content
    /// (records, state and output together), with no other limit
    /// ([`Limits::staging_only`]).
    pub fn new(max_epoch_bytes: usize) -> Self {
        Self::with_limits(Limits::staging_only(max_epoch_bytes))
    }

    /// A receiver that refuses a hello beyond `limits`, and stages at most
    /// `limits.max_epoch_bytes` of one epoch, or less for a small machine
    /// ([`staging_bound`]).
    pub fn with_limits(limits: Limits) -> Self {
        Receiver {
            max_epoch_bytes: limits.max_epoch_bytes,
            limits,
            goodbye: None,
            hello: None,
            last_committed: 0,
            staging: None,
            output_next: 0,
            versions: version::SUPPORTED,
            version: None,
            held_since: None,
        }
    }

    /// The receiver speaks `versions` instead of [`version::SUPPORTED`]
    /// (tests simulate an older or a newer backup with it).
    pub fn speaking(mut self, versions: Range) -> Self {
        self.versions = versions;
        self
    }

    /// The session's protocol version, once the hello is accepted.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// The answer to the accepted hello, to send on the control stream
    /// before anything else: [`Message::Versions`] for a hello of version 6
    /// or more; `None` for a v5 hello (its primary may be a castor 0.1,
    /// which knows no answer) or before the hello.
    pub fn answer(&self) -> Option<Message> {
        let h = self.hello.as_ref()?;
        let version = self.version?;
        (h.version >= version::NEGOTIATED).then_some(Message::Versions {
            version,
            lowest: self.versions.lowest,
            highest: self.versions.highest,
        })
    }

    /// The session's hello, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Last epoch handed over.
    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }

    /// The staging bound in force: the limit's, or for the hello's machine
    /// [`staging_bound`] when that is smaller.
    pub fn max_epoch_bytes(&self) -> usize {
        self.max_epoch_bytes
    }

    /// The primary said goodbye (its reason), whether or not its last epoch
    /// is committed yet.
    pub fn goodbye(&self) -> Option<&str> {
        self.goodbye.as_ref().map(|(r, _)| r.as_str())
    }

    /// The primary said goodbye and every epoch it sent is committed: the
    /// session may end now (its reason).
    pub fn goodbye_due(&self) -> Option<&str> {
        match &self.goodbye {
            Some((r, last)) if self.last_committed >= *last => Some(r),
            _ => None,
        }
    }

    /// Checks the hello against the limits; returns the session's version.
    fn check_hello(&self, h: &Hello) -> Result<u16, ProtocolError> {
        let v = version::negotiate(Range::of_hello(h), self.versions)?;
        if h.capabilities & !(CAP_VERIFY | CAP_REUSE) != 0 {
            return Err(ProtocolError::UnknownCapabilities(
                h.capabilities & !(CAP_VERIFY | CAP_REUSE),
            ));
        }
        if let Some(name) = &self.limits.peer_name {
            if h.node != *name {
                return Err(ProtocolError::WrongNode {
                    hello: h.node.clone(),
                    certificate: name.clone(),
                });
            }
        }
        if h.memory_bytes == 0 || !h.memory_bytes.is_multiple_of(4096) {
            return Err(ProtocolError::BadMemorySize(h.memory_bytes));
        }
        if h.memory_bytes > self.limits.max_memory_bytes {
            return Err(ProtocolError::MemoryOverLimit {
                memory_bytes: h.memory_bytes,
                limit: self.limits.max_memory_bytes,
            });
        }
        if h.vcpus > self.limits.max_vcpus {
            return Err(ProtocolError::VcpusOverLimit {
                vcpus: h.vcpus,
                limit: self.limits.max_vcpus,
            });
        }
        if h.disk_bytes != self.limits.disk_bytes {
            return Err(ProtocolError::DiskMismatch {
                primary: h.disk_bytes,
                backup: self.limits.disk_bytes,
            });
        }
        Ok(v)
    }

    /// Whether an epoch is partly received (it is discarded if the session ends).
    pub fn in_epoch(&self) -> Option<u64> {
        self.staging.as_ref().map(|s| s.epoch)
    }

    /// The ack frame for a checkpoint the backup has committed.
    pub fn ack(&self, epoch: u64) -> Vec<u8> {
        Message::Ack { epoch }.to_frame()
    }

    fn staged(&mut self, epoch: u64, what: &'static str) -> Result<&mut Staging, ProtocolError> {
        match self.staging.as_mut() {
            Some(s) if s.epoch == epoch => Ok(s),
            Some(s) => Err(ProtocolError::WrongEpoch {
                message: what,
                got: epoch,
                current: s.epoch,
            }),
            None => Err(ProtocolError::Unexpected {
                message: what,
                state: "between epochs",
            }),
        }
    }

    fn check_size(&self, extra: usize) -> Result<(), ProtocolError> {
        let have = self.staging.as_ref().map_or(0, Staging::bytes);
        if have + extra > self.max_epoch_bytes {
            return Err(ProtocolError::EpochTooLarge {
                limit: self.max_epoch_bytes,
            });
        }
        Ok(())
    }

    /// Takes one message from the primary.
    pub fn on_message(&mut self, m: Message) -> Result<Event, ProtocolError> {
        if self.hello.is_none() {
            return match m {
                Message::Hello(h) => {
                    self.version = Some(self.check_hello(&h)?);
                    self.max_epoch_bytes = self
                        .limits
                        .max_epoch_bytes
                        .min(staging_bound(h.memory_bytes, h.disk_bytes));
                    self.output_next = h.output_offset;
                    self.hello = Some(h.clone());
                    Ok(Event::Hello(h))
                }
                other => Err(ProtocolError::Unexpected {
                    message: other.name(),
                    state: "before Hello",
                }),
            };
        }
        match m {
            Message::Hello(_) => Err(ProtocolError::Unexpected {
                message: "Hello",
                state: "after Hello",
            }),
            Message::EpochStart { epoch, .. } => {
                if let Some(s) = &self.staging {
                    return Err(ProtocolError::WrongEpoch {
                        message: "EpochStart",
                        got: epoch,
                        current: s.epoch,
                    });
                }
                if let Some((_, last_epoch)) = self.goodbye {
                    if epoch > last_epoch {
                        return Err(ProtocolError::EpochAfterGoodbye {
                            got: epoch,
                            last_epoch,
                        });
                    }
                }
                if epoch != self.last_committed + 1 {
                    return Err(ProtocolError::EpochNotNext {
                        got: epoch,
                        last: self.last_committed,
                    });
                }
                self.staging = Some(Staging {
                    epoch,
                    held: false,
                    hasher: blake3::Hasher::new(),
                    records: Vec::new(),
                    state: None,
                    output_offset: self.output_next,
                    output: Vec::new(),
                    disk: Vec::new(),
                });
                Ok(Event::Staged)
            }
            Message::Records { epoch, data } => {
                self.check_size(data.len())?;
                let s = self.staged(epoch, "Records")?;
                hash_content(&mut s.hasher, "Records", epoch, 0, &data);
                s.records.extend_from_slice(&data);
                Ok(Event::Staged)
            }
            Message::State { epoch, data } => {
                self.check_size(data.len())?;
                let s = self.staged(epoch, "State")?;
                if s.state.is_some() {
                    return Err(ProtocolError::Order("two machine states in one epoch"));
                }
                hash_content(&mut s.hasher, "State", epoch, 0, &data);
                s.state = Some(data);
                Ok(Event::Staged)
            }
            Message::Output {
                epoch,
                offset,
                data,
            } => {
                self.check_size(data.len())?;
                let s = self.staged(epoch, "Output")?;
                let expected = s.output_offset + s.output.len() as u64;
                if offset != expected {
                    return Err(ProtocolError::OutputGap {
                        got: offset,
                        expected,
                    });
                }
                hash_content(&mut s.hasher, "Output", epoch, offset, &data);
                s.output.extend_from_slice(&data);
                Ok(Event::Staged)
            }
            Message::Disk { epoch, data } => {
                if self.hello.as_ref().is_some_and(|h| h.disk_bytes == 0) {
                    return Err(ProtocolError::Disk(
                        "disk records in a session without a disk",
                    ));
                }
                self.check_size(data.len())?;
                let s = self.staged(epoch, "Disk")?;
                hash_content(&mut s.hasher, "Disk", epoch, 0, &data);
                s.disk.extend_from_slice(&data);
                Ok(Event::Staged)
            }
            Message::Held { epoch } => {
                if self.version.is_some_and(|v| v < version::HELD) {
                    return Err(ProtocolError::Unexpected {
                        message: "Held",
                        state: "in a session below version 7",
                    });
                }
                let s = self.staged(epoch, "Held")?;
                if s.held {
                    return Err(ProtocolError::Order("two Held in one epoch"));
                }
                hash_content(&mut s.hasher, "Held", epoch, 0, &[]);
                s.held = true;
                Ok(Event::Staged)
            }
            Message::Commit {
                epoch,
                digest,
                memory_digest,
                disk,
            } => {
                self.staged(epoch, "Commit")?;
                let s = self.staging.take().expect("checked above");
                let Some(state) = s.state else {
                    return Err(ProtocolError::Order("commit without a machine state"));
                };
                if *s.hasher.finalize().as_bytes() != digest {
                    return Err(ProtocolError::DigestMismatch(epoch));
                }
                let verify = self
                    .hello
                    .as_ref()
                    .is_some_and(|h| h.capabilities & CAP_VERIFY != 0);
                if verify != memory_digest.is_some() {
                    return Err(ProtocolError::Order(
                        "memory digest present without CAP_VERIFY, or missing with it",
                    ));
                }
                if disk.is_some() != self.hello.as_ref().is_some_and(|h| h.disk_bytes > 0) {
                    return Err(ProtocolError::Disk(
                        "a commit's disk part must be present exactly when the session has a disk",
                    ));
                }
                let marks = self.version.is_some_and(|v| v >= version::HELD);
                if marks && self.held_since.is_some() && !s.held {
                    return Err(ProtocolError::Order(
                        "a checkpoint without Held after one with it",
                    ));
                }
                if s.held {
                    self.held_since.get_or_insert(epoch);
                }
                self.last_committed = epoch;
                self.output_next = s.output_offset + s.output.len() as u64;
                Ok(Event::Checkpoint(Checkpoint {
                    resumable: !marks || s.held,
                    epoch,
                    records: s.records,
                    state,
                    output_offset: s.output_offset,
                    output: s.output,
                    memory_digest,
                    disk: s.disk,
                    disk_commit: disk,
                }))
            }
            Message::Ack { .. } => Err(ProtocolError::Unexpected {
                message: "Ack",
                state: "on the backup",
            }),
            Message::Versions { .. } => Err(ProtocolError::Unexpected {
                message: "Versions",
                state: "on the backup",
            }),
            Message::Reuse { .. } => Err(ProtocolError::Unexpected {
                message: "Reuse",
                state: "on the backup",
            }),
            Message::Digests { .. } => Err(ProtocolError::Unexpected {
                message: "Digests",
                state: "on the backup",
            }),
            Message::DiskDigests { .. } => Err(ProtocolError::Unexpected {
                message: "DiskDigests",
                state: "on the backup",
            }),
            Message::Heartbeat { seq, sent_us } => Ok(Event::Heartbeat { seq, sent_us }),
            Message::HeartbeatEcho { seq, sent_us } => Ok(Event::HeartbeatEcho { seq, sent_us }),
            Message::Goodbye { last_epoch, reason } => {
                if self.goodbye.is_some() {
                    return Err(ProtocolError::Unexpected {
                        message: "Goodbye",
                        state: "after a Goodbye",
                    });
                }
                if last_epoch < self.last_committed {
                    return Err(ProtocolError::GoodbyeBehind {
                        last_epoch,
                        committed: self.last_committed,
                    });
                }
                if let Some(s) = &self.staging {
                    if s.epoch > last_epoch {
                        return Err(ProtocolError::EpochAfterGoodbye {
                            got: s.epoch,
                            last_epoch,
                        });
                    }
                }
                self.goodbye = Some((reason.clone(), last_epoch));
                if last_epoch == self.last_committed {
                    Ok(Event::Goodbye(reason))
                } else {
                    Ok(Event::Leaving { last_epoch })
                }
            }
        }
    }
}
