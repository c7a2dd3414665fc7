//! The control service: `status`, `takeover` and `reset` as typed JSON on a
//! local Unix socket that only the daemon's own user may use.
//!
//! Like Firecracker's API socket, control is local and guarded by the file
//! system: the socket is created mode 0600 (in a directory the daemon makes
//! 0700 when it makes it), and every connection's peer credentials are
//! checked as well, so a request from another user is refused even if the
//! socket's mode was widened by hand. A request is one line of JSON
//! ([`Request`]), the answer one line of JSON ([`Response`]); the connection
//! then ends. The console port (see [`crate::console`]) only streams the
//! guest's console and takes no commands.
//!
//! Requests are answered off the network runtime (a status takes the
//! replica's lock, which a checkpoint being applied may hold for a while),
//! at most [`MAX_CLIENTS`] at a time, each with [`TIMEOUT`] to send its line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::status::Status;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The node's [`Status`].
    Status,
    /// A backup takes over now (a planned switchover or an operator's call).
    Takeover,
    /// A primary forgets its figures so far (a benchmark's warm-up).
    Reset,
    /// A primary moves its guest, running, to another node (`castor
    /// migrate`); answered when the guest runs there, or with why not.
    Migrate(MigrateRequest),
    /// A primary protects its guest toward this backup from now on (a
    /// fleet's agent, after the old backup was lost or moved): the current
    /// session, if any, ends with a goodbye (that backup stands down), and
    /// a new one starts toward `to`. Asking for the backup it already has
    /// changes nothing.
    Protect(ProtectRequest),
    /// To a host's agent (`castor agent`): pass `request` on to the role
    /// it runs for VM `vm` and answer with that role's answer.
    Vm(VmRequest),
}

/// A request for one VM's role, asked of its host's agent ([`Request::Vm`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequest {
    /// The VM.
    pub vm: String,
    /// What to ask its role.
    pub request: Box<Request>,
}

/// The backup a primary is asked to protect its guest toward
/// ([`Request::Protect`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectRequest {
    /// Where the backup listens (UDP, QUIC).
    pub to: std::net::SocketAddr,
    /// The backup's node name: the only name its certificate may carry.
    pub peer: String,
}

/// A live migration asked of a primary ([`Request::Migrate`]).
///
/// The primary first stands its backup down (a goodbye: the backup commits
/// the last checkpoint and will not take over), then moves the guest by
/// pre-copy (or post-copy, if allowed and needed). With a witness, the VM's
/// ownership passes to `dest` at the witness just before the destination
/// runs the guest; a migration that fails before that point leaves the
/// guest running here, protected again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Where the destination listens (`castor migrate-listen`).
    pub to: std::net::SocketAddr,
    /// The destination's node name: its certificate must carry it, and the
    /// witness gives it the VM.
    pub dest: String,
    /// How pages are encoded: `fgbi`, `xbzrle` or `remus`.
    pub mode: String,
    /// fgbi block size.
    pub block_size: u32,
    /// The longest stall allowed, ms.
    pub max_downtime_ms: u64,
    /// Post-copy allowed (a failure of either node during it loses the VM).
    pub postcopy: bool,
    /// Send a digest of all RAM for the destination to check at a
    /// pre-copy switch.
    pub verify: bool,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Memory the encoder may keep about the destination's RAM (`None`:
    /// the guest's RAM size).
    pub budget: Option<u64>,
    /// Emulated link: bytes a second (`None`: unshaped).
    pub link_rate: Option<u64>,
    /// Emulated link: one-way delay, µs.
    pub link_delay_us: u64,
}

/// A control answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The node's status.
    Status(Box<Status>),
    /// Done; what was done.
    Ok(String),
    /// Refused or failed; why.
    Error(String),
}

/// Answers requests; replaced when the node changes role.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// The node's current [`Handler`]: a backup that takes over answers as a
/// primary from then on.
pub struct Control(RwLock<Handler>);

impl Control {
    /// Requests answered by `handler`.
    pub fn new(handler: Handler) -> Arc<Self> {
        Arc::new(Control(RwLock::new(handler)))
    }

    /// From now on, `handler` answers.
    pub fn replace(&self, handler: Handler) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }

    /// The answer to `req`.
    pub fn answer(&self, req: &Request) -> Response {
        let h = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        h(req)
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

/// Connections served at once; more wait in the listen queue.
pub const MAX_CLIENTS: usize = 16;
/// How long a client has to send its request line.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line read.
const MAX_LINE: u64 = 4096;

/// Where a node's control socket is unless `--control` says otherwise.
pub fn default_path(node: &str) -> PathBuf {
    Path::new("/run/castor").join(format!("{node}.sock"))
}

/// Why the control service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process serves this socket.
    #[error("another daemon already answers on the control socket {0}")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; remove it or choose another --control path")]
    NotASocket(PathBuf),
    /// An I/O error, with what was being done.
    #[error("control socket {path}: {what}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// The bound control socket; removes its file when dropped.
#[derive(Debug)]
pub struct Bound {
    path: PathBuf,
}

impl Bound {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `control` on a Unix socket at `path` (mode 0600; the parent
/// directory is made 0700 if it does not exist). A stale socket left by a
/// dead daemon is replaced; a live one is not. Must run inside a tokio
/// runtime.
pub fn serve(path: &Path, control: Arc<Control>) -> Result<Bound, ControlError> {
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| ControlError::Io { path, what, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io("making its directory"))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("making its directory private"))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io("removing a stale socket"))?;
        }
        Ok(_) => return Err(ControlError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("making it owner-only"))?;
    let owner = std::fs::metadata(path)
        .map_err(io("reading its owner"))?
        .uid();
    info!(path = %path.display(), "control socket (owner only)");
    tokio::spawn(accept_loop(listener, control, owner));
    Ok(Bound {
        path: path.to_path_buf(),
    })
}

