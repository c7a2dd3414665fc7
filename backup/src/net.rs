//! The backup's network shell: accepts the primary, reads its checkpoints
//! and heartbeats, acks what is committed, and reports each session's end
//! to the core. A node that has taken over refuses every session: with
//! [`EndReason::AlreadyTakenOver`], which fences it, a primary whose token
//! is not newer than its own.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use node::console::ConsoleLog;
use node::ha::BackupInput;
use protocol::beat::{Beat, BeatWindow};
use protocol::{EndReason, Event, Limits, Message, Receiver};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use transport::lossy::{DatagramSender, LinkFaults};
use transport::{Link, Listener, TransportError};

use crate::replica::{BeatIn, Shared};

/// Accepts primaries until the listener closes. One session at a time: a
/// new connection from the primary ends the current session first (the
/// primary gave up on it; its close may have been lost while this node was
/// paused, and waiting for the connection's idle timeout would leave the
/// pair unprotected for seconds).
pub(crate) async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    log: Arc<ConsoleLog>,
    limits: Limits,
) {
    let mut current: Option<(transport::Closer, tokio::task::JoinHandle<()>)> = None;
    loop {
        let link = match listener.accept().await {
            Ok(l) => l,
            Err(TransportError::Closed) => return,
            Err(e) => {
                // Refused peers are logged by the transport; keep listening.
                warn!("{e}");
                continue;
            }
        };
        if let Some((closer, task)) = current.take() {
            closer.close(&EndReason::Local(
                "a new connection from the primary replaces this session".into(),
            ));
            let mut task = task;
            if tokio::time::timeout(std::time::Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        shared.heard();
        let closer = link.closer();
        let task = tokio::spawn(run_session(
            link,
            shared.clone(),
            log.clone(),
            limits.clone(),
        ));
        current = Some((closer, task));
    }
}

/// One session and its bookkeeping.
async fn run_session(link: Link, shared: Arc<Shared>, log: Arc<ConsoleLog>, limits: Limits) {
    let peer = link.remote();
    *shared.closer.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.closer());
    shared.connected.store(true, Ordering::Relaxed);
    let why = session(link, &shared, &log, limits).await;
    shared.connected.store(false, Ordering::Relaxed);
    shared.protocol.store(0, Ordering::Relaxed);
    *shared.closer.lock().unwrap_or_else(|e| e.into_inner()) = None;
    shared.core().on(BackupInput::SessionEnded {
        reason: why.clone(),
    });
    warn!(%peer, "session with the primary ended: {why}");
}

/// One session: the primary's checkpoints committed and acked, its
/// heartbeats echoed, until it ends. A goodbye on the control stream stands
/// the backup down at once, but ends the session only once the epoch it
/// names is committed (the goodbye can overtake checkpoints still on the
/// data stream), or when the data stream ends.
async fn session(
    mut link: Link,
    shared: &Arc<Shared>,
    log: &Arc<ConsoleLog>,
    limits: Limits,
) -> EndReason {
    let mut data = link.data_rx.take().expect("backup link has a data stream");
    let primary_ip = link.remote().ip();
    let faults = link.faults();
    let certificate = link.closer();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    // The goodbye, from the control stream to the data path's receiver.
    let (bye_tx, mut bye_rx) = mpsc::unbounded_channel::<Message>();
    let mut rx = Receiver::with_limits(limits);
    let (ctl_tx, ctl_rx) = (&mut link.ctl_tx, &mut link.ctl_rx);
    let control = async {
        loop {
            tokio::select! {
                a = ack_rx.recv() => match a {
                    Some(f) => if let Err(e) = ctl_tx.send(&f).await { return e.end_reason() },
                    None => return EndReason::Local("session over".into()),
                },
                m = ctl_rx.next() => match m {
                    Ok(Some(Message::Heartbeat { seq, sent_us })) => {
                        shared.heard();
                        if let Err(e) = ctl_tx.send_message(&Message::HeartbeatEcho { seq, sent_us }).await {
                            return e.end_reason();
                        }
                    }
                    Ok(Some(m @ Message::Goodbye { .. })) => {
                        // The primary keeps heartbeating until this session
                        // ends; the data path decides when.
                        shared.heard();
                        let _ = bye_tx.send(m);
                    }
                    Ok(Some(_)) => shared.heard(),
                    Ok(None) => return EndReason::Broken("the primary closed the control stream".into()),
                    Err(e) => return e.end_reason(),
                },
            }
        }
    };
    let receive = async {
        let mut _beats: Option<AbortOnDrop> = None;
        let mut data_open = true;
        // The content of the epoch being staged so far, for the reason of
        // a refusal (the receiver names only its limit).
        let mut staged = 0usize;
        loop {
            let m = tokio::select! {
                m = data.next(), if data_open => match m {
                    Ok(Some(m)) => m,
                    Ok(None) if rx.goodbye().is_some() => {
                        // Everything the primary sent was read: a half-sent
                        // epoch (if any) is discarded.
                        return EndReason::Goodbye(rx.goodbye().unwrap_or_default().to_string());
                    }
                    Ok(None) => {
                        // A finished data stream without a goodbye yet: the
                        // goodbye may still be on the control stream.
                        data_open = false;
                        continue;
                    }
                    Err(e) => return e.end_reason(),
                },
                Some(bye) = bye_rx.recv() => {
                    if rx.hello().is_none() {
                        // A goodbye before the hello: nothing to wait for.
                        let Message::Goodbye { reason, .. } = bye else { unreachable!() };
                        return EndReason::Goodbye(reason);
                    }
                    bye
                }
            };
            shared.heard();
            match &m {
                Message::EpochStart { .. } => staged = 0,
                Message::Records { data, .. }
                | Message::State { data, .. }
                | Message::Output { data, .. }
                | Message::Disk { data, .. } => staged = staged.saturating_add(data.len()),
                _ => {}
            }
            match rx.on_message(m) {
                Ok(Event::Hello(h)) => {
                    // The answer to a hello of version 6 or more goes first,
                    // before any refusal below: the primary then knows this
                    // backup negotiates (see protocol::version).
                    if let Some(a) = rx.answer() {
                        let _ = ack_tx.send(a.to_frame());
                    }
                    let version = rx.version().unwrap_or(protocol::version::V5);
                    shared.protocol.store(version, Ordering::Relaxed);
                    // The receiver checked the name against the one the TLS
                    // layer pinned; check it against the certificate itself.
                    if !certificate.peer_is_named(&h.node) {
                        let why = EndReason::Incompatible(format!(
                            "the hello names node '{}', but the peer's certificate is not valid for that name",
                            h.node
                        ));
                        warn!("refusing the session: {why}");
                        return why;
                    }
                    info!(node = %h.node, session = h.session, protocol = version, memory_mib = h.memory_bytes >> 20, vcpus = h.vcpus, mode = %h.mode, staging_limit_mib = rx.max_epoch_bytes() >> 20, "new session");
                    match shared.start_session(&h, shared.image.as_ref()) {
                        Err(why) => {
                            warn!(token = h.token, "refusing the session: {why}");
                            return why;
                        }
                        Ok((answer, reuse)) => {
                            if reuse.offered_pages == 0 && protocol::reuse::asks(h.capabilities) {
                                info!("no image to offer ({}): a full resync", reuse.why_not);
                            }
                            for m in answer {
                                let _ = ack_tx.send(m.to_frame());
                            }
                        }
                    }
                    if h.beat_port != 0 {
                        let to = std::net::SocketAddr::new(primary_ip, h.beat_port);
                        _beats = Some(AbortOnDrop(tokio::spawn(beats(
                            shared.clone(),
                            to,
                            h.beat_key,
                            faults,
                        ))));
                    }
                    log.reset(h.output_offset);
                }
                Ok(Event::Checkpoint(c)) => {
                    // Applying can take a while (a full resync): off the
                    // runtime, so heartbeats keep being read meanwhile.
                    let epoch = c.epoch;
                    let (sh, lg) = (shared.clone(), log.clone());
                    match tokio::task::spawn_blocking(move || sh.commit(&lg, &c)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(why)) => {
                            if let EndReason::Refused(r) = &why {
                                shared.refused(r.clone());
                            }
                            return why;
                        }
                        Err(e) => {
                            return EndReason::Refused(format!("applying checkpoint {epoch}: {e}"))
                        }
                    }
                    let _ = ack_tx.send(rx.ack(epoch));
                    if epoch > 1 {
                        // Past the session's resync: protected, not just resynced.
                        shared.refusals_in_a_row.store(0, Ordering::Relaxed);
                    }
                    if let Some(reason) = rx.goodbye_due() {
                        info!(epoch, "the primary's last checkpoint is committed: ending its session (goodbye)");
                        return EndReason::Goodbye(reason.to_string());
                    }
                }
                Ok(Event::Leaving { last_epoch }) => {
                    shared.core().on(BackupInput::Leaving { last_epoch });
                    info!(
                        last_epoch,
                        committed = rx.last_committed(),
                        "the primary is stopping: standing down; committing its last checkpoints first"
                    );
                    if !data_open {
                        return EndReason::Goodbye(rx.goodbye().unwrap_or_default().to_string());
                    }
                }
                Ok(Event::Goodbye(reason)) => {
                    shared.core().on(BackupInput::Leaving {
                        last_epoch: rx.last_committed(),
                    });
                    return EndReason::Goodbye(reason);
                }
                Ok(_) => {}
                Err(protocol::ProtocolError::EpochTooLarge { limit }) => {
                    // Nothing of the epoch reached the replica: it stays at
                    // the last committed checkpoint, the one a takeover uses.
                    let (epoch, committed) = (rx.in_epoch().unwrap_or(0), rx.last_committed());
                    let n = shared.refusals_in_a_row.load(Ordering::Relaxed) + 1;
                    let why = format!(
                        "checkpoint {epoch} is larger than this backup's staging limit: {staged} bytes staged and more coming, the limit is {limit} bytes (--max-epoch-bytes); the checkpoint is refused whole, the replica stays {}{}",
                        if committed == 0 {
                            "at no checkpoint of this session (nothing committed: no takeover from it)".to_string()
                        } else {
                            format!("at checkpoint {committed}, the last committed")
                        },
                        if n >= CANNOT_PROTECT_AFTER {
                            format!(
                                "; {n} checkpoints refused in a row: this backup cannot protect this guest with this limit (raise --max-epoch-bytes above the guest's checkpoints)"
                            )
                        } else {
                            String::new()
                        }
                    );
                    error!("refusing the primary's session: {why}");
                    shared.refused(why.clone());
                    return EndReason::Refused(why);
                }
                Err(e) => {
                    let why = EndReason::for_protocol_error(&e);
                    error!("refusing the primary's session: {why}");
                    if let EndReason::Refused(r) = &why {
                        shared.refused(r.clone());
                    }
                    return why;
                }
            }
        }
    };
    let why = tokio::select! {
        w = control => w,
        w = receive => w,
    };
    link.close(&why);
    why
}

