//! castor's replication protocol.
//!
//! - [`message`]: the versioned binary messages and frames, with a limit on
//!   every length; [`message::FrameDecoder`] splits a byte stream into them.
//! - [`session`]: the primary's and the backup's state machines, sans I/O.
//! - [`payload`]: what is inside the messages: the machine state's
//!   compression, the memory digest, the mode byte.
//! - [`end`]: the typed reason for every end of a session, and its close code.
//! - [`beat`]: heartbeat datagrams on their own path, authenticated.
//! - [`disk`]: a checkpoint's disk blocks and their validation.
//! - [`reuse`]: a backup's offer of the image it kept, and the primary's plan
//!   of the pages that differ.
//!
//! This crate does no I/O: the daemons feed it bytes and take bytes out. The
//! mutual-TLS QUIC transport that carries the frames is `castor-transport`.
//! The format is described in `docs/protocol.md`.
#![forbid(unsafe_code)]

pub mod beat;
pub mod codec;
pub mod disk;
pub mod end;
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod payload;
pub mod reuse;
pub mod session;
pub mod version;

pub use end::EndReason;
pub use message::{FrameDecoder, Hello, Message, VERSION};
pub use session::{staging_bound, Checkpoint, Event, Limits, Receiver, Sender};

/// A frame or message that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The input ends inside a field.
    #[error("truncated message: it ends inside {0}")]
    Truncated(&'static str),
    /// A length beyond its limit.
    #[error("{field} is {len} bytes, over its limit of {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A frame larger than the protocol allows.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Declared length.
        len: u64,
        /// The maximum.
        max: u64,
    },
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A protocol version older than any hello this castor can read.
    #[error("peer speaks protocol version {got}; this castor speaks versions {supported}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
        /// Ours.
        supported: version::Range,
    },
    /// Bytes left after a complete message.
    #[error("{extra} unexpected bytes after a {message} message")]
    TrailingBytes {
        /// The message.
        message: &'static str,
        /// How many.
        extra: usize,
    },
    /// A field with an invalid value.
    #[error("{field} has the invalid value {value}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A string that is not UTF-8.
    #[error("{0} is not UTF-8")]
    BadUtf8(&'static str),
}

