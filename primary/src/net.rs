//! The primary's network shell: connects (and reconnects) to the backup,
//! moves checkpoint frames out and acks in, heartbeats, and reports how
//! each session ended. It decides nothing: the epoch loop's
//! [`node::ha::PrimaryCore`] does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::beat::{Beat, BeatWindow};
use protocol::{EndReason, Message};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use transport::link::{DelayLine, Pacer, PIECE};
use transport::Link;

use crate::Config;

/// What the network tells the epoch loop.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// A backup is connected: a new session.
    Connected,
    /// The backup committed up to this epoch.
    Ack(u64),
    /// The session ended.
    Ended(EndReason),
    /// The witness answered a claim.
    Claimed(node::ha::Claim),
    /// Part of the backup's answer to the hello's reuse request
    /// ([`Message::Reuse`], [`Message::Digests`], [`Message::DiskDigests`]).
    Offer(Message),
    /// A control request: move the guest to another node (not from the
    /// network task: the control service puts it in the same queue).
    Migrate(Box<crate::migration::Order>),
    /// A control request: protect toward another backup.
    Protect(Box<crate::retarget::Order>),
}

/// The network task of one stretch of protection: spawned when the role
/// starts, stopped (with a goodbye) when it ends or the guest migrates, and
/// spawned again when a migration fails and the guest stays.
pub(crate) struct NetTask {
    handle: tokio::task::JoinHandle<()>,
    stop: Arc<AtomicBool>,
    /// The epoch loop's last word, for the goodbye.
    pub farewell: Farewell,
    beats: Option<std::thread::JoinHandle<()>>,
    beats_stop: Arc<AtomicBool>,
}

impl Drop for NetTask {
    fn drop(&mut self) {
        self.beats_stop.store(true, Ordering::Relaxed);
    }
}

/// How long the epoch loop may go without a sign of progress
/// ([`Alive::touch`]) before the heartbeat thread stops beating: a wedged
/// primary is then taken over. Longer than anything the loop does at once
/// (a full resync of a large guest and disk: a few seconds).
pub(crate) const PROGRESS_LIMIT: Duration = Duration::from_secs(5);

/// The epoch loop's sign of life for the heartbeat thread.
#[derive(Debug)]
pub(crate) struct Alive {
    t0: Instant,
    last_ms: AtomicU64,
}