/// Refusals in a row (no checkpoint committed between them) after which
/// the backup says it cannot protect the guest with its staging limit.
const CANNOT_PROTECT_AFTER: u64 = 3;

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The backup's end of the heartbeat path ([`protocol::beat`]): a datagram
/// to the primary every [`BEAT_PERIOD`] from a socket of its own, and the
/// primary's datagrams, each proof that it is alive. The watchdog reads the
/// same socket too (`Shared::beat_in`): when this runtime is busy
/// (decrypting and applying a large checkpoint on a small host), the
/// primary's heartbeats wait unread in the socket, and a detector that
/// only looked here would find a live primary silent. Its sends meet the
/// link's faults (`--link-faults`), if any.
async fn beats(
    shared: Arc<Shared>,
    primary: std::net::SocketAddr,
    key: [u8; 32],
    faults: LinkFaults,
) {
    let bound = std::net::UdpSocket::bind(transport::any_addr_for(primary)).and_then(|s| {
        s.set_nonblocking(true)?;
        let watchdog = s.try_clone()?;
        let impaired = if faults.is_active() {
            Some(DatagramSender::new(s.try_clone()?, &faults, "heartbeats"))
        } else {
            None
        };
        Ok((tokio::net::UdpSocket::from_std(s)?, watchdog, impaired))
    });
    let (sock, watchdog, impaired) = match bound {
        Ok(s) => s,
        Err(e) => {
            warn!("no heartbeat path ({e}); heartbeats on the connection only");
            return;
        }
    };
    let window = Arc::new(std::sync::Mutex::new(BeatWindow::default()));
    let beat_in = BeatIn {
        sock: watchdog,
        key,
        primary,
        window,
    };
    let _published = Published::new(&shared, beat_in);
    let t0 = std::time::Instant::now();
    let mut tick = tokio::time::interval(BEAT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut seq, mut buf) = (0u64, [0u8; 64]);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let b = Beat { seq, sent_us: t0.elapsed().as_micros() as u64 };
                let beat = b.seal(&key);
                let _ = match &impaired {
                    Some(tx) => tx.send_to(&beat, primary),
                    None => sock.try_send_to(&beat, primary).map(drop),
                };
            }
            r = sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let fresh = shared
                        .beat_in
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .is_some_and(|b| b.accept(&buf[..n], from));
                    if fresh {
                        shared.heard_beat();
                    }
                }
            }
        }
    }
}

/// The session's heartbeat path published for the watchdog, withdrawn
/// when the heartbeat task ends (the session's end aborts it).
struct Published(Arc<Shared>);

impl Published {
    fn new(shared: &Arc<Shared>, b: BeatIn) -> Published {
        *shared.beat_in.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
        Published(shared.clone())
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        *self.0.beat_in.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The backup's heartbeat period on the heartbeat path.
const BEAT_PERIOD: std::time::Duration = std::time::Duration::from_millis(5);
