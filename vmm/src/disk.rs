//! The guest's disk image: a raw file or a block device, with a digest of
//! every 4 KiB block kept current as the device writes it.
//!
//! The same [`Disk`] is shared by the virtio-blk device ([`crate::virtio_blk`])
//! and by replication, which compares digest tables ([`Disk::digests`]) and a
//! running sum of them ([`Disk::sum`], the disk's identity at an instant)
//! between the two nodes instead of reading whole images.
//!
//! - **One castor at a time.** [`Disk::open`] takes an exclusive `flock`
//!   (`LOCK_EX | LOCK_NB`) held for the `Disk`'s life: a second castor on the
//!   same image is refused ("already opened by another castor") instead of
//!   two guests writing one disk.
//! - **Digests.** [`block_digest`] is xxh3-64 seeded with the block number (a
//!   block's content moved elsewhere digests differently). The table is
//!   computed at open on every core (logged with its time), then updated by
//!   every write through this type. Writes to the file by anything else are
//!   not seen: the lock keeps castor from doing that to itself.
//! - **Concurrency.** The table is atomics: other threads may read it while
//!   the device writes. Writes to one block from two threads at once are not
//!   ordered against each other's digest update; the device has one worker.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::info;

/// Replication and digest granularity in bytes.
pub const BLOCK: u64 = 4096;

/// The digest of block number `block` holding `data`: xxh3-64 seeded with
/// the block number.
pub fn block_digest(block: u64, data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(data, block)
}

/// Why a disk image cannot be used. Every message names the path.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No such file.
    #[error("disk {}: no such file (create one, e.g. truncate -s 1G {})", .0.display(), .0.display())]
    Missing(PathBuf),
    /// A directory, socket, character device...
    #[error("disk {}: not a regular file or block device", .0.display())]
    NotFileOrDevice(PathBuf),
    /// Size 0 or not whole blocks.
    #[error("disk {}: size {bytes} bytes is not a positive multiple of 4096", path.display())]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Smaller than what the guest needs.
    #[error("disk {}: too small: {bytes} bytes, need {need} bytes", path.display())]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// What is needed.
        need: u64,
    },
    /// Cannot be opened for writing.
    #[error("disk {}: read-only ({err}); castor needs to write it", path.display())]
    ReadOnly {
        /// The image.
        path: PathBuf,
        /// The open error.
        err: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("disk {}: already opened by another castor (its flock is held)", .0.display())]
    Locked(PathBuf),
    /// Any other failure.
    #[error("disk {}: {what}: {err}", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// What castor was doing.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
}

