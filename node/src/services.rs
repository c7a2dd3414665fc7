//! What a running castor node holds whatever its role: the network
//! runtime, the guest's console log and its service, the control socket
//! with the handler that answers it, and the metrics. A backup that takes
//! over keeps them all and hands them to the primary role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::info;

use crate::console::{self, ConsoleLog};
use crate::control::{self, Control, Handler};
use crate::metrics::{self, Metrics};

/// Where a node's services listen.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The console service (TCP; console bytes only).
    pub console: SocketAddr,
    /// The control socket (Unix, owner only).
    pub control: PathBuf,
    /// The Prometheus endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Bytes of released console history kept (see [`ConsoleLog`]).
    pub console_keep: usize,
}

/// A node's shared services.
#[derive(Debug)]
pub struct Services {
    /// The network runtime (QUIC, the console service, timers).
    pub rt: tokio::runtime::Runtime,
    /// The guest's console stream.
    pub log: Arc<ConsoleLog>,
    /// What answers control requests.
    pub control: Arc<Control>,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Where the console service listens.
    pub console: SocketAddr,
    /// The control socket (removed when the services go).
    pub control_socket: control::Bound,
    /// Where the metrics are served, if they are.
    pub metrics_addr: Option<SocketAddr>,
}

/// Why the services did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// The runtime or a listener.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The control socket.
    #[error(transparent)]
    Control(#[from] control::ControlError),
}

impl Services {
    /// Starts the runtime (`threads` named `name`, each running
    /// `on_thread_start` first, e.g. to raise its priority), the console
    /// service, the control socket answered by `handler` until a role
    /// replaces it, and the metrics endpoint if asked for.
    pub fn start(
        name: &str,
        at: &Endpoints,
        handler: Handler,
        on_thread_start: fn(),
    ) -> Result<Services, ServicesError> {
        let io = |what: String| move |source| ServicesError::Io { what, source };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name(name)
            .on_thread_start(on_thread_start)
            .build()
            .map_err(io("starting the network runtime".into()))?;
        let log = ConsoleLog::with_capacity(0, at.console_keep);
        let control = Control::new(handler);
        let metrics = Arc::new(Metrics::new());
        let console = rt
            .block_on(console::serve(at.console, log.clone()))
            .map_err(io(format!("console service on {}", at.console)))?;
        info!(%console, "console service");
        let control_socket = rt.block_on(async { control::serve(&at.control, control.clone()) })?;
        let metrics_addr = match at.metrics {
            Some(addr) => Some(
                rt.block_on(metrics::serve(addr, metrics.clone(), control.clone()))
                    .map_err(io(format!("metrics endpoint on {addr}")))?,
            ),
            None => None,
        };
        Ok(Services {
            rt,
            log,
            control,
            metrics,
            console,
            control_socket,
            metrics_addr,
        })
    }
}
