//! Prometheus metrics of a node, served as OpenMetrics text over HTTP when
//! `--metrics ADDR` is given (off by default).
//!
//! Histograms and counters are recorded where things happen (the primary's
//! epoch loop, a takeover); gauges (role, protected, console offsets, the
//! replica's epoch) are read from the node's [`Status`] at each scrape, so
//! they cannot disagree with `castor status`.
//!
//! The encoding is the `prometheus-client` crate's (the Prometheus project's
//! own Rust client): OpenMetrics text, which Prometheus scrapes natively.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info};

use crate::control::{Control, Request, Response};
use crate::status::{Role, Status};

type Labels = Vec<(String, String)>;

/// A node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The guest's pause per epoch, seconds.
    pub pause: Histogram,
    /// Checkpoint sent → acked, seconds.
    pub ack: Histogram,
    /// Checkpoint bytes sent.
    pub checkpoint_bytes: Counter,
    /// Dirty pages checkpointed.
    pub dirty_pages: Counter,
    /// Epochs checkpointed.
    pub epochs: Counter,
    /// Takeovers by this node.
    pub takeovers: Counter,
    /// Sessions refused from a primary this node had taken over from: the
    /// old primary was alive (a pause, a partition, or a false alarm), and
    /// the witness made the takeover safe.
    pub false_takeovers: Counter,
    role: Family<Labels, Gauge>,
    protected: Gauge,
    console_released: Gauge,
    console_end: Gauge,
    committed_epoch: Gauge,
    verify_mismatches: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registered, empty metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("castor");
        // 50 µs .. ~1.6 s, doubling.
        let pause = Histogram::new(exponential_buckets(50e-6, 2.0, 16));
        let ack = Histogram::new(exponential_buckets(50e-6, 2.0, 16));
        let m = Metrics {
            pause,
            ack,
            checkpoint_bytes: Counter::default(),
            dirty_pages: Counter::default(),
            epochs: Counter::default(),
            takeovers: Counter::default(),
            false_takeovers: Counter::default(),
            role: Family::default(),
            protected: Gauge::default(),
            console_released: Gauge::default(),
            console_end: Gauge::default(),
            committed_epoch: Gauge::default(),
            verify_mismatches: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "pause_seconds",
            "The guest's pause per epoch",
            m.pause.clone(),
        );
        registry.register(
            "ack_seconds",
            "Checkpoint sent to acked by the backup",
            m.ack.clone(),
        );
        registry.register(
            "checkpoint_bytes",
            "Checkpoint bytes sent to the backup",
            m.checkpoint_bytes.clone(),
        );
        registry.register(
            "dirty_pages",
            "Dirty guest pages checkpointed",
            m.dirty_pages.clone(),
        );
        registry.register("epochs", "Epochs checkpointed", m.epochs.clone());
        registry.register("takeovers", "Takeovers by this node", m.takeovers.clone());
        registry.register(
            "false_takeovers",
            "Sessions refused from a primary this node had taken over from (it was alive: a pause, a partition or a false alarm; the witness fenced it)",
            m.false_takeovers.clone(),
        );
        registry.register(
            "role",
            "1 for the node's role (primary, backup, taken_over)",
            m.role.clone(),
        );
        registry.register(
            "protected",
            "1 when a backup holds a committed checkpoint of the guest this node runs",
            m.protected.clone(),
        );
        registry.register(
            "console_released_bytes",
            "Console bytes visible to clients",
            m.console_released.clone(),
        );
        registry.register(
            "console_end_bytes",
            "Console bytes the node has, released or held",
            m.console_end.clone(),
        );
        registry.register(
            "committed_epoch",
            "The replica's committed epoch (a backup)",
            m.committed_epoch.clone(),
        );
        registry.register(
            "verify_mismatches",
            "Replica digests that did not match the primary's (a backup)",
            m.verify_mismatches.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records one epoch's pause, bytes and dirty pages.
    pub fn epoch(&self, pause: Duration, bytes: u64, dirty_pages: u64) {
        self.pause.observe(pause.as_secs_f64());
        self.checkpoint_bytes.inc_by(bytes);
        self.dirty_pages.inc_by(dirty_pages);
        self.epochs.inc();
    }

    /// The text a scrape returns, with gauges from `status`.
    pub fn render(&self, status: Option<&Status>) -> String {
        if let Some(s) = status {
            for (role, name) in [
                (Role::Primary, "primary"),
                (Role::Backup, "backup"),
                (Role::TakenOver, "taken_over"),
            ] {
                self.role
                    .get_or_create(&vec![("role".to_string(), name.to_string())])
                    .set(i64::from(s.role == role));
            }
            let protected = s.primary.as_ref().is_some_and(|p| p.protected);
            self.protected.set(i64::from(protected));
            self.console_released.set(s.console_released as i64);
            self.console_end.set(s.console_end as i64);
            if let Some(b) = &s.backup {
                self.committed_epoch.set(b.committed_epoch as i64);
                self.verify_mismatches.set(b.verify_mismatches as i64);
            }
        }
        let mut out = String::new();
        // Writing into a String does not fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// HTTP connections served at once.
const MAX_SCRAPERS: usize = 16;

/// Serves `metrics` at `http://ADDR/metrics`, with gauges from `control`'s
/// status. Returns the bound address. Must run inside a tokio runtime.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(%bound, "metrics at http://{bound}/metrics");
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    crate::accept_failed("metrics", e).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (metrics, control) = (metrics.clone(), control.clone());
            tokio::spawn(async move {
                let r =
                    tokio::time::timeout(Duration::from_secs(10), scrape(stream, metrics, control))
                        .await;
                if let Ok(Err(e)) = r {
                    debug!("metrics client: {e}");
                }
                drop(slot);
            });
        }
    });
    Ok(bound)
}

async fn scrape(
    mut stream: TcpStream,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
) -> std::io::Result<()> {
    // The request head, up to its blank line (8 KiB at most).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let ok = first.starts_with(b"GET /metrics ") || first.starts_with(b"GET / ");
    let (status, ctype, body) = if ok {
        let answer = tokio::task::spawn_blocking(move || control.answer(&Request::Status))
            .await
            .ok();
        let status = match answer {
            Some(Response::Status(s)) => Some(*s),
            _ => None,
        };
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(status.as_ref()),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "castor serves GET /metrics\n".to_string(),
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histograms_counters_and_status_gauges() {
        let m = Metrics::new();
        m.epoch(Duration::from_micros(800), 4096, 3);
        m.ack.observe(0.002);
        m.takeovers.inc();
        let s = Status {
            role: Role::TakenOver,
            console_released: 10,
            console_end: 12,
            resumed_at: Some(4),
            primary: Some(crate::PrimaryStatus {
                protected: true,
                ..Default::default()
            }),
            backup: None,
        };
        let text = m.render(Some(&s));
        for want in [
            "castor_pause_seconds_count 1",
            "castor_checkpoint_bytes_total 4096",
            "castor_dirty_pages_total 3",
            "castor_takeovers_total 1",
            "castor_false_takeovers_total 0",
            "castor_role{role=\"taken_over\"} 1",
            "castor_role{role=\"backup\"} 0",
            "castor_protected 1",
            "castor_console_released_bytes 10",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
