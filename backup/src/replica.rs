//! The replica: guest RAM and machine state at the last committed
//! checkpoint, and the step that moves it to the next one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use node::ha::{BackupCore, BackupInput};
use protocol::{payload, EndReason, Hello};
use tracing::{debug, error, info, warn};
use vmm::image::{GenTable, ImagePaths};
use vmm::memory::GuestMem;
use vmm::MachineState;

/// The replica and the last committed checkpoint.
pub(crate) struct Replica {
    /// Guest RAM (taken by the takeover).
    pub mem: Option<GuestMem>,
    /// Machine state of the committed checkpoint.
    pub state: Option<MachineState>,
    pub block_size: usize,
    pub epoch: u64,
    pub session: u64,
    pub verifying: bool,
    /// The generation of every page of `mem` (the tag of the checkpoint
    /// that last wrote it).
    pub gens: Option<Arc<GenTable>>,
    /// `mem` was zeroed for this session: its full resync carries every
    /// page, zero pages implicitly.
    pub fresh: bool,
    /// Digests of `mem`'s pages, computed ahead (an image loaded at
    /// start-up); dropped when anything is committed to it.
    pub digests: Option<Vec<u64>>,
}

impl Replica {
    /// The replica of a new session of hello `h` over `mem` (`fresh`: zeroed
    /// for it), nothing committed.
    fn for_session(h: &Hello, mem: GuestMem, gens: Arc<GenTable>, fresh: bool) -> Replica {
        Replica {
            mem: Some(mem),
            state: None,
            block_size: h.block_size as usize,
            epoch: 0,
            session: h.session,
            verifying: h.capabilities & protocol::message::CAP_VERIFY != 0,
            gens: Some(gens),
            fresh,
            digests: None,
        }
    }
}

/// How the current session's replica was set up (for the log and status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reuse {
    /// Pages offered (0: a fresh replica).
    pub offered_pages: u64,
    /// Why no image was offered.
    pub why_not: String,
}

/// What the backup's tasks share.
pub(crate) struct Shared {
    /// Lock order: `replica`, then `core`.
    pub replica: Mutex<Replica>,
    pub core: Mutex<BackupCore>,
    pub t0: Instant,
    pub connected: AtomicBool,
    /// The session's protocol version (0: no session).
    pub protocol: std::sync::atomic::AtomicU16,
    pub mismatches: AtomicU64,
    pub applied: AtomicU64,
    /// Ends the current session from the watchdog (a takeover).
    pub closer: Mutex<Option<transport::Closer>>,
    /// The node's metrics.
    pub metrics: Arc<node::metrics::Metrics>,
    /// The token of the last stale primary refused, so each counts once.
    stale_token: AtomicU64,
    /// Where the replica's image files go (`--image-dir`).
    pub image: Option<ImagePaths>,
    /// The current session's heartbeat path, for the watchdog to read
    /// itself when the network runtime is too busy to ([`BeatIn`]).
    pub beat_in: Mutex<Option<BeatIn>>,
    /// The guest's disk, at the last committed checkpoint (written only
    /// under the replica lock, in [`Shared::commit`]).
    pub disk: Option<crate::disk::BackupDisk>,
    /// Why the last refused checkpoint was refused (for `castor status`).
    pub last_refusal: Mutex<Option<String>>,
    /// Sessions refused since the last committed checkpoint.
    pub refusals_in_a_row: AtomicU64,
    /// What was last heard from the primary, for the takeover's log line.
    pub heard_log: HeardLog,
}

/// When the primary's heartbeats and other datagrams were last heard (ms
/// since the backup started; `u64::MAX`: never) and how many heartbeats
/// came: a takeover says which path went quiet, so a false one under load
/// can be told from a dead primary.
#[derive(Debug)]
pub(crate) struct HeardLog {
    beats: AtomicU64,
    beat_ms: AtomicU64,
    datagram_ms: AtomicU64,
}

/// What the backup had heard from its primary at a moment ([`HeardLog::at`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Heard {
    /// Heartbeats heard since the backup started.
    pub beats: u64,
    /// Ms since the last heartbeat (`None`: never).
    pub since_beat_ms: Option<u64>,
    /// Ms since the last datagram on the connection (`None`: never).
    pub since_datagram_ms: Option<u64>,
}

