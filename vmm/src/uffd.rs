//! Post-copy memory: guest RAM whose missing pages are filled on demand,
//! through Linux's userfaultfd (missing-page mode).
//!
//! A live migration that switches to post-copy runs the guest on the
//! destination before all of its pages arrived. The pages it lacks are
//! dropped from the destination's RAM ([`MissingPages::discard`]), so that
//! the first access to one — by a vCPU, or by KVM on its behalf — blocks in
//! the kernel and raises a fault event ([`MissingPages::next_fault`]); the
//! page is then placed atomically ([`MissingPages::fill`]) and the faulting
//! thread woken. A page placed once is never overwritten: a fill of a page
//! that is present already fails with `EEXIST` and changes nothing, so a
//! background push can never undo a write the guest made.
//!
//! The descriptor is opened without `UFFD_USER_MODE_ONLY` (KVM's own
//! accesses fault in kernel mode) and non-blocking (a blocking one returned
//! POLLERR and then hung here: docs/design.md, platform notes).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMem, PAGE_SIZE};

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault the address is at 16.
#[repr(C)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// Errors of post-copy memory.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// A system call failed.
    #[error("userfaultfd: {what}: {err}")]
    Os {
        /// What castor was doing.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
    /// Only RAM in one region (guests of at most 3 GiB) is supported.
    #[error("post-copy needs guest RAM in one region (at most 3 GiB)")]
    NotOneRegion,
    /// A frame outside the RAM.
    #[error("page {0} is outside guest RAM")]
    OutOfRange(u64),
}

fn os(what: &'static str) -> UffdError {
    UffdError::Os {
        what,
        err: std::io::Error::last_os_error(),
    }
}

/// Guest RAM registered for missing-page faults.
pub struct MissingPages {
    fd: OwnedFd,
    /// Keeps the mapping alive as long as the registration.
    _mem: GuestMem,
    host: u64,
    len: u64,
}

impl std::fmt::Debug for MissingPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MissingPages")
            .field("len", &self.len)
            .finish()
    }
}