/// An open disk image, locked, with its block digests.
pub struct Disk {
    file: File,
    path: PathBuf,
    bytes: u64,
    digests: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Disk {
    /// Opens `path` read-write, locks it and digests every block.
    pub fn open(path: &Path) -> Result<Disk, DiskError> {
        let p = || path.to_path_buf();
        let io = |what| {
            move |err| DiskError::Io {
                path: p(),
                what,
                err,
            }
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DiskError::Missing(p()))
            }
            Err(e) => return Err(io("reading its metadata")(e)),
        };
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(DiskError::NotFileOrDevice(p()));
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EACCES | libc::EROFS | libc::EPERM)
                ) =>
            {
                return Err(DiskError::ReadOnly { path: p(), err })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DiskError::Missing(p()))
            }
            Err(e) => return Err(io("opening it read-write")(e)),
        };
        // SAFETY: flock takes a file descriptor we own (open for the call)
        // and an integer; it touches no memory.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DiskError::Locked(p()));
            }
            return Err(io("locking it")(e));
        }
        let bytes = if ft.is_block_device() {
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(io("reading the block device's size"))?
        } else {
            meta.len()
        };
        if bytes == 0 || bytes % BLOCK != 0 {
            return Err(DiskError::BadSize { path: p(), bytes });
        }
        let t0 = Instant::now();
        let blocks = bytes / BLOCK;
        let digests = digest_all(&file, blocks).map_err(io("reading it to digest its blocks"))?;
        let sum = digests.iter().fold(0u64, |a, d| a.wrapping_add(*d));
        info!(
            disk = %path.display(),
            mib = bytes >> 20,
            blocks,
            "disk opened, {blocks} blocks digested in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(Disk {
            file,
            path: p(),
            bytes,
            digests: digests.into_iter().map(AtomicU64::new).collect(),
            sum: AtomicU64::new(sum),
        })
    }

    /// Refuses a disk smaller than `min_bytes`.
    pub fn require(&self, min_bytes: u64) -> Result<(), DiskError> {
        if self.bytes < min_bytes {
            return Err(DiskError::TooSmall {
                path: self.path.clone(),
                bytes: self.bytes,
                need: min_bytes,
            });
        }
        Ok(())
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Size in 4 KiB blocks.
    pub fn blocks(&self) -> u64 {
        self.bytes / BLOCK
    }

    /// A copy of the whole digest table.
    pub fn digests(&self) -> Vec<u64> {
        self.digests
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .collect()
    }

    /// Block `block`'s digest (panics past the end, like indexing).
    pub fn digest(&self, block: u64) -> u64 {
        self.digests[block as usize].load(Ordering::Acquire)
    }

    /// The wrapping sum of every block's digest.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Acquire)
    }

    fn set_digest(&self, block: u64, d: u64) {
        let old = self.digests[block as usize].swap(d, Ordering::AcqRel);
        self.sum.fetch_add(d.wrapping_sub(old), Ordering::AcqRel);
    }

    fn check(&self, offset: u64, len: usize) -> std::io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are past the end of the disk ({} bytes)",
                    self.bytes
                ),
            )),
        }
    }

    /// Reads block `block`.
    pub fn read_block(&self, block: u64, buf: &mut [u8; 4096]) -> std::io::Result<()> {
        self.read_at(block.saturating_mul(BLOCK), buf)
    }

    /// Writes block `block` and updates its digest and the sum.
    pub fn write_block(&self, block: u64, data: &[u8; 4096]) -> std::io::Result<()> {
        let off = block.saturating_mul(BLOCK);
        self.check(off, data.len())?;
        self.file.write_all_at(data, off)?;
        self.set_digest(block, block_digest(block, data));
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `data` at `offset`, then re-digests every block it touched (a
    /// block written in part is read back whole).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(data, offset)?;
        let end = offset + data.len() as u64;
        let mut buf = [0u8; BLOCK as usize];
        for b in offset / BLOCK..end.div_ceil(BLOCK) {
            let bs = b * BLOCK;
            let d = if bs >= offset && bs + BLOCK <= end {
                let s = (bs - offset) as usize;
                block_digest(b, &data[s..s + BLOCK as usize])
            } else {
                self.file.read_exact_at(&mut buf, bs)?;
                block_digest(b, &buf)
            };
            self.set_digest(b, d);
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Which `run`-byte pieces of `file` (of `bytes`) hold data, by `SEEK_DATA` /
/// `SEEK_HOLE`: a piece with none reads as zeros and need not be read.
/// `None` when the file system cannot say (everything is read).
fn runs_with_data(file: &File, bytes: u64, run: u64) -> Option<Vec<bool>> {
    let runs = bytes.div_ceil(run) as usize;
    let mut has = vec![false; runs];
    let fd = file.as_raw_fd();
    let mut at: i64 = 0;
    while (at as u64) < bytes {
        // SAFETY: lseek on a descriptor we own; it reads and writes no memory.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data from `at` to the end.
            return (e.raw_os_error() == Some(libc::ENXIO)).then_some(has);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let (from, to) = (
            data as u64 / run,
            (hole as u64).div_ceil(run).min(runs as u64),
        );
        for h in &mut has[from as usize..to as usize] {
            *h = true;
        }
        at = hole;
    }
    Some(has)
}

/// Digests `blocks` blocks of `file` on every core (runs without data, in a
/// sparse file's holes, as zeros without reading them).
fn digest_all(file: &File, blocks: u64) -> std::io::Result<Vec<u64>> {
    const RUN: usize = 256; // 1 MiB reads
    let data = runs_with_data(file, blocks * BLOCK, BLOCK);
    let data = data.as_deref();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(blocks.div_ceil(256) as usize)
        .max(1);
    let per = blocks.div_ceil(threads as u64).next_multiple_of(RUN as u64);
    let mut out = vec![0u64; blocks as usize];
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (t, chunk) in out.chunks_mut(per as usize).enumerate() {
            let first = t as u64 * per;
            handles.push(s.spawn(move || -> std::io::Result<()> {
                let mut buf = vec![0u8; RUN * BLOCK as usize];
                for (k, part) in chunk.chunks_mut(RUN).enumerate() {
                    let b0 = first + (k * RUN) as u64;
                    let len = part.len() * BLOCK as usize;
                    let present = |j: usize| data.is_none_or(|d| d[b0 as usize + j]);
                    if (0..part.len()).all(present) {
                        file.read_exact_at(&mut buf[..len], b0 * BLOCK)?;
                    } else {
                        // Mostly holes: only the blocks with data are read.
                        buf[..len].fill(0);
                        for j in (0..part.len()).filter(|&j| present(j)) {
                            let at = j * BLOCK as usize;
                            file.read_exact_at(
                                &mut buf[at..at + BLOCK as usize],
                                (b0 + j as u64) * BLOCK,
                            )?;
                        }
                    }
                    for (j, d) in part.iter_mut().enumerate() {
                        let s = j * BLOCK as usize;
                        *d = block_digest(b0 + j as u64, &buf[s..s + BLOCK as usize]);
                    }
                }
                Ok(())
            }));
        }
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("digest thread panicked")))
        })
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, bytes: u64) -> PathBuf {
        let p = dir.join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(bytes).unwrap();
        p
    }

    #[test]
    fn a_sparse_image_digests_as_if_every_block_were_read() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let p = image(t.path(), 64 << 20);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        for (b, v) in [(0u64, 1u8), (300, 2), (8191, 3), (16383, 4)] {
            f.write_all_at(&[v; 4096], b * BLOCK).unwrap();
        }
        drop(f);
        let d = Disk::open(&p).unwrap();
        let data = std::fs::read(&p).unwrap();
        for (b, c) in data.chunks(BLOCK as usize).enumerate() {
            assert_eq!(d.digest(b as u64), block_digest(b as u64, c), "block {b}");
        }
    }

    #[test]
    fn refuses_missing_odd_sized_and_non_files() {
        let t = tempfile::tempdir().unwrap();
        let e = Disk::open(&t.path().join("nope")).unwrap_err();
        assert!(matches!(e, DiskError::Missing(_)), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
        let e = Disk::open(t.path()).unwrap_err();
        assert!(matches!(e, DiskError::NotFileOrDevice(_)), "{e}");
        let p = image(t.path(), 0);
        let e = Disk::open(&p).unwrap_err();
        assert!(e.to_string().contains("size 0 bytes"), "{e}");
        std::fs::remove_file(&p).unwrap();
        let p = image(t.path(), 4096 * 3 + 512);
        assert!(matches!(
            Disk::open(&p).unwrap_err(),
            DiskError::BadSize { bytes: 12800, .. }
        ));
        std::fs::remove_file(&p).unwrap();
        let p = image(t.path(), 1 << 20);
        let d = Disk::open(&p).unwrap();
        assert_eq!((d.bytes(), d.blocks()), (1 << 20, 256));
        d.require(1 << 20).unwrap();
        let e = d.require(2 << 20).unwrap_err();
        assert!(
            e.to_string()
                .contains("too small: 1048576 bytes, need 2097152"),
            "{e}"
        );
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_lives() {
        let t = tempfile::tempdir().unwrap();
        let p = image(t.path(), 64 << 10);
        let d = Disk::open(&p).unwrap();
        let e = Disk::open(&p).unwrap_err();
        assert!(matches!(e, DiskError::Locked(_)), "{e}");
        assert!(
            e.to_string().contains("already opened by another castor"),
            "{e}"
        );
        drop(d);
        Disk::open(&p).unwrap();
    }

    /// Tests run as root, who may open a 0444 file for writing: an immutable
    /// file (`chattr +i`) is refused to root too.
    #[test]
    fn a_read_only_image_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = image(t.path(), 64 << 10);
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&p)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: chattr +i is not available here");
            return;
        }
        let r = Disk::open(&p);
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&p)
            .status();
        let e = r.unwrap_err();
        assert!(matches!(e, DiskError::ReadOnly { .. }), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
    }

    #[test]
    fn digests_follow_unaligned_writes() {
        let t = tempfile::tempdir().unwrap();
        let p = image(t.path(), 16 * BLOCK);
        // Content before the open: the table is computed from the file.
        std::fs::write(&p, vec![7u8; 16 * BLOCK as usize]).unwrap();
        let d = Disk::open(&p).unwrap();
        let truth = |d: &Disk| {
            let all = std::fs::read(&p).unwrap();
            let ds: Vec<u64> = all
                .chunks(BLOCK as usize)
                .enumerate()
                .map(|(b, c)| block_digest(b as u64, c))
                .collect();
            assert_eq!(d.digests(), ds);
            assert_eq!(d.sum(), ds.iter().fold(0u64, |a, x| a.wrapping_add(*x)));
        };
        truth(&d);
        // Same content in two blocks digests differently.
        assert_ne!(d.digest(0), d.digest(1));
        d.write_at(100, &[1u8; 10]).unwrap();
        truth(&d);
        d.write_at(BLOCK - 3, &[2u8; 2 * BLOCK as usize + 7])
            .unwrap();
        truth(&d);
        d.write_block(9, &[3u8; 4096]).unwrap();
        truth(&d);
        d.write_at(15 * BLOCK, &[4u8; 4096]).unwrap();
        truth(&d);
        let mut b = [0u8; 4096];
        d.read_block(9, &mut b).unwrap();
        assert_eq!(b, [3u8; 4096]);
        assert!(d.write_at(16 * BLOCK - 1, &[0u8; 2]).is_err());
        assert!(d.read_block(16, &mut b).is_err());
        truth(&d);
        d.sync().unwrap();
    }
}
