//! The guest console as a service, with byte offsets.
//!
//! Each daemon keeps a [`ConsoleLog`]: the guest's console bytes numbered by
//! their offset in the whole stream since the guest booted. Bytes become
//! visible to clients only when released — on the primary when the backup
//! acknowledges the checkpoint that produced them (output commit), on the
//! backup when it commits that checkpoint, and at once on a guest running
//! after failover. A client that loses one daemon attaches to the other at
//! the next offset and sees no gap and no duplicate.
//!
//! Client protocol, over TCP: send a line with a decimal offset; receive the
//! console bytes from that offset on, live, until the daemon goes. An offset
//! older than the log keeps (the last `--console-keep` bytes, by default
//! [`ConsoleLog::CAPACITY`]) gets
//! `error: …` and the connection ends. The port takes no commands (control
//! is on the owner-only socket of [`crate::control`]); it streams to at most
//! [`MAX_CLIENTS`] clients at once, holds at most [`MAX_PENDING`] connections
//! that have not sent their offset, gives each [`REQUEST_TIMEOUT`] to send
//! it, drops a client that stops reading, and outlives accept errors such
//! as running out of file descriptors.
//!
//! The log is bounded: it keeps the last `--console-keep` bytes that
//! are released, plus what is held (a primary bounds what it holds by
//! pausing its guest).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info};

#[derive(Debug)]
struct Inner {
    base: u64,
    data: VecDeque<u8>,
    released: u64,
    closed: bool,
    hold: bool,
    capacity: usize,
    /// Bytes from this offset on are kept even once released
    /// ([`ConsoleLog::keep_from`]).
    pinned: u64,
}

impl Inner {
    /// Forgets the oldest released bytes beyond the capacity. Held bytes
    /// are never dropped: they are not checkpointed yet; nor are pinned ones.
    fn trim(&mut self) {
        let cap = self.capacity;
        let droppable = self.released.min(self.pinned);
        if self.data.len() > cap && self.base < droppable {
            let n = (self.data.len() - cap).min((droppable - self.base) as usize);
            self.data.drain(..n);
            self.base += n as u64;
            if self.data.capacity() > 2 * cap {
                self.data.shrink_to(cap + (cap >> 2));
            }
        }
    }
}

/// The console stream of one guest, with its release point.
#[derive(Debug)]
pub struct ConsoleLog {
    inner: Mutex<Inner>,
    notify: Notify,
}

/// What a reader gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Visible bytes from the requested offset.
    Bytes(Vec<u8>),
    /// Nothing new yet.
    Wait,
    /// The offset is older than the log keeps.
    Gone {
        /// Oldest offset kept.
        oldest: u64,
    },
    /// The offset is beyond what exists.
    Future {
        /// The end of the stream so far.
        end: u64,
    },
    /// The daemon is shutting the console down.
    Closed,
}

impl ConsoleLog {
    /// Bytes of released history kept by default.
    pub const CAPACITY: usize = 64 << 20;

    /// A log whose first byte has offset `base`, keeping
    /// [`ConsoleLog::CAPACITY`] bytes of released history.
    pub fn new(base: u64) -> Arc<Self> {
        Self::with_capacity(base, Self::CAPACITY)
    }

