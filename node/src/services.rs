//! What a running castor node holds whatever its role: the network
//! runtime, the guest's console log and its service, and the command words
//! the service answers. A backup that takes over keeps all three and hands
//! them to the primary role.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::info;

use crate::console::{self, Commands, ConsoleLog, Handler};

/// A node's shared services.
#[derive(Debug)]
pub struct Services {
    /// The network runtime (QUIC, the console service, timers).
    pub rt: tokio::runtime::Runtime,
    /// The guest's console stream.
    pub log: Arc<ConsoleLog>,
    /// The command words the console service answers.
    pub commands: Arc<Commands>,
    /// Where the console service listens.
    pub console: SocketAddr,
}

impl Services {
    /// Starts the runtime (`threads` named `name`, each running
    /// `on_thread_start` first, e.g. to raise its priority) and the console
    /// service on `console`, answering `handler` until a role replaces it.
    pub fn start(
        name: &str,
        console: SocketAddr,
        handler: Handler,
        on_thread_start: fn(),
    ) -> std::io::Result<Services> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name(name)
            .on_thread_start(on_thread_start)
            .build()?;
        let log = ConsoleLog::new(0);
        let commands = Commands::new(handler);
        let console = rt.block_on(console::serve(console, log.clone(), commands.clone()))?;
        info!(%console, "console service");
        Ok(Services {
            rt,
            log,
            commands,
            console,
        })
    }
}