impl MissingPages {
    /// Registers all of `mem` (one region) for missing-page faults. Pages
    /// present stay as they are; only discarded or never-touched pages
    /// fault.
    pub fn register(mem: &GuestMem) -> Result<MissingPages, UffdError> {
        if mem.num_regions() != 1 {
            return Err(UffdError::NotOneRegion);
        }
        let r = mem.iter().next().ok_or(UffdError::NotOneRegion)?;
        let (host, len) = (r.as_ptr() as u64, r.len());
        // SAFETY: a plain system call with flags; it returns a new
        // descriptor or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(os("creating the descriptor"));
        }
        // SAFETY: `raw` is a descriptor just returned to us and owned by
        // no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `api` is (repr(C), same layout), alive for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(os("UFFDIO_API"));
        }
        let mut reg = UffdioRegister {
            range: UffdioRange { start: host, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the
        // range is the live anonymous mapping of `mem`, kept mapped by the
        // clone held in the returned value.
        // SAFETY: `reg` is a valid uffdio_register alive for the call (above).
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        if rc < 0 {
            return Err(os("UFFDIO_REGISTER"));
        }
        Ok(MissingPages {
            fd,
            _mem: mem.clone(),
            host,
            len,
        })
    }

    /// Pages in the registered RAM.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    fn addr(&self, frame: u64) -> Result<u64, UffdError> {
        if frame >= self.pages() {
            return Err(UffdError::OutOfRange(frame));
        }
        Ok(self.host + frame * PAGE_SIZE)
    }

    /// Drops the page's content: its next access faults. Call it only
    /// before the guest runs (the content is lost).
    pub fn discard(&self, frame: u64) -> Result<(), UffdError> {
        let a = self.addr(frame)?;
        // `a..a + 4096` is a page of the private anonymous mapping this
        // value keeps alive; MADV_DONTNEED only drops its content (the next
        // access faults, here into userfaultfd). No Rust reference to guest
        // RAM relies on the content: castor reads and writes it through
        // vm-memory's volatile accessors or short-lived slices.
        // SAFETY: a live page of our own mapping whose content no reference relies on (above).
        let rc = unsafe {
            libc::madvise(
                a as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc < 0 {
            return Err(os("discarding a page"));
        }
        Ok(())
    }

    /// Places the page's content (`None`: zeros) if the page is missing,
    /// and wakes threads waiting for it. Returns whether it was placed
    /// (`false`: the page was present already, and is unchanged).
    pub fn fill(&self, frame: u64, data: Option<&[u8; 4096]>) -> Result<bool, UffdError> {
        let dst = self.addr(frame)?;
        let (rc, what) = match data {
            Some(d) => {
                let mut c = UffdioCopy {
                    dst,
                    src: d.as_ptr() as u64,
                    len: PAGE_SIZE,
                    mode: 0,
                    copy: 0,
                };
                // UFFDIO_COPY reads `c` (a `struct uffdio_copy`) and 4096
                // bytes at `src` (the borrowed page, alive for the call), and
                // atomically places them at `dst`, a page of the registered
                // range, only if it is missing.
                // SAFETY: `c` and the page it points at are valid for the call (above).
                let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
                (rc, "UFFDIO_COPY")
            }
            None => {
                let mut z = UffdioZeropage {
                    range: UffdioRange {
                        start: dst,
                        len: PAGE_SIZE,
                    },
                    mode: 0,
                    zeropage: 0,
                };
                // UFFDIO_ZEROPAGE reads and writes `z` (a `struct
                // uffdio_zeropage`); it maps zeros at a missing page of the
                // registered range.
                // SAFETY: `z` is a valid uffdio_zeropage alive for the call.
                let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
                (rc, "UFFDIO_ZEROPAGE")
            }
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EEXIST) {
                self.wake(frame)?;
                return Ok(false);
            }
            return Err(UffdError::Os { what, err });
        }
        Ok(true)
    }

    /// Wakes threads waiting on the page.
    pub fn wake(&self, frame: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange {
            start: self.addr(frame)?,
            len: PAGE_SIZE,
        };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range` (`r`).
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) } < 0 {
            return Err(os("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// The next page fault's frame, waiting up to `timeout`; `None` if none
    /// came.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        loop {
            let mut msg = UffdMsg {
                event: 0,
                _reserved: [0; 7],
                flags: 0,
                address: 0,
                _feat: 0,
            };
            // SAFETY: reads at most size_of::<UffdMsg>() (32) bytes into
            // `msg`, a plain repr(C) struct of integers.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    &mut msg as *mut UffdMsg as *mut libc::c_void,
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n == std::mem::size_of::<UffdMsg>() as isize {
                if msg.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let off = msg.address.wrapping_sub(self.host);
                if off >= self.len {
                    continue;
                }
                return Ok(Some(off / PAGE_SIZE));
            }
            let err = std::io::Error::last_os_error();
            if n >= 0 || err.raw_os_error() != Some(libc::EAGAIN) {
                return Err(UffdError::Os {
                    what: "reading a fault",
                    err,
                });
            }
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one descriptor described by `p`, alive for the
            // call.
            let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(60_000) as i32) };
            if rc == 0 {
                return Ok(None);
            }
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(UffdError::Os {
                    what: "polling for faults",
                    err,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_discarded_page_faults_and_is_filled_once() {
        let mem = crate::memory::create(16 << 20).unwrap();
        mem.write_slice(&[7u8; 4096], GuestAddress(5 * 4096))
            .unwrap();
        let m = MissingPages::register(&mem).unwrap();
        assert_eq!(m.pages(), 4096);
        // Present pages are not placed again.
        assert!(!m.fill(5, Some(&[1; 4096])).unwrap());
        m.discard(5).unwrap();
        let reader = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 8];
                mem.read_slice(&mut b, GuestAddress(5 * 4096 + 8)).unwrap();
                b
            })
        };
        let f = m.next_fault(Duration::from_secs(5)).unwrap();
        assert_eq!(f, Some(5));
        assert!(m.fill(5, Some(&[9; 4096])).unwrap());
        assert_eq!(reader.join().unwrap(), [9; 8]);
        // Never-touched pages fault too; zero fill.
        let reader = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let mut b = [1u8; 8];
                mem.read_slice(&mut b, GuestAddress(100 * 4096)).unwrap();
                b
            })
        };
        assert_eq!(m.next_fault(Duration::from_secs(5)).unwrap(), Some(100));
        assert!(m.fill(100, None).unwrap());
        assert_eq!(reader.join().unwrap(), [0; 8]);
        assert!(m.discard(1 << 40).is_err());
        assert_eq!(m.next_fault(Duration::from_millis(10)).unwrap(), None);
    }
}