/// A message that is valid on its own but not at this point of the session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame did not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A message out of place.
    #[error("unexpected {message} {state}")]
    Unexpected {
        /// The message.
        message: &'static str,
        /// Where the session was.
        state: &'static str,
    },
    /// A content message for another epoch than the open one.
    #[error("{message} for epoch {got} while epoch {current} is open")]
    WrongEpoch {
        /// The message.
        message: &'static str,
        /// Its epoch.
        got: u64,
        /// The open epoch.
        current: u64,
    },
    /// Epochs must be consecutive: every mode sends only the pages dirtied
    /// since the previous epoch, so a missing epoch is a replica missing
    /// writes (and an old one would roll it back).
    #[error(
        "epoch {got} does not follow the last committed epoch {last}: only epoch {} may come next (each checkpoint carries only the pages dirtied since the one before)",
        .last + 1
    )]
    EpochNotNext {
        /// The epoch received.
        got: u64,
        /// The last committed.
        last: u64,
    },
    /// The hello names another node than the certificate was checked for.
    #[error("the hello names node '{hello}', but the peer's certificate is for '{certificate}'")]
    WrongNode {
        /// The hello's name.
        hello: String,
        /// The name the certificate was verified for.
        certificate: String,
    },
    /// The protected machine's RAM exceeds what this backup accepts.
    #[error("the primary's guest has {memory_bytes} bytes of RAM, over this backup's limit of {limit} (--max-memory)")]
    MemoryOverLimit {
        /// The hello's `memory_bytes`.
        memory_bytes: u64,
        /// The backup's limit.
        limit: u64,
    },
    /// A RAM size that is not a positive number of 4 KiB pages.
    #[error("the hello's memory size {0} is not a positive multiple of 4096 bytes")]
    BadMemorySize(u64),
    /// More vCPUs than this backup accepts.
    #[error(
        "the primary's guest has {vcpus} vCPUs, over this backup's limit of {limit} (--max-vcpus)"
    )]
    VcpusOverLimit {
        /// The hello's `vcpus`.
        vcpus: u32,
        /// The backup's limit.
        limit: u32,
    },
    /// The goodbye names an epoch older than one already committed.
    #[error("the goodbye names epoch {last_epoch} as the last sent, but epoch {committed} was committed")]
    GoodbyeBehind {
        /// The goodbye's last epoch.
        last_epoch: u64,
        /// The last committed.
        committed: u64,
    },
    /// An epoch after the goodbye's last one.
    #[error("epoch {got} after a goodbye whose last epoch is {last_epoch}")]
    EpochAfterGoodbye {
        /// The epoch received.
        got: u64,
        /// The goodbye's last epoch.
        last_epoch: u64,
    },
    /// Messages in the wrong order within an epoch.
    #[error("protocol order violated: {0}")]
    Order(&'static str),
    /// An epoch larger than the staging limit.
    #[error("epoch exceeds the staging limit of {limit} bytes")]
    EpochTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Console output not contiguous.
    #[error("console output at offset {got}, expected {expected}: a gap or an overlap")]
    OutputGap {
        /// Received offset.
        got: u64,
        /// Expected offset.
        expected: u64,
    },
    /// The commit digest does not match what was received.
    #[error("epoch {0}: commit digest does not match the received content")]
    DigestMismatch(u64),
    /// An ack for an epoch not in flight.
    #[error(
        "ack for epoch {epoch}, but acked up to {last_acked} and committed up to {last_committed}"
    )]
    BadAck {
        /// The ack's epoch.
        epoch: u64,
        /// Last acked.
        last_acked: u64,
        /// Last committed.
        last_committed: u64,
    },
    /// The primary and the backup speak no protocol version in common.
    #[error(
        "no protocol version in common: the primary speaks versions {primary}, the backup {backup}"
    )]
    NoCommonVersion {
        /// The versions the primary's hello offers.
        primary: version::Range,
        /// The versions the backup speaks.
        backup: version::Range,
    },
    /// The backup's answer to the hello names a version the hello did not
    /// offer.
    #[error("the backup chose protocol version {chosen}, which the hello did not offer (versions {offered})")]
    BadVersionAnswer {
        /// The version the answer names.
        chosen: u16,
        /// The hello's range.
        offered: version::Range,
    },
    /// Capabilities this castor does not know.
    #[error("unknown capabilities {0:#x}")]
    UnknownCapabilities(u64),
    /// The primary's disk and this backup's are not the same size (or one
    /// of them has none).
    #[error("the primary's guest has a disk of {primary} bytes, this backup's --disk has {backup} (0: none); both nodes need a disk of the same size")]
    DiskMismatch {
        /// The hello's `disk_bytes`.
        primary: u64,
        /// The backup's.
        backup: u64,
    },
    /// Disk content without a disk, or a commit whose disk part does not
    /// match the hello.
    #[error("disk: {0}")]
    Disk(&'static str),
}

impl WireError {
    /// The error is in a hello's content (its version or a field's value):
    /// the peer describes a session this castor cannot accept, as opposed
    /// to sending malformed bytes.
    pub fn is_incompatible(&self) -> bool {
        match self {
            WireError::UnsupportedVersion { .. } => true,
            WireError::BadValue { field, .. } => field.starts_with("Hello."),
            _ => false,
        }
    }
}

impl ProtocolError {
    /// The hello describes a session this backup does not accept (version,
    /// capabilities, node name, machine size, mode): ends the session with
    /// [`EndReason::Incompatible`] rather than a refusal.
    pub fn is_incompatible(&self) -> bool {
        match self {
            ProtocolError::Wire(w) => w.is_incompatible(),
            ProtocolError::WrongNode { .. }
            | ProtocolError::MemoryOverLimit { .. }
            | ProtocolError::BadMemorySize(_)
            | ProtocolError::VcpusOverLimit { .. }
            | ProtocolError::UnknownCapabilities(_)
            | ProtocolError::NoCommonVersion { .. }
            | ProtocolError::BadVersionAnswer { .. }
            | ProtocolError::DiskMismatch { .. } => true,
            _ => false,
        }
    }
}
