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
//! console bytes from that offset on, live, until the daemon goes. Or send
//! `status` and receive one line of JSON. An offset older than the log keeps
//! (the last [`ConsoleLog::CAPACITY`] bytes) gets `error: …` and the line ends.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, info};

#[derive(Debug)]
struct Inner {
    base: u64,
    data: VecDeque<u8>,
    released: u64,
    closed: bool,
    hold: bool,
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
    /// Bytes of history kept.
    pub const CAPACITY: usize = 64 << 20;

    /// A log whose first byte has offset `base`.
    pub fn new(base: u64) -> Arc<Self> {
        Arc::new(ConsoleLog {
            inner: Mutex::new(Inner {
                base,
                data: VecDeque::new(),
                released: base,
                closed: false,
                hold: true,
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
        if !i.hold {
            i.released = i.base + i.data.len() as u64;
            drop(i);
            self.notify.notify_waiters();
            return;
        }
        while i.data.len() > Self::CAPACITY && i.base < i.released {
            let drop = (i.data.len() - Self::CAPACITY).min((i.released - i.base) as usize);
            i.data.drain(..drop);
            i.base += drop as u64;
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

    /// Makes every byte before `offset` visible.
    pub fn release(&self, offset: u64) {
        {
            let mut i = self.lock();
            let end = i.base + i.data.len() as u64;
            i.released = i.released.max(offset.min(end));
        }
        self.notify.notify_waiters();
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

/// A handler of command words; `None` for a word it does not know.
pub type Handler = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Answers command words (`status`, `takeover`, …) for the console service.
/// The handler is replaced when the node changes role (a backup that takes
/// over answers as a primary from then on).
pub struct Commands(std::sync::RwLock<Handler>);

impl Commands {
    /// Commands answered by `handler`.
    pub fn new(handler: Handler) -> Arc<Self> {
        Arc::new(Commands(std::sync::RwLock::new(handler)))
    }

    /// From now on, `handler` answers.
    pub fn replace(&self, handler: Handler) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }

    /// The answer to `word`, `None` if unknown.
    pub fn answer(&self, word: &str) -> Option<String> {
        let h = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        h(word)
    }
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Commands")
    }
}

/// Serves `log` to console clients on `addr`; `commands` answers command
/// words such as `status`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    log: Arc<ConsoleLog>,
    commands: Arc<Commands>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(%bound, "console service listening");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let (log, commands) = (log.clone(), commands.clone());
            tokio::spawn(async move {
                if let Err(e) = client(stream, log, commands).await {
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
    commands: Arc<Commands>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd.take(64)).read_line(&mut line).await?;
    let req = line.trim();
    let Ok(mut at) = req.parse::<u64>() else {
        let answer = commands.answer(req).unwrap_or_else(|| {
            format!("error: unknown request '{req}': send a console offset (a number), 'status' or 'takeover'")
        });
        wr.write_all(format!("{answer}\n").as_bytes()).await?;
        return Ok(());
    };
    loop {
        match log.read_wait(at, 64 << 10).await {
            Read::Bytes(b) => {
                wr.write_all(&b).await?;
                at += b.len() as u64;
            }
            Read::Gone { oldest } => {
                wr.write_all(
                    format!("error: offset {at} is older than the oldest kept, {oldest}\n")
                        .as_bytes(),
                )
                .await?;
                return Ok(());
            }
            Read::Future { end } => {
                wr.write_all(
                    format!("error: offset {at} is beyond the end of the stream, {end}\n")
                        .as_bytes(),
                )
                .await?;
                return Ok(());
            }
            Read::Closed | Read::Wait => return Ok(()),
        }
    }
}

/// Sends a command word (`status`, `takeover`) to a daemon's console service
/// and returns its one-line answer.
pub async fn command(addr: SocketAddr, word: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("{word}\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.trim().to_string())
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
        log.close();
        assert_eq!(log.read(111, 10), Read::Closed);
    }
}
