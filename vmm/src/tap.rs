//! A Linux tap device: the host side of the guest's network card.
//!
//! castor opens an existing tap by name (`ip tuntap add dev NAME mode tap`,
//! usually enslaved to a bridge; `castor net up` creates them) or creates a
//! transient one. Frames are raw Ethernet frames, without the kernel's packet
//! information header (`IFF_NO_PI`) and without a virtio-net header: the
//! device adds and strips that itself. The descriptor is non-blocking: a tap
//! whose queue is full drops the frame, as a congested link would.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// `TUNSETIFF`, `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Longest interface name, without its terminating NUL.
pub const MAX_NAME: usize = 15;
/// Largest frame read from or written to a tap (an Ethernet frame with a
/// 64 KiB payload; the device offers no offloads, so 1514 is the norm).
pub const MAX_FRAME: usize = 65_550;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or not a plain interface name.
    #[error("bad tap name '{0}': 1 to 15 characters, none of them '/', ' ' or NUL")]
    BadName(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and are you root?)")]
    Open(io::Error),
    /// TUNSETIFF refused.
    #[error("cannot attach to tap '{name}': {err} (it may be another kind of device, in use by another process, or need root)")]
    Attach {
        /// The interface name.
        name: String,
        /// The ioctl's error.
        err: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    dropped: AtomicU64,
}

impl Tap {
    /// Attaches to the tap `name` (creating a transient one if it does not
    /// exist). Non-blocking, close-on-exec.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() > MAX_NAME
            || name.bytes().any(|b| b == b'/' || b == b' ' || b == 0)
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // TUNSETIFF reads and writes a `struct ifreq`: 40 bytes on x86_64,
        // the size of `IfReq`, whose first 16 bytes are the NUL-terminated
        // name and the next 2 the flags, as in the kernel's layout.
        // SAFETY: `req` is a valid ifreq that lives across the call; nothing else is touched.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                err: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            dropped: AtomicU64::new(0),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Reads and throws away every frame waiting in the tap's queue;
    /// returns how many. A node that opened its tap before it ran the guest
    /// (a backup, ready to take over) has frames queued that are not the
    /// guest's to read: the node that ran the guest then received their
    /// copies, and its checkpoint already holds their effect. Replaying
    /// them into the resumed guest would apply old requests twice.
    pub fn discard_pending(&self) -> u64 {
        let mut buf = vec![0u8; 65_536];
        let mut n = 0;
        while self.read_frame(&mut buf).is_ok() {
            n += 1;
        }
        n
    }

    /// Writes one frame. A full queue or a tap that is down drops it (counted
    /// in [`Tap::dropped`]), as a congested link would; other errors too.
    pub fn write_frame(&self, frame: &[u8]) {
        if (&self.file).write(frame).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Frames [`Tap::write_frame`] could not hand to the kernel.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout_ms` for a frame to read. True: one is waiting.
    pub fn wait_readable(&self, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd that lives across the call.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        r > 0 && p.revents & libc::POLLIN != 0
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for n in ["", "a/b", "with space", "sixteen-chars-xx"] {
            assert!(matches!(Tap::open(n), Err(TapError::BadName(_))), "{n}");
        }
    }
}