async fn accept_loop(listener: UnixListener, control: Arc<Control>, owner: u32) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                crate::accept_failed("control socket", e).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, control, owner).await {
                debug!("control client: {e}");
            }
            drop(slot);
        });
    }
}

async fn client(mut stream: UnixStream, control: Arc<Control>, owner: u32) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    // The request line first, whoever asks (a refusal sent before it is
    // read could break the client's write).
    let (rd, _) = stream.split();
    let mut line = String::new();
    let mut rd = tokio::io::BufReader::new(rd.take(MAX_LINE));
    let read = tokio::time::timeout(TIMEOUT, rd.read_line(&mut line)).await;
    let answer = if uid != owner && uid != 0 {
        warn!(uid, owner, "control request from another user refused");
        Response::Error(format!(
            "refused: control is for the daemon's own user (uid {owner}), not uid {uid}"
        ))
    } else {
        match read {
            Err(_) => Response::Error(format!("no request within {} s", TIMEOUT.as_secs())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => {
                    debug!(?req, "control request");
                    tokio::task::spawn_blocking(move || control.answer(&req))
                        .await
                        .unwrap_or_else(|e| Response::Error(format!("the request failed: {e}")))
                }
                Err(e) => Response::Error(format!(
                    "bad request {:?}: {e}; send one line of JSON such as {{\"op\":\"status\"}} (ops: status, takeover, reset, migrate)",
                    line.trim()
                )),
            },
        }
    };
    let mut out = serde_json::to_string(&answer).map_err(std::io::Error::other)?;
    out.push('\n');
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// Why a control request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nothing answers at the path.
    #[error("no castor daemon answers on the control socket {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("control socket {path}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The answer was not a [`Response`].
    #[error("control socket {path}: unreadable answer {answer:?}")]
    Answer {
        /// The socket's path.
        path: PathBuf,
        /// What came.
        answer: String,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// Sends `req` to the daemon at `path` and waits (at most `timeout`) for its
/// answer. Blocking: for the command line and the lab.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, RequestError> {
    let io = |source| RequestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| RequestError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    // A daemon may answer (a refusal) and close before reading everything:
    // its answer counts even if this write broke.
    let wrote = s.write_all(line.as_bytes());
    let mut answer = String::new();
    // A status is a few kilobytes; anything far longer is not an answer.
    let read = BufReader::new(std::io::Read::take(s, 1 << 20)).read_line(&mut answer);
    match (wrote, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(io(e)),
        (Ok(()), Ok(_)) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without an answer",
            )))
        }
    }
    serde_json::from_str(answer.trim()).map_err(|source| RequestError::Answer {
        path: path.to_path_buf(),
        answer,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_one_line_of_json() {
        assert_eq!(
            serde_json::to_string(&Request::Takeover).unwrap(),
            r#"{"op":"takeover"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        let r = Response::Error("no".into());
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'));
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
    }

    #[test]
    fn serves_the_owner_and_answers_bad_requests_clearly() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("castor-control-{}", std::process::id()));
        let path = dir.join("sub").join("n.sock");
        let control = Control::new(Arc::new(|r: &Request| match r {
            Request::Reset => Response::Ok("reset".into()),
            _ => Response::Error("not here".into()),
        }));
        let bound = rt
            .block_on(async { serve(&path, control.clone()) })
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the socket is owner-only");
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700, "a directory it made is private");
        let t = Duration::from_secs(5);
        assert_eq!(
            request(&path, &Request::Reset, t).unwrap(),
            Response::Ok("reset".into())
        );
        // A second daemon on the same socket is refused while this one lives.
        let again = rt.block_on(async { serve(&path, control.clone()) });
        assert!(matches!(again, Err(ControlError::InUse(_))), "{again:?}");
        // Garbage gets an error naming what is expected.
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"takeover\n").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        let r: Response = serde_json::from_str(answer.trim()).unwrap();
        assert!(
            matches!(&r, Response::Error(e) if e.contains(r#"{"op":"status"}"#)),
            "{r:?}"
        );
        drop(bound);
        assert!(!path.exists(), "the socket is removed with the service");
        // A stale socket file (no one answers) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        let bound = rt.block_on(async { serve(&path, control) }).unwrap();
        assert_eq!(
            request(&path, &Request::Reset, t).unwrap(),
            Response::Ok("reset".into())
        );
        drop(bound);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
