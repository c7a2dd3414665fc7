//! The messages of a replication session and their binary encoding.
//!
//! Every message travels in a frame: `u32 length | u8 type | payload`, the
//! length counting the type byte and the payload, at most [`MAX_FRAME`].
//! Integers are little endian; byte strings are `u32 length | bytes`, each
//! with its own limit. See `docs/protocol.md`.

use std::fmt;

use crate::codec::{Reader, Writer};
use crate::WireError;

/// The highest protocol version this castor speaks (it speaks
/// [`crate::version::SUPPORTED`]: 5 to this one).
pub const VERSION: u16 = 7;
/// Largest frame: the largest message (a machine state) plus headers.
pub const MAX_FRAME: usize = MAX_STATE + 1024;
/// Largest chunk of fgbi records in one message.
pub const MAX_RECORDS_CHUNK: usize = 1 << 20;
/// Largest encoded machine state.
pub const MAX_STATE: usize = 16 << 20;
/// Largest chunk of guest console output in one message.
pub const MAX_OUTPUT_CHUNK: usize = 1 << 20;
/// Longest node name.
pub const MAX_NAME: usize = 255;
/// Longest goodbye reason.
pub const MAX_REASON: usize = 1024;

/// Capability: the primary sends a digest of the applied memory with each
/// commit, and the backup checks its replica against it.
pub const CAP_VERIFY: u64 = 1;
/// Capability: the primary reads a reuse offer ([`Message::Reuse`],
/// [`Message::Digests`]) before its first checkpoint, and sends only the
/// pages the backup's image lacks.
pub const CAP_REUSE: u64 = 2;
/// Most generation runs in one [`Message::Reuse`].
pub const MAX_RUNS: usize = 1 << 16;
/// Most page digests in one [`Message::Digests`].
pub const MAX_DIGESTS_CHUNK: usize = 1 << 17;
/// Largest chunk of disk records in one [`Message::Disk`] (the encoder cuts
/// chunks at record boundaries: a chunk ends within one record of 1 MiB).
pub const MAX_DISK_CHUNK: usize = (1 << 20) + crate::disk::MAX_RECORD;

/// First message on a connection, from the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version: in a hello of version 6 or more, the highest the
    /// primary speaks; a v5 hello (castor 0.1's, or a primary speaking 5 to
    /// a backup that only speaks 5) speaks 5 alone. See [`crate::version`].
    pub version: u16,
    /// The lowest version the primary speaks (on the wire from version 6
    /// on, right after `version`; a v5 hello reads as 5).
    pub lowest_version: u16,
    /// Random session id: a new one for every full resync.
    pub session: u64,
    /// The sender's node name. The backup refuses a hello whose name is not
    /// the peer name its certificate was checked against
    /// ([`crate::session::Limits::peer_name`]).
    pub node: String,
    /// Capability bits ([`CAP_VERIFY`]).
    pub capabilities: u64,
    /// Encoding mode (one byte on the wire: [`crate::payload::mode_byte`]).
    pub mode: fgbi::Mode,
    /// fgbi block size.
    pub block_size: u32,
    /// Guest RAM size in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Console stream offset of the first output byte this session sends.
    pub output_offset: u64,
    /// The primary's fencing token: the generation of the VM's ownership it
    /// won at the witness (0 without a witness). A backup refuses a token
    /// older than one it has seen.
    pub token: u64,
    /// UDP port of the primary's heartbeat path ([`crate::beat`]) on the
    /// primary's address; 0: none.
    pub beat_port: u16,
    /// The key that authenticates heartbeat datagrams both ways.
    pub beat_key: [u8; 32],
    /// Size of the guest's disk in bytes (0: no disk). The backup's disk
    /// must be of the same size; it offers its block digests
    /// ([`Message::DiskDigests`]) and checkpoints carry the blocks written.
    pub disk_bytes: u64,
}

impl Hello {
    /// The hello offering `versions`: a hello of version 6 or more names
    /// the range; offering 5 alone makes a v5 hello, as castor 0.1 writes
    /// it.
    pub fn offering(mut self, versions: crate::version::Range) -> Hello {
        self.version = versions.highest;
        self.lowest_version = versions.lowest;
        self
    }
}

