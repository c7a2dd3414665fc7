//! Output commit for the network: the frames a guest sends, held until the
//! checkpoint that produced them is on the backup.
//!
//! Frames are numbered in the order the guest sent them. While the hold is
//! on, a frame sent in epoch `k` is written to the tap only when the primary
//! releases up to the end of `k` (the backup acknowledged `k`): a client that
//! got a reply never depends on state a failover can lose. With the hold off
//! (no backup, or a survivor running alone) frames go out at once. A fenced
//! node closes the hold: what it held is dropped, never sent.
//!
//! The hold is bounded ([`PacketHold::MAX_FRAMES`], [`PacketHold::MAX_BYTES`]):
//! past that, new frames are dropped and counted, as a congested link drops
//! them (a client retries; the guest's state is unaffected). Frames from the
//! network are not held (see `vmm::virtio_net`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm::virtio_net::NetBackend;

/// Counters of a hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HoldFigures {
    /// Frames the guest sent.
    pub frames: u64,
    /// Frames written to the network.
    pub released: u64,
    /// Frames held now.
    pub held: u64,
    /// Bytes held now.
    pub held_bytes: u64,
    /// Frames dropped because the hold was full.
    pub dropped: u64,
    /// Frames dropped unsent because this node was fenced.
    pub discarded: u64,
}

struct Inner {
    hold: bool,
    closed: bool,
    /// Held frames with their numbers, oldest first.
    queue: VecDeque<(u64, Vec<u8>)>,
    /// Number of the next frame.
    next: u64,
    figures: HoldFigures,
}

/// The guest's transmitted frames and their release point.
pub struct PacketHold {
    inner: Mutex<Inner>,
    out: Arc<dyn NetBackend>,
}

impl std::fmt::Debug for PacketHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketHold")
            .field("figures", &self.figures())
            .finish()
    }
}

impl PacketHold {
    /// Most frames held.
    pub const MAX_FRAMES: usize = 16_384;
    /// Most bytes held.
    pub const MAX_BYTES: u64 = 32 << 20;

    /// A hold writing released frames to `out` (a tap), off (frames go out at once) until
    /// [`PacketHold::set_hold`].
    pub fn new(out: Arc<dyn NetBackend>) -> Arc<Self> {
        Arc::new(PacketHold {
            inner: Mutex::new(Inner {
                hold: false,
                closed: false,
                queue: VecDeque::new(),
                next: 0,
                figures: HoldFigures::default(),
            }),
            out,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds frames from now on (true), or releases everything held and
    /// sends at once from now on (false).
    pub fn set_hold(&self, hold: bool) {
        let mut i = self.lock();
        i.hold = hold;
        if !hold {
            let end = i.next;
            self.release_locked(&mut i, end);
        }
    }

    /// The number the next frame will get: frames sent so far are `[0, end)`.
    pub fn end(&self) -> u64 {
        self.lock().next
    }

    /// Sends every held frame numbered below `upto`, in order.
    pub fn release(&self, upto: u64) {
        let mut i = self.lock();
        self.release_locked(&mut i, upto);
    }

    fn release_locked(&self, i: &mut Inner, upto: u64) {
        if i.closed {
            return;
        }
        // Written under the lock: frames leave in the order the guest sent
        // them, also against a frame sent at once by a concurrent append.
        while i.queue.front().is_some_and(|(n, _)| *n < upto) {
            let (_, f) = i.queue.pop_front().expect("a front frame");
            i.figures.held -= 1;
            i.figures.held_bytes -= f.len() as u64;
            i.figures.released += 1;
            self.out.transmit(&f);
        }
    }

    /// This node was fenced (or stops with output held): everything held is
    /// dropped unsent, and nothing is ever sent again.
    pub fn close(&self) {
        let mut i = self.lock();
        i.closed = true;
        let n = i.queue.len() as u64;
        i.queue.clear();
        i.figures.discarded += n;
        i.figures.held = 0;
        i.figures.held_bytes = 0;
    }

    /// The hold's counters.
    pub fn figures(&self) -> HoldFigures {
        self.lock().figures
    }

    /// Appends a frame the guest sent: held, sent at once, or dropped.
    pub fn append(&self, frame: &[u8]) {
        let mut i = self.lock();
        let n = i.next;
        i.next += 1;
        i.figures.frames += 1;
        if i.closed {
            i.figures.discarded += 1;
        } else if !i.hold {
            i.figures.released += 1;
            self.out.transmit(frame);
        } else if i.queue.len() >= Self::MAX_FRAMES
            || i.figures.held_bytes + frame.len() as u64 > Self::MAX_BYTES
        {
            i.figures.dropped += 1;
        } else {
            i.figures.held += 1;
            i.figures.held_bytes += frame.len() as u64;
            i.queue.push_back((n, frame.to_vec()));
        }
    }
}

impl NetBackend for PacketHold {
    fn transmit(&self, frame: &[u8]) {
        self.append(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Wire(Mutex<Vec<Vec<u8>>>);
    impl NetBackend for Wire {
        fn transmit(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    fn sent(w: &Wire) -> Vec<u8> {
        w.0.lock().unwrap().iter().map(|f| f[0]).collect()
    }

    #[test]
    fn held_frames_leave_only_when_released_and_in_order() {
        let wire = Arc::new(Wire::default());
        let h = PacketHold::new(wire.clone());
        h.append(&[0]);
        assert_eq!(sent(&wire), vec![0], "unheld: at once");
        h.set_hold(true);
        h.append(&[1]);
        h.append(&[2]);
        let epoch_end = h.end();
        h.append(&[3]);
        assert_eq!(sent(&wire), vec![0]);
        h.release(epoch_end);
        assert_eq!(sent(&wire), vec![0, 1, 2]);
        h.release(epoch_end); // again: nothing
        h.set_hold(false);
        assert_eq!(sent(&wire), vec![0, 1, 2, 3]);
        let f = h.figures();
        assert_eq!((f.frames, f.released, f.held), (4, 4, 0));
    }

    #[test]
    fn a_fenced_node_never_sends_what_it_held() {
        let wire = Arc::new(Wire::default());
        let h = PacketHold::new(wire.clone());
        h.set_hold(true);
        h.append(&[1]);
        h.close();
        h.release(u64::MAX);
        h.set_hold(false);
        h.append(&[2]);
        assert!(sent(&wire).is_empty());
        assert_eq!(h.figures().discarded, 2);
    }

    #[test]
    fn the_hold_is_bounded() {
        let wire = Arc::new(Wire::default());
        let h = PacketHold::new(wire.clone());
        h.set_hold(true);
        for _ in 0..PacketHold::MAX_FRAMES + 10 {
            h.append(&[7; 64]);
        }
        let f = h.figures();
        assert_eq!(f.held as usize, PacketHold::MAX_FRAMES);
        assert_eq!(f.dropped, 10);
        h.release(u64::MAX);
        assert_eq!(wire.0.lock().unwrap().len(), PacketHold::MAX_FRAMES);
    }
}