    /// A log keeping `capacity` bytes of released history (at least 4 KiB).
    pub fn with_capacity(base: u64, capacity: usize) -> Arc<Self> {
        Arc::new(ConsoleLog {
            inner: Mutex::new(Inner {
                base,
                data: VecDeque::new(),
                released: base,
                closed: false,
                hold: true,
                capacity: capacity.max(4096),
                pinned: u64::MAX,
            }),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the log over at `base` (a new replication session).
    pub fn reset(&self, base: u64) {
        {
            let mut i = self.lock();
            i.base = base;
            i.data.clear();
            i.released = base;
        }
        self.notify.notify_waiters();
    }

    /// Whether appended bytes wait for [`ConsoleLog::release`] (the default)
    /// or become visible at once (a guest with no backup: nothing to wait
    /// for). Turning holding off releases everything appended.
    pub fn set_hold(&self, hold: bool) {
        {
            let mut i = self.lock();
            i.hold = hold;
            if !hold {
                i.released = i.base + i.data.len() as u64;
            }
        }
        self.notify.notify_waiters();
    }

    /// Appends bytes; they stay invisible until released, unless holding is off.
    pub fn append(&self, bytes: &[u8]) {
        let mut i = self.lock();
        i.data.extend(bytes);
        let released = !i.hold;
        if released {
            i.released = i.base + i.data.len() as u64;
        }
        i.trim();
        drop(i);
        if released {
            self.notify.notify_waiters();
        }
    }

    /// Appends bytes and releases them at once.
    pub fn append_released(&self, bytes: &[u8]) {
        let end = {
            let mut i = self.lock();
            i.data.extend(bytes);
            i.base + i.data.len() as u64
        };
        self.release(end);
    }

    /// Keeps the bytes from `offset` on (`None`: no such bound) even once
    /// released and beyond the capacity: a primary that releases output
    /// before checkpointing it (during a full resync) pins what its next
    /// checkpoint must carry.
    pub fn keep_from(&self, offset: Option<u64>) {
        let mut i = self.lock();
        i.pinned = offset.unwrap_or(u64::MAX);
        i.trim();
    }

    /// Makes every byte before `offset` visible.
    pub fn release(&self, offset: u64) {
        {
            let mut i = self.lock();
            let end = i.base + i.data.len() as u64;
            i.released = i.released.max(offset.min(end));
            i.trim();
        }
        self.notify.notify_waiters();
    }

    /// Bytes of released history kept.
    pub fn capacity(&self) -> usize {
        self.lock().capacity
    }

    /// Offset one past the last byte appended.
    pub fn end(&self) -> u64 {
        let i = self.lock();
        i.base + i.data.len() as u64
    }

    /// Offset one past the last visible byte.
    pub fn released(&self) -> u64 {
        self.lock().released
    }

    /// The last `max` bytes (or fewer) of the released history, with the
    /// offset of the first: what a new backup receives with its first
    /// checkpoint, so that a client behind the release point when the
    /// backup joined can still read on after a failover to it.
    pub fn history(&self, max: usize) -> (u64, Vec<u8>) {
        let i = self.lock();
        let from = i.released.saturating_sub(max as u64).max(i.base);
        let s = (from - i.base) as usize;
        let e = (i.released - i.base) as usize;
        (from, i.data.range(s..e).copied().collect())
    }

    /// The bytes in `[from, to)` (appended, visible or not), for checkpoints.
    pub fn slice(&self, from: u64, to: u64) -> Vec<u8> {
        let i = self.lock();
        let s = from.saturating_sub(i.base) as usize;
        let e = (to.saturating_sub(i.base) as usize).min(i.data.len());
        i.data.range(s.min(e)..e).copied().collect()
    }

    /// Wakes every reader with [`Read::Closed`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// Up to `max` visible bytes from `offset`.
    pub fn read(&self, offset: u64, max: usize) -> Read {
        let i = self.lock();
        if offset < i.base {
            return Read::Gone { oldest: i.base };
        }
        if offset > i.base + i.data.len() as u64 {
            return Read::Future {
                end: i.base + i.data.len() as u64,
            };
        }
        if offset < i.released {
            let s = (offset - i.base) as usize;
            let e = ((i.released - i.base) as usize).min(s + max);
            return Read::Bytes(i.data.range(s..e).copied().collect());
        }
        if i.closed {
            return Read::Closed;
        }
        Read::Wait
    }

    /// Waits for bytes at `offset`.
    pub async fn read_wait(&self, offset: u64, max: usize) -> Read {
        loop {
            let notified = self.notify.notified();
            match self.read(offset, max) {
                Read::Wait => notified.await,
                other => return other,
            }
        }
    }
}

/// The sink for a machine whose console goes into `log`: invisible until
/// released while the log holds output.
pub fn sink(log: Arc<ConsoleLog>) -> Box<dyn vmm::console::ConsoleSink> {
    struct LogSink(Arc<ConsoleLog>);
    impl vmm::console::ConsoleSink for LogSink {
        fn write(&mut self, _offset: u64, bytes: &[u8]) {
            self.0.append(bytes);
        }
    }
    Box::new(LogSink(log))
}

/// Console clients streamed at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 1024;
/// Connections that have not sent their offset yet, at once; more are
/// closed at once, so idle connections cannot hold every slot for long.
pub const MAX_PENDING: usize = 256;
/// How long a client has to send its offset line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one write to a client may take before it is dropped (a client
/// that stopped reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `log` to console clients on `addr`. Returns the bound address.
pub async fn serve(addr: SocketAddr, log: Arc<ConsoleLog>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(%bound, "console service listening");
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let streaming = Arc::new(Semaphore::new(MAX_CLIENTS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    crate::accept_failed("console service", e).await;
                    continue;
                }
            };
            let Ok(slot) = pending.clone().try_acquire_owned() else {
                debug!(%peer, "console: too many connections without an offset; closed");
                continue;
            };
            let (log, streaming) = (log.clone(), streaming.clone());
            tokio::spawn(async move {
                if let Err(e) = client(stream, log, slot, streaming).await {
                    debug!(%peer, "console client ended: {e}");
                }
            });
        }
    });
    Ok(bound)
}