/// A message of the replication protocol.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// Session start (primary → backup).
    Hello(Hello),
    /// An epoch's checkpoint begins (primary → backup).
    EpochStart {
        /// Epoch number, strictly increasing.
        epoch: u64,
        /// Dirty pages in this epoch.
        dirty_pages: u32,
        /// Bytes those pages would take raw.
        raw_bytes: u64,
    },
    /// A chunk of the epoch's fgbi records (primary → backup).
    Records {
        /// Epoch.
        epoch: u64,
        /// Records (chunks concatenate into the epoch's record stream).
        data: Vec<u8>,
    },
    /// The encoded machine state at the checkpoint (primary → backup).
    State {
        /// Epoch.
        epoch: u64,
        /// `castor_vmm::MachineState::encode` output.
        data: Vec<u8>,
    },
    /// Guest console output produced during the epoch (primary → backup).
    Output {
        /// Epoch.
        epoch: u64,
        /// Console stream offset of `data[0]`.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A chunk of the epoch's disk records ([`crate::disk`]; primary →
    /// backup).
    Disk {
        /// Epoch.
        epoch: u64,
        /// Records (chunks concatenate into the epoch's disk records).
        data: Vec<u8>,
    },
    /// Version 7 on: the primary held the guest's output from this
    /// checkpoint's pause on, so the checkpoint holds everything the world
    /// has seen and the backup may resume from it (primary → backup, inside
    /// the epoch, before its `Commit`; part of its digest). A v7 checkpoint
    /// without it may not be resumed from: the primary released output past
    /// its snapshot (during the session's full resync). Once a session's
    /// checkpoint carries it, every later one does. Below version 7 every
    /// checkpoint may be resumed from, and the message is refused.
    Held {
        /// Epoch.
        epoch: u64,
    },
    /// The epoch is complete (primary → backup).
    Commit {
        /// Epoch.
        epoch: u64,
        /// blake3 of the epoch's content (see [`crate::session`]).
        digest: [u8; 32],
        /// With [`CAP_VERIFY`]: blake3 of the dirty pages after the
        /// checkpoint, in ascending page order.
        memory_digest: Option<[u8; 32]>,
        /// With a disk: the disk's digest sum at the pause, and whether the
        /// guest flushed in the epoch.
        disk: Option<crate::disk::DiskCommit>,
    },
    /// The backup has committed the epoch (backup → primary).
    Ack {
        /// Epoch.
        epoch: u64,
    },
    /// Liveness probe (either direction).
    Heartbeat {
        /// Sequence number.
        seq: u64,
        /// Sender's clock, microseconds.
        sent_us: u64,
    },
    /// Reply to a heartbeat (echoes it).
    HeartbeatEcho {
        /// The heartbeat's sequence number.
        seq: u64,
        /// The heartbeat's `sent_us`.
        sent_us: u64,
    },
    /// Orderly end of the session (primary → backup, on the control
    /// stream): the primary stops on purpose after checkpoint `last_epoch`.
    /// The backup stands down (no takeover) and ends the session once it
    /// has committed `last_epoch`, or when the data stream ends.
    Goodbye {
        /// The last epoch the primary sent in this session (0: none).
        last_epoch: u64,
        /// Why.
        reason: String,
    },
    /// The backup's answer to a hello of version 6 or more (backup →
    /// primary, on the control stream, before anything else): the version
    /// the session uses, and the range the backup speaks. See
    /// [`crate::version`].
    Versions {
        /// The version chosen: the highest both speak.
        version: u16,
        /// The lowest version the backup speaks.
        lowest: u16,
        /// The highest version the backup speaks.
        highest: u16,
    },
    /// The backup's answer to a hello with [`CAP_REUSE`] (backup → primary,
    /// on the control stream): the image it keeps, as per-page generation
    /// runs; its page digests follow in [`Message::Digests`]. `pages == 0`:
    /// no image to offer, and `reason` says why (a full resync follows).
    Reuse {
        /// The hello's session.
        session: u64,
        /// Pages of the image (the hello's memory size in pages), or 0.
        pages: u64,
        /// Why there is no image (with `pages == 0`).
        reason: String,
        /// `(tag, count)` runs covering every page in order; empty when the
        /// image's generations are unknown (digests alone then decide).
        runs: Vec<(u64, u64)>,
    },
    /// Digests of the offered image's pages `first ..` (backup → primary).
    Digests {
        /// The hello's session.
        session: u64,
        /// The first page.
        first: u64,
        /// One xxh3-64 digest per page.
        digests: Vec<u64>,
    },
    /// Digests of the backup's disk blocks `first ..` (backup → primary, on
    /// the control stream, after the memory's reuse answer, when the hello
    /// has a disk): the primary sends in the first checkpoint only the
    /// blocks whose digest differs from its own.
    DiskDigests {
        /// The hello's session.
        session: u64,
        /// The first block.
        first: u64,
        /// One digest per block (`castor_vmm::disk::block_digest`).
        digests: Vec<u64>,
    },
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Hello(h) => write!(f, "Hello({h:?})"),
            Message::EpochStart {
                epoch,
                dirty_pages,
                raw_bytes,
            } => {
                write!(f, "EpochStart {{ epoch: {epoch}, dirty_pages: {dirty_pages}, raw_bytes: {raw_bytes} }}")
            }
            Message::Records { epoch, data } => {
                write!(f, "Records {{ epoch: {epoch}, len: {} }}", data.len())
            }
            Message::State { epoch, data } => {
                write!(f, "State {{ epoch: {epoch}, len: {} }}", data.len())
            }
            Message::Output {
                epoch,
                offset,
                data,
            } => {
                write!(
                    f,
                    "Output {{ epoch: {epoch}, offset: {offset}, len: {} }}",
                    data.len()
                )
            }
            Message::Disk { epoch, data } => {
                write!(f, "Disk {{ epoch: {epoch}, len: {} }}", data.len())
            }
            Message::Commit {
                epoch,
                memory_digest,
                disk,
                ..
            } => {
                write!(
                    f,
                    "Commit {{ epoch: {epoch}, verify: {}, disk: {disk:?} }}",
                    memory_digest.is_some()
                )
            }
            Message::Held { epoch } => write!(f, "Held {{ epoch: {epoch} }}"),
            Message::Ack { epoch } => write!(f, "Ack {{ epoch: {epoch} }}"),
            Message::Heartbeat { seq, .. } => write!(f, "Heartbeat {{ seq: {seq} }}"),
            Message::HeartbeatEcho { seq, .. } => write!(f, "HeartbeatEcho {{ seq: {seq} }}"),
            Message::Goodbye { last_epoch, reason } => write!(
                f,
                "Goodbye {{ last_epoch: {last_epoch}, reason: {reason:?} }}"
            ),
            Message::Versions {
                version,
                lowest,
                highest,
            } => write!(
                f,
                "Versions {{ version: {version}, lowest: {lowest}, highest: {highest} }}"
            ),
            Message::Reuse {
                session,
                pages,
                reason,
                runs,
            } => write!(
                f,
                "Reuse {{ session: {session}, pages: {pages}, reason: {reason:?}, runs: {} }}",
                runs.len()
            ),
            Message::Digests {
                session,
                first,
                digests,
            } => write!(
                f,
                "Digests {{ session: {session}, first: {first}, len: {} }}",
                digests.len()
            ),
            Message::DiskDigests {
                session,
                first,
                digests,
            } => write!(
                f,
                "DiskDigests {{ session: {session}, first: {first}, len: {} }}",
                digests.len()
            ),
        }
    }
}