impl Alive {
    pub fn new() -> Arc<Alive> {
        Arc::new(Alive {
            t0: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    /// The epoch loop is making progress.
    pub fn touch(&self) {
        self.last_ms
            .store(self.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn fresh(&self) -> bool {
        let now = self.t0.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_ms.load(Ordering::Relaxed)) < PROGRESS_LIMIT.as_millis() as u64
    }
}

/// Where the heartbeat thread sends: the backup's heartbeat address while a
/// session knows it.
type BeatPeer = Arc<std::sync::Mutex<Option<SocketAddr>>>;

/// The primary's heartbeat datagrams, every `period`, from a thread of their
/// own at real-time priority: nothing the network task does — pushing a
/// large checkpoint, encrypting at line rate on a busy runtime — can delay
/// them (a delayed beat is a false takeover: the backup's detector waits
/// 30 ms). They stop when the epoch loop stops making progress
/// ([`PROGRESS_LIMIT`]), so a wedged primary is still taken over.
fn beat_thread(
    sock: transport::lossy::DatagramSender,
    key: [u8; 32],
    period: Duration,
    peer: BeatPeer,
    alive: Arc<Alive>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("castor-beat".into())
        .spawn(move || {
            let _ = vmm::set_current_thread_realtime(vmm::priority::LIVENESS);
            let t0 = Instant::now();
            let mut seq = 0u64;
            let mut stale = false;
            let mut stalls = node::stall::StallWatch::new();
            while !stop.load(Ordering::Relaxed) {
                let slept = Instant::now();
                std::thread::sleep(period);
                let slept = slept.elapsed();
                // The beat first: a late one is the one that matters, and
                // the stall's report (a file read, a log write that may
                // block) waits until it is out.
                let to = *peer.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(to) = to {
                    if alive.fresh() {
                        stale = false;
                        seq += 1;
                        let b = Beat {
                            seq,
                            sent_us: t0.elapsed().as_micros() as u64,
                        };
                        let _ = sock.send_to(&b.seal(&key), to);
                    } else if !stale {
                        warn!(
                            "the epoch loop made no progress for {} s: heartbeats stop, so the backup takes over",
                            PROGRESS_LIMIT.as_secs()
                        );
                        stale = true;
                    }
                }
                if let Some(s) = stalls.woke(slept, period) {
                    s.log("the heartbeat thread");
                }
            }
        })
}

/// What the epoch loop keeps of a network task: where checkpoints go, and
/// the heartbeat path's port and key for its hellos.
pub(crate) struct NetEnds {
    /// The queue to the network task.
    pub out: mpsc::Sender<Outgoing>,
    /// The heartbeat socket's port and key.
    pub beat: (u16, [u8; 32]),
}

impl NetTask {
    /// Binds a heartbeat socket and starts connecting to `backup` on `rt`;
    /// the sessions' events go to `events`.
    pub fn spawn(
        cfg: &Config,
        backup: SocketAddr,
        rt: &tokio::runtime::Handle,
        events: std_mpsc::Sender<NetEvent>,
        alive: Arc<Alive>,
    ) -> Result<(NetTask, NetEnds), crate::PrimaryError> {
        use crate::PrimaryError;
        let any = transport::any_addr_for(backup);
        let sock = std::net::UdpSocket::bind(any).map_err(PrimaryError::Beat)?;
        sock.set_nonblocking(true).map_err(PrimaryError::Beat)?;
        let beat = (
            sock.local_addr().map_err(PrimaryError::Beat)?.port(),
            rand::random(),
        );
        let peer: BeatPeer = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let beats_stop = Arc::new(AtomicBool::new(false));
        let beats = beat_thread(
            // Through the link's faults, if any (`--link-faults`).
            transport::lossy::DatagramSender::new(
                sock.try_clone().map_err(PrimaryError::Beat)?,
                &cfg.link_faults,
                "heartbeats",
            ),
            beat.1,
            cfg.heartbeat,
            peer.clone(),
            alive,
            beats_stop.clone(),
        )
        .map_err(PrimaryError::Beat)?;
        let path = BeatPath {
            sock,
            key: beat.1,
            peer,
        };
        let (out, out_rx) = mpsc::channel(cfg.max_in_flight.max(1) + 1);
        let farewell = Farewell::new();
        let handle = rt.spawn(run(
            cfg.clone(),
            backup,
            path,
            out_rx,
            events,
            stop.clone(),
            farewell.clone(),
        ));
        Ok((
            NetTask {
                handle,
                stop,
                farewell,
                beats: Some(beats),
                beats_stop,
            },
            NetEnds { out, beat },
        ))
    }

    /// A planned stop: once the epoch loop has queued its goodbye (see
    /// [`crate::epoch::EpochLoop::end_protection`]), waits for the session to end
    /// — the backup commits the last checkpoint and stands down — at most
    /// [`GOODBYE_WAIT`] and a little; then the task is dropped.
    pub fn finish(mut self, rt: &tokio::runtime::Handle) {
        self.stop.store(true, Ordering::Relaxed);
        let wait = GOODBYE_WAIT + Duration::from_millis(500);
        let h = &mut self.handle;
        if rt
            .block_on(async move { tokio::time::timeout(wait, h).await })
            .is_err()
        {
            // Still connecting to a backup that does not answer.
            self.handle.abort();
        }
        self.beats_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.beats.take() {
            let _ = t.join();
        }
    }

    /// Tells the task a planned stop has begun (it then sends the goodbye
    /// as soon as the farewell is set).
    pub fn stopping(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the epoch loop tells the network.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A new session's first frames (its hello).
    Hello(Vec<u8>),
    /// Frames of the current session, in order.
    Frames(Vec<u8>),
    /// End the current session with this reason.
    End(EndReason),
    /// A planned stop, behind the session's last frames: finish the data
    /// stream (the backup reads its end once it has everything). The
    /// goodbye itself goes on the control stream at once ([`Farewell`]).
    Goodbye {
        /// The last epoch queued in this session (0: none).
        last_epoch: u64,
    },
}

/// The epoch loop's last word on a planned stop: the last epoch it queued
/// ([`Farewell::NONE`] until it has stopped). The network task sends the
/// goodbye naming it on the control stream as soon as it is set — it may
/// overtake those checkpoints, and the backup waits for them — and keeps
/// the session (and heartbeats) until the backup ends it, or
/// [`GOODBYE_WAIT`] passes.
#[derive(Debug, Clone)]
pub(crate) struct Farewell(Arc<AtomicU64>);

impl Farewell {
    const NONE: u64 = u64::MAX;

    /// Not stopped yet.
    pub fn new() -> Farewell {
        Farewell(Arc::new(AtomicU64::new(Self::NONE)))
    }

    /// The epoch loop stopped after queuing `last_epoch`.
    pub fn set(&self, last_epoch: u64) {
        self.0.store(last_epoch, Ordering::Release);
    }

    fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|&e| e != Self::NONE)
    }
}

/// How long a stopping primary waits for its backup to commit its last
/// checkpoint and confirm the goodbye, heartbeating meanwhile, before it
/// closes the session anyway (as a goodbye: the backup stands down).
pub(crate) const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// Why a stopping primary's session ends.
const STOPPING: &str = "primary shutting down";

/// How the data stream's writer ended.
enum Written {
    /// Everything before a goodbye naming this epoch is written.
    Goodbye(u64),
    /// The session ended.
    Ended(EndReason),
}

/// The primary's end of the heartbeat path ([`protocol::beat`]).
pub(crate) struct BeatPath {
    /// Its socket (non-blocking).
    pub sock: std::net::UdpSocket,
    /// The key in the hello.
    pub key: [u8; 32],
    /// Where the heartbeat thread sends (set while a session knows it).
    pub peer: BeatPeer,
}

/// Connects to `backup` again and again until `stop`; each session's
/// events go to `events`.
pub(crate) async fn run(
    cfg: Config,
    backup: SocketAddr,
    beat: BeatPath,
    mut out: mpsc::Receiver<Outgoing>,
    events: std_mpsc::Sender<NetEvent>,
    stop: Arc<AtomicBool>,
    farewell: Farewell,
) {
    let key = beat.key;
    let peer = beat.peer;
    let beat = match tokio::net::UdpSocket::from_std(beat.sock) {
        Ok(s) => s,
        Err(e) => {
            let _ = events.send(NetEvent::Ended(EndReason::Local(format!(
                "the heartbeat socket: {e}"
            ))));
            return;
        }
    };
    let mut warned = false;
    let mut backoff = REFUSED_BACKOFF;
    while !stop.load(Ordering::Relaxed) {
        // A handshake to a backup that is not up yet would wait for the
        // connection's idle timeout (10 s): a backup started meanwhile
        // would stay unused that long.
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT,
            transport::connect_impaired(backup, &cfg.tls, &cfg.link_faults),
        );
        let link = match attempt.await.unwrap_or_else(|_| {
            Err(transport::TransportError::Connect {
                addr: backup,
                err: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })
        }) {
            Ok(l) => l,
            Err(e) => {
                if !warned {
                    warn!("cannot reach the backup at {backup}: {e}; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        warned = false;
        info!(backup = %link.remote(), "connected to the backup");
        // Drop what was meant for an earlier session.
        while out.try_recv().is_ok() {}
        if events.send(NetEvent::Connected).is_err() {
            return;
        }
        let path = (&beat, &key, &peer);
        let began = Instant::now();
        let why = session(&cfg, link, path, &mut out, &events, (&stop, &farewell)).await;
        // No beats toward a backup whose session ended.
        *peer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        debug!("session ended: {why}");
        // A backup that refused a session soon after it began will refuse
        // the next one too (a limit, a bad replica): back off, doubling up
        // to REFUSED_BACKOFF_MAX, rather than pause the guest for a full
        // resync into the same refusal every 200 ms.
        let refused = matches!(why, EndReason::Refused(_) | EndReason::Incompatible(_))
            && began.elapsed() < REFUSED_BACKOFF_MAX;
        if events.send(NetEvent::Ended(why)).is_err() {
            return;
        }
        if refused {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(REFUSED_BACKOFF_MAX);
        } else {
            backoff = REFUSED_BACKOFF;
        }
    }
}

/// How long one attempt to connect to the backup may take (a QUIC and TLS
/// handshake: milliseconds on a LAN).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The first wait before connecting again to a backup that refused.
const REFUSED_BACKOFF: Duration = Duration::from_millis(200);
/// The longest.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Writes the data stream: frames as they come, or through the emulated
/// link (held for the one-way delay, then paced to the rate in pieces).
async fn writer(
    cfg: &Config,
    data: &mut transport::FrameWriter,
    out: &mut mpsc::Receiver<Outgoing>,
) -> Written {
    let shape = cfg.link;
    let loop_ended = || Written::Ended(EndReason::Local("the epoch loop ended".into()));
    // A connection starts with a hello: frames and ends queued for an
    // earlier session (the epoch loop had not yet heard that it ended) are
    // dropped, or the backup would read a checkpoint before any hello.
    let mut started = false;
    let mut current = |o: &Outgoing| {
        started |= matches!(o, Outgoing::Hello(_));
        started || matches!(o, Outgoing::Goodbye { .. })
    };
    if !shape.is_shaped() {
        while let Some(o) = out.recv().await {
            if !current(&o) {
                continue;
            }
            match o {
                Outgoing::Hello(f) | Outgoing::Frames(f) => {
                    if let Err(e) = data.send(&f).await {
                        return Written::Ended(e.end_reason());
                    }
                }
                Outgoing::End(r) => return Written::Ended(r),
                Outgoing::Goodbye { last_epoch } => {
                    // Nothing more on this stream: the backup reads its end.
                    let _ = data.0.finish();
                    return Written::Goodbye(last_epoch);
                }
            }
        }
        return loop_ended();
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Outgoing)>();
    let stamper = async move {
        while let Some(o) = out.recv().await {
            if !current(&o) {
                continue;
            }
            if tx
                .send((tokio::time::Instant::now() + shape.delay, o))
                .is_err()
            {
                break;
            }
        }
    };
    let sender = async {
        let mut pacer = Pacer::new(shape.rate_bytes_per_s);
        while let Some((due, o)) = rx.recv().await {
            let f = match o {
                Outgoing::Hello(f) | Outgoing::Frames(f) => f,
                Outgoing::End(r) => return Written::Ended(r),
                Outgoing::Goodbye { last_epoch } => {
                    let _ = data.0.finish();
                    return Written::Goodbye(last_epoch);
                }
            };
            tokio::time::sleep_until(due).await;
            for piece in f.chunks(PIECE) {
                let at = pacer.book(piece.len(), tokio::time::Instant::now());
                tokio::time::sleep_until(at).await;
                if let Err(e) = data.send(piece).await {
                    return Written::Ended(e.end_reason());
                }
            }
        }
        loop_ended()
    };
    tokio::pin!(stamper);
    tokio::pin!(sender);
    tokio::select! {
        why = &mut sender => why,
        _ = &mut stamper => (&mut sender).await,
    }
}

/// One session: data out, heartbeats both ways, acks in. Returns why it ended.
async fn session(
    cfg: &Config,
    mut link: Link,
    (beat, key, peer): (&tokio::net::UdpSocket, &[u8; 32], &BeatPeer),
    out: &mut mpsc::Receiver<Outgoing>,
    events: &std_mpsc::Sender<NetEvent>,
    (stop, farewell): (&AtomicBool, &Farewell),
) -> EndReason {
    let mut data = link.data_tx.take().expect("primary link has a data stream");
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let t0 = Instant::now();
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    let backup_ip = link.remote().ip();
    let (ctl_tx, ctl_rx) = (&mut link.ctl_tx, &mut link.ctl_rx);
    let delay = cfg.link.delay;
    let loop_ended = || EndReason::Local("the epoch loop ended".into());
    // Acks held for the emulated link's one-way delay.
    let mut acks: DelayLine<u64> = DelayLine::new(delay);
    // The heartbeat path: the backup's datagrams prove it alive, and say
    // where to send ours.
    let mut beat_peer: Option<SocketAddr> = None;
    let mut window = BeatWindow::default();
    let mut buf = [0u8; 64];
    // A planned stop: when it began, whether the goodbye is sent, and
    // whether the data stream is written out and finished.
    let mut stopping: Option<Instant> = None;
    let mut said_goodbye = false;
    let mut written = false;
    // (A block: the pinned futures borrow the link's streams until it ends.)
    let why = {
        let writer = writer(cfg, &mut data, out);
        tokio::pin!(writer);
        // The control stream is written by a future of its own, fed through a
        // queue: no send on the connection (whose window a flood of checkpoint
        // data can fill) ever holds up this loop, which must keep reading the
        // heartbeat path and keep time.
        let (ctl_q, mut ctl_in) = mpsc::channel::<Message>(64);
        let ctl_writer = async {
            while let Some(m) = ctl_in.recv().await {
                if let Err(e) = ctl_tx.send_message(&m).await {
                    return e.end_reason();
                }
            }
            loop_ended()
        };
        tokio::pin!(ctl_writer);
        // The control writer ended (its stream failed): it must not be
        // polled again below.
        let mut ctl_done = false;
        let why = loop {
            tokio::select! {
                w = &mut writer, if !written => match w {
                    Written::Ended(why) => break why,
                    Written::Goodbye(last_epoch) => {
                        written = true;
                        debug!(last_epoch, "stopping: every checkpoint is written to the data stream");
                    }
                },
                why = &mut ctl_writer => {
                    ctl_done = true;
                    break why;
                }
                _ = tokio::time::sleep_until(acks.next_due().unwrap_or_else(tokio::time::Instant::now)), if !acks.is_empty() => {
                    while let Some(epoch) = acks.pop_due(tokio::time::Instant::now()) {
                        if events.send(NetEvent::Ack(epoch)).is_err() {
                            break;
                        }
                    }
                }
                r = beat.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        if is_beat(key, backup_ip, &mut window, &buf[..n], from) {
                            last_heard = Instant::now();
                            learn(peer, &mut beat_peer, from);
                        }
                    }
                }
                _ = tick.tick() => {
                    // Datagrams that queued while this loop was not running
                    // count first: its own stall is not the backup's silence.
                    while let Ok((n, from)) = beat.try_recv_from(&mut buf) {
                        if is_beat(key, backup_ip, &mut window, &buf[..n], from) {
                            last_heard = Instant::now();
                            learn(peer, &mut beat_peer, from);
                        }
                    }
                    // The beats themselves go from their own thread.
                    // Heartbeats go on while stopping: until the backup has
                    // the goodbye, silence would mean a takeover.
                    if stop.load(Ordering::Relaxed) {
                        let since = *stopping.get_or_insert_with(Instant::now);
                        if let (false, Some(last_epoch)) = (said_goodbye, farewell.get()) {
                            // On the control stream, so it is not stuck
                            // behind the checkpoints it names: the backup
                            // stands down at once, and ends the session once
                            // it has committed `last_epoch`.
                            said_goodbye = true;
                            info!(last_epoch, "stopping: goodbye sent; waiting for the backup to commit checkpoint {last_epoch}");
                            let _ = ctl_q.try_send(Message::Goodbye { last_epoch, reason: STOPPING.into() });
                        }
                        if since.elapsed() > GOODBYE_WAIT {
                            // Closed as a goodbye: the backup stands down,
                            // from whatever it committed (this node releases
                            // nothing it did not ack).
                            break EndReason::Goodbye(format!(
                                "{STOPPING}; the backup did not confirm within {} ms",
                                GOODBYE_WAIT.as_millis()
                            ));
                        }
                    }
                    if last_heard.elapsed() > cfg.backup_timeout {
                        break EndReason::Silent(last_heard.elapsed());
                    }
                    seq += 1;
                    let sent_us = t0.elapsed().as_micros() as u64;
                    // A full queue means the stream is stuck: the heartbeat path
                    // and the timeout above decide, not this send.
                    let _ = ctl_q.try_send(Message::Heartbeat { seq, sent_us });
                }
                m = ctl_rx.next() => match m {
                    Ok(Some(Message::Ack { epoch })) => {
                        last_heard = Instant::now();
                        if !delay.is_zero() {
                            acks.push(epoch, tokio::time::Instant::now());
                        } else if events.send(NetEvent::Ack(epoch)).is_err() {
                            break loop_ended();
                        }
                    }
                    Ok(Some(Message::HeartbeatEcho { seq, sent_us })) => {
                        last_heard = Instant::now();
                        let rtt_us = (t0.elapsed().as_micros() as u64).saturating_sub(sent_us);
                        if seq.is_multiple_of(1000) {
                            debug!(seq, rtt_us, "heartbeat round trip");
                        }
                    }
                    Ok(Some(Message::Heartbeat { seq, sent_us })) => {
                        last_heard = Instant::now();
                        let _ = ctl_q.try_send(Message::HeartbeatEcho { seq, sent_us });
                    }
                    Ok(Some(Message::Goodbye { reason, .. })) => break EndReason::Goodbye(reason),
                    Ok(Some(m @ (Message::Versions { .. } | Message::Reuse { .. } | Message::Digests { .. } | Message::DiskDigests { .. }))) => {
                        last_heard = Instant::now();
                        if events.send(NetEvent::Offer(m)).is_err() {
                            break loop_ended();
                        }
                    }
                    Ok(Some(other)) => break EndReason::Refused(format!("unexpected {} from the backup", other.name())),
                    Ok(None) => break EndReason::Broken("the backup closed the control stream".into()),
                    Err(e) => {
                        let why = e.end_reason();
                        if said_goodbye && matches!(why, EndReason::Goodbye(_)) {
                            info!("the backup committed the last checkpoint and ended the session");
                        }
                        break why;
                    }
                }
            }
        };
        // What is queued (a goodbye) goes out if the stream lets it, briefly.
        drop(ctl_q);
        if !ctl_done {
            let _ = tokio::time::timeout(Duration::from_millis(200), &mut ctl_writer).await;
        }
        why
    };
    info!(backup = %link.remote(), "session ended ({why}); connection: {}", link.stats());
    link.close(&why);
    why
}

/// The backup's heartbeat address, for the heartbeat thread.
fn learn(peer: &BeatPeer, known: &mut Option<SocketAddr>, from: SocketAddr) {
    if *known != Some(from) {
        *known = Some(from);
        *peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
    }
}

/// A fresh, authentic heartbeat datagram from the backup's host.
fn is_beat(
    key: &[u8; 32],
    backup_ip: std::net::IpAddr,
    window: &mut BeatWindow,
    data: &[u8],
    from: SocketAddr,
) -> bool {
    from.ip() == backup_ip && Beat::open(key, data).is_ok_and(|b| window.accept(&b))
}