impl HeardLog {
    fn new() -> HeardLog {
        HeardLog {
            beats: AtomicU64::new(0),
            beat_ms: AtomicU64::new(u64::MAX),
            datagram_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// A heartbeat was heard at `now`.
    pub fn beat(&self, now: Duration) {
        self.beats.fetch_add(1, Ordering::Relaxed);
        self.beat_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
    }

    /// A datagram on the connection was heard at `now`.
    pub fn datagram(&self, now: Duration) {
        self.datagram_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
    }

    /// What was heard from the primary, as of `now`.
    pub fn at(&self, now: Duration) -> Heard {
        let since = |a: &AtomicU64| {
            let t = a.load(Ordering::Relaxed);
            (t != u64::MAX).then(|| (now.as_millis() as u64).saturating_sub(t))
        };
        Heard {
            beats: self.beats.load(Ordering::Relaxed),
            since_beat_ms: since(&self.beat_ms),
            since_datagram_ms: since(&self.datagram_ms),
        }
    }
}

/// The primary's heartbeat datagrams as the watchdog reads them: a second
/// handle on the heartbeat socket the network runtime reads. A datagram
/// goes to whichever reader asks first; both check it the same way and
/// share one replay window, so a datagram counts once.
pub(crate) struct BeatIn {
    /// The socket (non-blocking).
    pub sock: std::net::UdpSocket,
    /// The session's heartbeat key.
    pub key: [u8; 32],
    /// The primary's heartbeat address.
    pub primary: std::net::SocketAddr,
    /// Replay protection, shared with the runtime's reader.
    pub window: Arc<Mutex<protocol::beat::BeatWindow>>,
}

impl BeatIn {
    /// An authentic, fresh heartbeat from the primary.
    pub fn accept(&self, data: &[u8], from: std::net::SocketAddr) -> bool {
        from == self.primary
            && protocol::beat::Beat::open(&self.key, data).is_ok_and(|b| {
                self.window
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .accept(&b)
            })
    }

    /// Reads every datagram waiting; true if one was a heartbeat.
    pub fn drain(&self) -> bool {
        let (mut buf, mut heard) = ([0u8; 64], false);
        while let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            heard |= self.accept(&buf[..n], from);
        }
        heard
    }
}

impl Shared {
    pub fn new(
        core: BackupCore,
        metrics: Arc<node::metrics::Metrics>,
        image: Option<ImagePaths>,
        disk: Option<crate::disk::BackupDisk>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            replica: Mutex::new(Replica {
                mem: None,
                state: None,
                block_size: 64,
                epoch: 0,
                session: 0,
                verifying: false,
                gens: None,
                fresh: false,
                digests: None,
            }),
            core: Mutex::new(core),
            t0: Instant::now(),
            connected: AtomicBool::new(false),
            protocol: std::sync::atomic::AtomicU16::new(0),
            mismatches: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            closer: Mutex::new(None),
            metrics,
            stale_token: AtomicU64::new(u64::MAX),
            image,
            beat_in: Mutex::new(None),
            disk,
            last_refusal: Mutex::new(None),
            refusals_in_a_row: AtomicU64::new(0),
            heard_log: HeardLog::new(),
        })
    }

    /// A session ended by this node's refusal of the primary's checkpoint
    /// (shown by `castor status` until the next one).
    pub fn refused(&self, why: String) {
        self.refusals_in_a_row.fetch_add(1, Ordering::Relaxed);
        *self.last_refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// The backup's clock for its core.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub fn replica(&self) -> MutexGuard<'_, Replica> {
        self.replica.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn core(&self) -> MutexGuard<'_, BackupCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Something arrived from the primary.
    pub fn heard(&self) {
        let now = self.now();
        self.core().on(BackupInput::Heard { now });
    }

    /// An authentic heartbeat from the primary: heard, and kept for the
    /// takeover's log line.
    pub fn heard_beat(&self) {
        self.heard_log.beat(self.now());
        self.heard();
    }

    /// A datagram on the connection from the primary: heard, and kept for
    /// the takeover's log line.
    pub fn heard_datagram(&self) {
        self.heard_log.datagram(self.now());
        self.heard();
    }

    /// At start-up with `--reuse`: the image a previous run of this node
    /// left in `paths` becomes the replica to offer (nothing is committed
    /// from it: it cannot be taken over until a session's first checkpoint
    /// commits over it).
    pub fn load_image(&self, paths: &ImagePaths) {
        let size = match std::fs::metadata(&paths.ram) {
            Ok(m) => m.len(),
            Err(e) => {
                info!(ram = %paths.ram.display(), "no image to reuse ({e})");
                return;
            }
        };
        let loaded = vmm::image::ram_in_file(&paths.ram, size, true).and_then(|(mem, kept)| {
            let pages = vmm::memory::ram_size(&mem) / 4096;
            let (gens, valid) = GenTable::open(&paths.gen, pages, true)?;
            Ok((mem, kept, gens, valid))
        });
        match loaded {
            Ok((mut mem, true, gens, valid)) => {
                // Digested now, before any primary asks: the offer then
                // goes out at once.
                let t = Instant::now();
                let digests =
                    vmm::memory::with_ram_mut(&mut mem, |ram| vmm::image::page_digests(ram)).ok();
                let h = gens.header();
                info!(
                    ram = %paths.ram.display(),
                    mib = size >> 20,
                    generations = if !valid { "unknown" } else if h.clean { "clean" } else { "maybe stale" },
                    digest_ms = t.elapsed().as_secs_f64() * 1e3,
                    "an image of the VM to offer the primary"
                );
                let mut r = self.replica();
                r.mem = Some(mem);
                r.gens = Some(Arc::new(gens));
                r.digests = digests;
            }
            Ok(_) => {
                warn!(ram = %paths.ram.display(), "the image file is not a whole guest's RAM: not reused")
            }
            Err(e) => warn!("cannot open the image to reuse: {e}"),
        }
    }

    /// A new session: the replica this node holds (the last session's, or
    /// an image loaded at start-up) if the primary asks for a reuse offer
    /// and it has the hello's size, else a fresh one, nothing committed.
    /// Returns the messages answering the hello's reuse request, if any.
    pub fn start_session(
        &self,
        h: &Hello,
        image: Option<&ImagePaths>,
    ) -> Result<(Vec<protocol::Message>, Reuse), EndReason> {
        let mut r = self.replica();
        let refused = self.core().on(BackupInput::SessionStarted {
            session: h.session,
            token: h.token,
            now: self.now(),
        });
        if let Some(node::ha::BackupAction::Refuse(why)) = refused.into_iter().next() {
            // The primary this node took over from is alive: the takeover
            // was for a pause, a partition or a false alarm. Counted once
            // per stale primary (it retries every 200 ms).
            if why == EndReason::AlreadyTakenOver
                && self.stale_token.swap(h.token, Ordering::Relaxed) != h.token
            {
                self.metrics.false_takeovers.inc();
            }
            return Err(why);
        }
        let asks = protocol::reuse::asks(h.capabilities);
        let kept = r.mem.take();
        let kept_gens = r.gens.take();
        let kept_digests = r.digests.take();
        let why_not = match &kept {
            _ if !asks => "the primary did not ask".to_string(),
            None => "no image of the VM on this node".to_string(),
            Some(m) if vmm::memory::ram_size(m) != h.memory_bytes => format!(
                "the image has {} MiB, the guest {} MiB",
                vmm::memory::ram_size(m) >> 20,
                h.memory_bytes >> 20
            ),
            Some(_) => String::new(),
        };
        if why_not.is_empty() {
            let mut mem = kept.expect("checked above");
            let pages = vmm::memory::ram_size(&mem) / 4096;
            let gens = kept_gens.unwrap_or_else(|| Arc::new(GenTable::in_memory(pages)));
            let t = Instant::now();
            let digests = match kept_digests.filter(|d| d.len() as u64 == pages) {
                Some(d) => d,
                None => vmm::memory::with_ram_mut(&mut mem, |ram| vmm::image::page_digests(ram))
                    .map_err(|e| EndReason::Refused(format!("cannot read the image: {e}")))?,
            };
            let runs = protocol::reuse::runs(&gens.tags());
            info!(
                pages,
                runs = runs.len(),
                digest_ms = t.elapsed().as_secs_f64() * 1e3,
                "offering the primary this node's image of the VM"
            );
            let mut offer = protocol::reuse::offer(h.session, runs, &digests);
            offer.extend(self.disk_offer(h));
            *r = Replica::for_session(h, mem, gens, false);
            return Ok((
                offer,
                Reuse {
                    offered_pages: pages,
                    why_not,
                },
            ));
        }
        drop(kept);
        drop(kept_gens);
        let (mem, gens) = match image {
            Some(p) => {
                let (mem, _) = vmm::image::ram_in_file(&p.ram, h.memory_bytes, false)
                    .map_err(|e| EndReason::Refused(format!("cannot create the replica: {e}")))?;
                let (gens, _) = GenTable::open(&p.gen, h.memory_bytes / 4096, false)
                    .map_err(|e| EndReason::Refused(format!("cannot create the replica: {e}")))?;
                (mem, gens)
            }
            None => (
                vmm::memory::create(h.memory_bytes)
                    .map_err(|e| EndReason::Refused(format!("cannot allocate the replica: {e}")))?,
                GenTable::in_memory(h.memory_bytes / 4096),
            ),
        };
        *r = Replica::for_session(h, mem, Arc::new(gens), true);
        let answer = if asks {
            let mut a = vec![protocol::reuse::no_offer(h.session, &why_not)];
            a.extend(self.disk_offer(h));
            a
        } else {
            Vec::new()
        };
        Ok((
            answer,
            Reuse {
                offered_pages: 0,
                why_not,
            },
        ))
    }

    /// The digests of this node's disk blocks, for a hello with a disk (the
    /// protocol checked the sizes agree): the primary sends only the blocks
    /// that differ.
    fn disk_offer(&self, h: &Hello) -> Vec<protocol::Message> {
        match &self.disk {
            Some(d) if h.disk_bytes > 0 => {
                let digests = d.disk().digests();
                info!(
                    blocks = digests.len(),
                    "offering the primary this node's disk block digests"
                );
                protocol::reuse::disk_offer(h.session, &digests)
            }
            _ => Vec::new(),
        }
    }

    /// The replica is at no checkpoint (written by checkpoint `epoch`, and
    /// found different from the primary): dropped, and taken over by no one
    /// until a new session's first checkpoint commits.
    fn invalidate(&self, r: &mut Replica, epoch: u64) {
        r.state = None;
        r.mem = None;
        self.core().on(BackupInput::ReplicaInvalid { epoch });
        self.mismatches.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies a committed checkpoint to the replica: whole, or not at all
    /// (a refused checkpoint leaves the replica at the previous one and ends
    /// the session).
    pub fn commit(
        &self,
        log: &node::console::ConsoleLog,
        c: &protocol::Checkpoint,
    ) -> Result<(), EndReason> {
        let refuse = |what: String| EndReason::Refused(format!("checkpoint {}: {what}", c.epoch));
        let raw = payload::unpack_state(&c.state, vmm::state::MAX_PAYLOAD as usize + 64)
            .map_err(|e| refuse(e.to_string()))?;
        let state = MachineState::decode(&raw).map_err(|e| refuse(e.to_string()))?;
        let disk = match (&self.disk, c.disk_commit) {
            (Some(d), Some(dc)) => {
                // Validated whole before anything is written, RAM included.
                let entries = protocol::disk::parse(&c.disk, d.disk().blocks())
                    .map_err(|e| refuse(format!("refused, replica unchanged: {e}")))?;
                Some((d, dc, entries))
            }
            (None, None) => None,
            _ => return Err(refuse("a disk part without a disk on this node".into())),
        };
        let mut r = self.replica();
        {
            let core = self.core();
            if core.taken_over() {
                // The replica stays at the checkpoint the takeover chose.
                return Err(EndReason::TakenOver);
            }
            if core.frozen() {
                // Nothing more is committed (or acked) while the witness decides.
                return Err(EndReason::Refused(
                    "the backup is claiming the VM at the witness".into(),
                ));
            }
        }
        let bs = r.block_size;
        let (session, fresh, gens) = (r.session, r.fresh, r.gens.clone());
        if let Some(g) = &gens {
            g.set_header(false, session, r.epoch);
        }
        let Some(mem) = r.mem.as_mut() else {
            return Err(refuse(
                "no replica (before a session, or taken over)".into(),
            ));
        };
        let (stats, digest) = vmm::memory::with_ram_mut(mem, |ram| {
            let stats = fgbi::apply(ram, bs, &c.records)?;
            let digest = c.memory_digest.map(|_| {
                payload::memory_digest(
                    stats
                        .pages
                        .iter()
                        .map(|&p| &ram[p as usize * 4096..(p as usize + 1) * 4096]),
                )
            });
            Ok::<_, fgbi::ApplyError>((stats, digest))
        })
        .map_err(|e| refuse(format!("replica: {e}")))?
        .map_err(|e| refuse(format!("refused, replica unchanged: {e}")))?;
        if let Some(g) = &gens {
            let tag = vmm::image::tag(session, c.epoch);
            if fresh && c.epoch == 1 {
                // A full resync onto zeroed RAM: the zero pages it leaves
                // out are equal too.
                g.set_all(tag);
            } else {
                for &p in &stats.pages {
                    g.set(p, tag);
                }
            }
        }
        if let (Some(want), Some(got)) = (c.memory_digest, digest) {
            if want != got {
                // The RAM was written: the replica is at no checkpoint now.
                self.invalidate(&mut r, c.epoch);
                error!(
                    epoch = c.epoch,
                    "VERIFY: replica differs from the primary after checkpoint {}; no takeover until the next session's full resync commits", c.epoch
                );
                return Err(EndReason::Refused(format!(
                    "replica mismatch at epoch {}",
                    c.epoch
                )));
            }
        }
        if let Some((d, dc, entries)) = disk {
            if let Err(e) = d.apply_parsed(session, c.epoch, &entries, dc) {
                // The RAM is at this checkpoint and the disk is not: the
                // replica is at none.
                self.invalidate(&mut r, c.epoch);
                error!(
                    epoch = c.epoch,
                    "DISK: {e}; no takeover until the next session's resync commits"
                );
                return Err(EndReason::Refused(format!(
                    "checkpoint {}: the disk: {e}",
                    c.epoch
                )));
            }
        }
        // The core learns of the commit under the replica lock, before the
        // state is published: the watchdog decides under the same lock, so
        // it never sees a fresh state with stale liveness.
        let mut core = self.core();
        let could = core.committed().is_some();
        core.on(BackupInput::Committed {
            epoch: c.epoch,
            resumable: c.resumable,
            now: self.now(),
        });
        drop(core);
        if !c.resumable {
            debug!(
                epoch = c.epoch,
                "checkpoint committed, but the primary released output past it (its full resync): no takeover from it"
            );
        } else if !could && c.epoch > 1 {
            info!(
                epoch = c.epoch,
                "the first checkpoint whose output the primary held is committed: the guest can be taken over from here on"
            );
        }
        if let Some(g) = &gens {
            g.set_header(true, session, c.epoch);
        }
        r.state = Some(state);
        r.epoch = c.epoch;
        self.applied.fetch_add(1, Ordering::Relaxed);
        log.append_released(&c.output);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::beat::{Beat, BeatWindow};

    fn udp() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    /// Waits for the datagrams sent so far to reach a loopback socket.
    fn settle() {
        std::thread::sleep(Duration::from_millis(20));
    }

    #[test]
    fn the_watchdogs_reader_counts_only_fresh_authentic_beats_of_the_primary() {
        let (primary, other) = (udp(), udp());
        let sock = udp();
        sock.set_nonblocking(true).unwrap();
        let to = sock.local_addr().unwrap();
        let key = [7u8; 32];
        let b = BeatIn {
            sock,
            key,
            primary: primary.local_addr().unwrap(),
            window: Arc::new(Mutex::new(BeatWindow::default())),
        };
        assert!(!b.drain(), "nothing sent yet");
        let beat = Beat { seq: 1, sent_us: 5 }.seal(&key);
        primary.send_to(&beat, to).unwrap();
        settle();
        assert!(b.drain());
        // The same datagram again (a replay), one under another key, one
        // from another address: none counts.
        primary.send_to(&beat, to).unwrap();
        primary
            .send_to(&Beat { seq: 2, sent_us: 6 }.seal(&[8u8; 32]), to)
            .unwrap();
        other
            .send_to(&Beat { seq: 3, sent_us: 7 }.seal(&key), to)
            .unwrap();
        settle();
        assert!(!b.drain());
        primary
            .send_to(&Beat { seq: 4, sent_us: 8 }.seal(&key), to)
            .unwrap();
        settle();
        assert!(b.drain());
    }
}