mod ty {
    pub const HELLO: u8 = 1;
    pub const EPOCH_START: u8 = 2;
    pub const RECORDS: u8 = 3;
    pub const STATE: u8 = 4;
    pub const OUTPUT: u8 = 5;
    pub const COMMIT: u8 = 6;
    pub const ACK: u8 = 7;
    pub const HEARTBEAT: u8 = 8;
    pub const HEARTBEAT_ECHO: u8 = 9;
    pub const GOODBYE: u8 = 10;
    pub const REUSE: u8 = 11;
    pub const DIGESTS: u8 = 12;
    pub const DISK: u8 = 13;
    pub const DISK_DIGESTS: u8 = 14;
    pub const VERSIONS: u8 = 15;
    pub const HELD: u8 = 16;
}

fn u64s(r: &mut Reader<'_>, f: &'static str, max: usize) -> Result<Vec<u64>, WireError> {
    let b = r.bytes(f, max * 8)?;
    if b.len() % 8 != 0 {
        return Err(WireError::BadValue {
            field: f,
            value: b.len() as u64,
        });
    }
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// A reason's bytes, cut at a character boundary within [`MAX_REASON`].
fn cut_reason(reason: &str) -> &[u8] {
    let mut n = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(n) {
        n -= 1;
    }
    &reason.as_bytes()[..n]
}

fn put_u64s(w: &mut Writer, v: impl Iterator<Item = u64>) {
    let b: Vec<u8> = v.flat_map(u64::to_le_bytes).collect();
    w.bytes(&b);
}

fn string(r: &mut Reader<'_>, f: &'static str, max: usize) -> Result<String, WireError> {
    String::from_utf8(r.bytes(f, max)?).map_err(|_| WireError::BadUtf8(f))
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::EpochStart { .. } => "EpochStart",
            Message::Records { .. } => "Records",
            Message::State { .. } => "State",
            Message::Output { .. } => "Output",
            Message::Held { .. } => "Held",
            Message::Commit { .. } => "Commit",
            Message::Ack { .. } => "Ack",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::HeartbeatEcho { .. } => "HeartbeatEcho",
            Message::Goodbye { .. } => "Goodbye",
            Message::Versions { .. } => "Versions",
            Message::Reuse { .. } => "Reuse",
            Message::Digests { .. } => "Digests",
            Message::Disk { .. } => "Disk",
            Message::DiskDigests { .. } => "DiskDigests",
        }
    }

    /// Appends the message as one frame to `out`. Panics only if a field
    /// exceeds its documented limit (a caller bug, not input).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer(Vec::new());
        let t = match self {
            Message::Hello(h) => {
                assert!(h.node.len() <= MAX_NAME, "node name over {MAX_NAME} bytes");
                w.u16(h.version);
                if h.version >= crate::version::NEGOTIATED {
                    w.u16(h.lowest_version);
                }
                w.u64(h.session);
                w.bytes(h.node.as_bytes());
                w.u64(h.capabilities);
                w.u8(crate::payload::mode_byte(h.mode));
                w.u32(h.block_size);
                w.u64(h.memory_bytes);
                w.u32(h.vcpus);
                w.u64(h.output_offset);
                w.u64(h.token);
                w.u16(h.beat_port);
                w.raw(&h.beat_key);
                w.u64(h.disk_bytes);
                ty::HELLO
            }
            Message::EpochStart {
                epoch,
                dirty_pages,
                raw_bytes,
            } => {
                w.u64(*epoch);
                w.u32(*dirty_pages);
                w.u64(*raw_bytes);
                ty::EPOCH_START
            }
            Message::Records { epoch, data } => {
                assert!(
                    data.len() <= MAX_RECORDS_CHUNK,
                    "records chunk over the limit"
                );
                w.u64(*epoch);
                w.bytes(data);
                ty::RECORDS
            }
            Message::State { epoch, data } => {
                assert!(data.len() <= MAX_STATE, "machine state over the limit");
                w.u64(*epoch);
                w.bytes(data);
                ty::STATE
            }
            Message::Output {
                epoch,
                offset,
                data,
            } => {
                assert!(
                    data.len() <= MAX_OUTPUT_CHUNK,
                    "output chunk over the limit"
                );
                w.u64(*epoch);
                w.u64(*offset);
                w.bytes(data);
                ty::OUTPUT
            }
            Message::Disk { epoch, data } => {
                assert!(data.len() <= MAX_DISK_CHUNK, "disk chunk over the limit");
                w.u64(*epoch);
                w.bytes(data);
                ty::DISK
            }
            Message::Commit {
                epoch,
                digest,
                memory_digest,
                disk,
            } => {
                w.u64(*epoch);
                w.raw(digest);
                match memory_digest {
                    Some(d) => {
                        w.u8(1);
                        w.raw(d);
                    }
                    None => w.u8(0),
                }
                match disk {
                    Some(d) => {
                        w.u8(1);
                        w.u64(d.sum);
                        w.u8(d.flushed as u8);
                    }
                    None => w.u8(0),
                }
                ty::COMMIT
            }
            Message::Held { epoch } => {
                w.u64(*epoch);
                ty::HELD
            }
            Message::Ack { epoch } => {
                w.u64(*epoch);
                ty::ACK
            }
            Message::Heartbeat { seq, sent_us } => {
                w.u64(*seq);
                w.u64(*sent_us);
                ty::HEARTBEAT
            }
            Message::HeartbeatEcho { seq, sent_us } => {
                w.u64(*seq);
                w.u64(*sent_us);
                ty::HEARTBEAT_ECHO
            }
            Message::Goodbye { last_epoch, reason } => {
                w.u64(*last_epoch);
                w.bytes(cut_reason(reason));
                ty::GOODBYE
            }
            Message::Versions {
                version,
                lowest,
                highest,
            } => {
                w.u16(*version);
                w.u16(*lowest);
                w.u16(*highest);
                ty::VERSIONS
            }
            Message::Reuse {
                session,
                pages,
                reason,
                runs,
            } => {
                assert!(runs.len() <= MAX_RUNS, "reuse offer over {MAX_RUNS} runs");
                w.u64(*session);
                w.u64(*pages);
                w.bytes(cut_reason(reason));
                put_u64s(&mut w, runs.iter().flat_map(|&(t, c)| [t, c]));
                ty::REUSE
            }
            Message::Digests {
                session,
                first,
                digests,
            } => {
                assert!(
                    digests.len() <= MAX_DIGESTS_CHUNK,
                    "digests chunk over the limit"
                );
                w.u64(*session);
                w.u64(*first);
                put_u64s(&mut w, digests.iter().copied());
                ty::DIGESTS
            }
            Message::DiskDigests {
                session,
                first,
                digests,
            } => {
                assert!(
                    digests.len() <= MAX_DIGESTS_CHUNK,
                    "disk digests chunk over the limit"
                );
                w.u64(*session);
                w.u64(*first);
                put_u64s(&mut w, digests.iter().copied());
                ty::DISK_DIGESTS
            }
        };
        out.extend_from_slice(&((w.0.len() + 1) as u32).to_le_bytes());
        out.push(t);
        out.extend_from_slice(&w.0);
    }

    /// The message as one frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one frame body (`type | payload`, without the length).
    pub fn decode(body: &[u8]) -> Result<Message, WireError> {
        let (&t, payload) = body
            .split_first()
            .ok_or(WireError::Truncated("frame type"))?;
        let mut r = Reader::new(payload);
        let m = match t {
            ty::HELLO => {
                // Every hello from version 5 on reads the same: a v5 hello
                // has no range; from version 6 on the layout is frozen, so
                // the range of a newer castor's hello is read (and refused
                // with both ranges named if there is none in common).
                let version = r.u16("Hello.version")?;
                if version < crate::version::V5 {
                    return Err(WireError::UnsupportedVersion {
                        got: version,
                        supported: crate::version::SUPPORTED,
                    });
                }
                let lowest_version = if version >= crate::version::NEGOTIATED {
                    let l = r.u16("Hello.lowest_version")?;
                    if l > version {
                        return Err(WireError::BadValue {
                            field: "Hello.lowest_version",
                            value: l as u64,
                        });
                    }
                    l
                } else {
                    version
                };
                Message::Hello(Hello {
                    version,
                    lowest_version,
                    session: r.u64("Hello.session")?,
                    node: string(&mut r, "Hello.node", MAX_NAME)?,
                    capabilities: r.u64("Hello.capabilities")?,
                    mode: crate::payload::mode_from_byte(r.u8("Hello.mode")?)?,
                    block_size: r.u32("Hello.block_size")?,
                    memory_bytes: r.u64("Hello.memory_bytes")?,
                    vcpus: r.u32("Hello.vcpus")?,
                    output_offset: r.u64("Hello.output_offset")?,
                    token: r.u64("Hello.token")?,
                    beat_port: r.u16("Hello.beat_port")?,
                    beat_key: r.array("Hello.beat_key")?,
                    disk_bytes: r.u64("Hello.disk_bytes")?,
                })
            }
            ty::EPOCH_START => Message::EpochStart {
                epoch: r.u64("EpochStart.epoch")?,
                dirty_pages: r.u32("EpochStart.dirty_pages")?,
                raw_bytes: r.u64("EpochStart.raw_bytes")?,
            },
            ty::RECORDS => Message::Records {
                epoch: r.u64("Records.epoch")?,
                data: r.bytes("Records.data", MAX_RECORDS_CHUNK)?,
            },
            ty::STATE => Message::State {
                epoch: r.u64("State.epoch")?,
                data: r.bytes("State.data", MAX_STATE)?,
            },
            ty::OUTPUT => Message::Output {
                epoch: r.u64("Output.epoch")?,
                offset: r.u64("Output.offset")?,
                data: r.bytes("Output.data", MAX_OUTPUT_CHUNK)?,
            },
            ty::DISK => Message::Disk {
                epoch: r.u64("Disk.epoch")?,
                data: r.bytes("Disk.data", MAX_DISK_CHUNK)?,
            },
            ty::COMMIT => Message::Commit {
                epoch: r.u64("Commit.epoch")?,
                digest: r.array("Commit.digest")?,
                memory_digest: match r.u8("Commit.has_memory_digest")? {
                    0 => None,
                    1 => Some(r.array("Commit.memory_digest")?),
                    v => {
                        return Err(WireError::BadValue {
                            field: "Commit.has_memory_digest",
                            value: v as u64,
                        })
                    }
                },
                disk: match r.u8("Commit.has_disk")? {
                    0 => None,
                    1 => Some(crate::disk::DiskCommit {
                        sum: r.u64("Commit.disk_sum")?,
                        flushed: match r.u8("Commit.disk_flushed")? {
                            0 => false,
                            1 => true,
                            v => {
                                return Err(WireError::BadValue {
                                    field: "Commit.disk_flushed",
                                    value: v as u64,
                                })
                            }
                        },
                    }),
                    v => {
                        return Err(WireError::BadValue {
                            field: "Commit.has_disk",
                            value: v as u64,
                        })
                    }
                },
            },
            ty::ACK => Message::Ack {
                epoch: r.u64("Ack.epoch")?,
            },
            ty::HEARTBEAT => Message::Heartbeat {
                seq: r.u64("Heartbeat.seq")?,
                sent_us: r.u64("Heartbeat.sent_us")?,
            },
            ty::HEARTBEAT_ECHO => Message::HeartbeatEcho {
                seq: r.u64("HeartbeatEcho.seq")?,
                sent_us: r.u64("HeartbeatEcho.sent_us")?,
            },
            ty::HELD => Message::Held {
                epoch: r.u64("Held.epoch")?,
            },
            ty::GOODBYE => Message::Goodbye {
                last_epoch: r.u64("Goodbye.last_epoch")?,
                reason: string(&mut r, "Goodbye.reason", MAX_REASON)?,
            },
            ty::VERSIONS => Message::Versions {
                version: r.u16("Versions.version")?,
                lowest: r.u16("Versions.lowest")?,
                highest: r.u16("Versions.highest")?,
            },
            ty::REUSE => {
                let session = r.u64("Reuse.session")?;
                let pages = r.u64("Reuse.pages")?;
                let reason = string(&mut r, "Reuse.reason", MAX_REASON)?;
                let flat = u64s(&mut r, "Reuse.runs", 2 * MAX_RUNS)?;
                if flat.len() % 2 != 0 {
                    return Err(WireError::BadValue {
                        field: "Reuse.runs",
                        value: flat.len() as u64,
                    });
                }
                Message::Reuse {
                    session,
                    pages,
                    reason,
                    runs: flat.chunks_exact(2).map(|c| (c[0], c[1])).collect(),
                }
            }
            ty::DIGESTS => Message::Digests {
                session: r.u64("Digests.session")?,
                first: r.u64("Digests.first")?,
                digests: u64s(&mut r, "Digests.digests", MAX_DIGESTS_CHUNK)?,
            },
            ty::DISK_DIGESTS => Message::DiskDigests {
                session: r.u64("DiskDigests.session")?,
                first: r.u64("DiskDigests.first")?,
                digests: u64s(&mut r, "DiskDigests.digests", MAX_DIGESTS_CHUNK)?,
            },
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish(m.name())?;
        Ok(m)
    }
}

/// Splits a byte stream into messages, checking each frame's length before
/// buffering it: memory stays within one frame plus what the caller feeds.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `None` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4")) as usize;
        if len == 0 {
            return Err(WireError::Truncated("frame type"));
        }
        if len > MAX_FRAME {
            return Err(WireError::FrameTooLarge {
                len: len as u64,
                max: MAX_FRAME as u64,
            });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let m = Message::decode(&avail[4..4 + len])?;
        self.start += 4 + len;
        Ok(Some(m))
    }
}