async fn client(
    stream: TcpStream,
    log: Arc<ConsoleLog>,
    pending: tokio::sync::OwnedSemaphorePermit,
    streaming: Arc<Semaphore>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd.take(64));
    let read = rd.read_line(&mut line);
    if tokio::time::timeout(REQUEST_TIMEOUT, read).await.is_err() {
        drop(pending);
        let msg = format!("error: no offset within {} s\n", REQUEST_TIMEOUT.as_secs());
        return write(&mut wr, msg.as_bytes()).await;
    }
    drop(pending);
    let req = line.trim();
    let Ok(mut at) = req.parse::<u64>() else {
        let msg = format!(
            "error: '{req}' is not a console offset: send a decimal offset and a newline \
             (status, takeover and reset are on the control socket: castor status --help)\n"
        );
        return write(&mut wr, msg.as_bytes()).await;
    };
    let Ok(_slot) = streaming.try_acquire_owned() else {
        let msg = format!("error: too many console clients (at most {MAX_CLIENTS})\n");
        return write(&mut wr, msg.as_bytes()).await;
    };
    loop {
        match log.read_wait(at, 64 << 10).await {
            Read::Bytes(b) => {
                write(&mut wr, &b).await?;
                at += b.len() as u64;
            }
            Read::Gone { oldest } => {
                let msg = format!(
                    "error: offset {at} is older than the oldest kept, {oldest} (the log keeps the last {} bytes: --console-keep)\n",
                    log.capacity()
                );
                return write(&mut wr, msg.as_bytes()).await;
            }
            Read::Future { end } => {
                let msg = format!("error: offset {at} is beyond the end of the stream, {end}\n");
                return write(&mut wr, msg.as_bytes()).await;
            }
            Read::Closed | Read::Wait => return Ok(()),
        }
    }
}

async fn write(wr: &mut tokio::net::tcp::OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client stopped reading",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_released_bytes_are_visible() {
        let log = ConsoleLog::new(100);
        log.append(b"hello ");
        assert_eq!(log.read(100, 10), Read::Wait);
        log.release(103);
        assert_eq!(log.read(100, 10), Read::Bytes(b"hel".to_vec()));
        assert_eq!(log.read(103, 10), Read::Wait);
        assert_eq!(log.read(99, 10), Read::Gone { oldest: 100 });
        assert_eq!(log.read(200, 10), Read::Future { end: 106 });
        log.append_released(b"world");
        assert_eq!(log.read(103, 100), Read::Bytes(b"lo world".to_vec()));
        assert_eq!(log.slice(106, 108), b"wo".to_vec());
        // The released history: its last bytes, never the held ones.
        log.set_hold(true);
        log.append(b"held");
        assert_eq!(log.history(3), (108, b"rld".to_vec()));
        assert_eq!(log.history(1 << 20), (100, b"hello world".to_vec()));
        log.close();
        assert_eq!(log.read(111, 10), Read::Closed);
    }

    #[test]
    fn pinned_bytes_are_kept_though_released_until_unpinned() {
        const CAP: usize = 4096;
        let log = ConsoleLog::with_capacity(0, CAP);
        log.set_hold(false);
        // A primary in a v7 resync: output released at once, but not yet
        // in a checkpoint from offset 1000 on.
        log.append(&[b'a'; 1000]);
        log.keep_from(Some(1000));
        log.append(&[b'b'; 3 * CAP]);
        assert_eq!(log.slice(1000, 1000 + 3 * CAP as u64).len(), 3 * CAP);
        assert!(matches!(log.read(1000, 10), Read::Bytes(_)));
        // Checkpointed: the pin moves on, and the log shrinks to its size.
        log.keep_from(Some(log.end()));
        log.append(b"c");
        let end = log.end();
        assert!(matches!(
            log.read(end - CAP as u64 - 1, 1),
            Read::Gone { .. }
        ));
        log.keep_from(None);
        log.append(&[b'd'; 2 * CAP]);
        assert!(matches!(log.read(end, 1), Read::Gone { .. }));
    }

    #[test]
    fn the_log_stays_bounded_whether_released_or_not_held() {
        const CAP: usize = 64 << 10;
        let chunk = vec![b'x'; 1 << 10];
        // Released at once (an unprotected primary, a survivor) or released
        // after appending (a backup's commits, a protected primary).
        for hold in [false, true] {
            let log = ConsoleLog::with_capacity(0, CAP);
            log.set_hold(hold);
            for _ in 0..3 * CAP / chunk.len() {
                log.append(&chunk);
                if hold {
                    log.release(log.end());
                }
            }
            let end = log.end();
            assert_eq!(end, 3 * CAP as u64);
            assert!(log.lock().data.len() <= CAP);
            assert!(log.lock().data.capacity() <= 2 * CAP);
            let oldest = end - CAP as u64;
            assert_eq!(log.read(oldest - 1, 1), Read::Gone { oldest });
            assert_eq!(log.read(oldest, 1), Read::Bytes(b"x".to_vec()));
        }
        // Held bytes are kept beyond the capacity until released.
        let log = ConsoleLog::with_capacity(0, CAP);
        for _ in 0..2 * CAP / chunk.len() {
            log.append(&chunk);
        }
        assert_eq!(log.read(0, 1), Read::Wait);
        assert_eq!(log.slice(0, 1), b"x".to_vec());
        log.release(log.end());
        assert!(matches!(log.read(0, 1), Read::Gone { .. }));
    }
}
