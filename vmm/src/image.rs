//! A VM's image on a node: its guest RAM in a file that outlives the castor
//! process (on tmpfs, `/dev/shm/castor` by default), and beside it a table of
//! per-page generations.
//!
//! A node whose process died, or that was fenced, still holds the VM's last
//! image; when it becomes the VM's backup again it offers the image, and the
//! primary sends only the pages that differ (see `docs/design.md`, "Memory
//! reuse"). Files of one VM on one node:
//!
//! ```text
//! DIR/VM/NODE.ram   the RAM, MAP_SHARED (castor's layout: low RAM, then high)
//! DIR/VM/NODE.gen   header (64 bytes) + one u64 generation tag per page
//! ```
//!
//! # Generations
//! A page's tag names the checkpoint that last carried it: both sides of a
//! pair compute it from the session and the epoch ([`tag`]), the primary
//! when it sends a page, the backup when it commits it. Equal tags mean equal
//! contents as far as castor's records go; tag 0 means "unknown". The table
//! cannot know of changes made after its last update (the epoch a primary
//! was running when it died, a byte changed behind castor's back): the
//! header's `clean` flag says whether the image is exactly as the table
//! describes, and a primary checks every page it does not resend against a
//! digest of the backup's copy ([`page_digests`]) before the pair counts as
//! protected.
//!
//! The files are created mode 0600 in a directory of mode 0700. Anything
//! else that writes them while castor runs breaks castor's assumptions about
//! its RAM (see [`crate::memory::with_ram_mut`]); what was changed while no
//! castor ran is found by the digests.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, FileOffset, GuestAddress};

use crate::memory::{self, GuestMem, MemoryError, PAGE_SIZE};

const MAGIC: [u8; 8] = *b"CASTORGN";
const VERSION: u64 = 1;
const HEADER: u64 = 64;
/// Default directory of images.
pub const DEFAULT_DIR: &str = "/dev/shm/castor";

/// Errors of images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file could not be opened, created or sized.
    #[error("{}: {err}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// The file is not what castor wrote.
    #[error("{}: {why}", path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A name that cannot be a file name.
    #[error("bad name '{0}' for an image file (letters, digits, '-', '_' and '.', not starting with '.')")]
    BadName(String),
}

/// The tag of the checkpoint `epoch` of session `session` (never 0).
pub fn tag(session: u64, epoch: u64) -> u64 {
    let t = xxhash_rust::xxh3::xxh3_64_with_seed(&epoch.to_le_bytes(), session);
    t.max(1)
}

/// One 64-bit digest per page of `ram` (xxh3, ~40 ms a GiB here).
pub fn page_digests(ram: &[u8]) -> Vec<u64> {
    ram.chunks(PAGE_SIZE as usize)
        .map(xxhash_rust::xxh3::xxh3_64)
        .collect()
}

/// The digest of one page, as [`page_digests`] computes it.
pub fn page_digest(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Where a VM's image lives on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePaths {
    /// The RAM file.
    pub ram: PathBuf,
    /// The generation table.
    pub gen: PathBuf,
}

fn check_name(n: &str) -> Result<(), ImageError> {
    let ok = !n.is_empty()
        && !n.starts_with('.')
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(n.to_string()))
    }
}

impl ImagePaths {
    /// The image of VM `vm` on node `node` under `dir`.
    pub fn new(dir: &Path, vm: &str, node: &str) -> Result<ImagePaths, ImageError> {
        check_name(vm)?;
        check_name(node)?;
        let d = dir.join(vm);
        Ok(ImagePaths {
            ram: d.join(format!("{node}.ram")),
            gen: d.join(format!("{node}.gen")),
        })
    }

    /// Whether both files exist.
    pub fn exists(&self) -> bool {
        self.ram.exists() && self.gen.exists()
    }

    /// Removes both files (the VM was destroyed on purpose).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.ram);
        let _ = std::fs::remove_file(&self.gen);
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ImageError + '_ {
    move |err| ImageError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn open_file(path: &Path, size: u64, keep: bool) -> Result<(File, bool), ImageError> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    let kept = keep && len == size;
    if !kept {
        f.set_len(0).map_err(io(path))?;
        f.set_len(size).map_err(io(path))?;
    }
    Ok((f, kept))
}

/// Guest RAM of `size` bytes in castor's layout, in the file `path`: its
/// contents kept if `keep` and the file has that size (returned true), else
/// zeroed.
pub fn ram_in_file(path: &Path, size: u64, keep: bool) -> Result<(GuestMem, bool), ImageError> {
    let layout = memory::layout(size)?;
    let (file, kept) = open_file(path, size, keep)?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in layout {
        let f = file.try_clone().map_err(io(path))?;
        ranges.push((addr, len, Some(FileOffset::new(f, offset))));
        offset += len as u64;
    }
    let mem = GuestMem::from_ranges_with_files(&ranges).map_err(MemoryError::from)?;
    Ok((mem, kept))
}

/// The header of a generation table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenHeader {
    /// Pages described.
    pub pages: u64,
    /// The RAM file holds exactly what the tags say (a replica between
    /// commits); false while a guest runs on it or a commit is applied.
    pub clean: bool,
    /// The session of the last checkpoint recorded.
    pub session: u64,
    /// Its epoch.
    pub epoch: u64,
}

/// A table of per-page generation tags in a file.
pub struct GenTable {
    map: vm_memory::GuestMemoryMmap<()>,
    pages: u64,
    path: PathBuf,
}

impl std::fmt::Debug for GenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenTable")
            .field("path", &self.path)
            .field("pages", &self.pages)
            .finish()
    }
}

impl GenTable {
    /// A table for `pages` pages in this process's memory only (a node
    /// without an image directory: its replica or guest can still be reused
    /// while the process lives), every tag 0.
    pub fn in_memory(pages: u64) -> GenTable {
        let size = HEADER + 8 * pages;
        let map =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
                .expect("mapping anonymous memory for a generation table");
        let t = GenTable {
            map,
            pages,
            path: PathBuf::from("(memory)"),
        };
        t.write_u64(0, u64::from_le_bytes(MAGIC));
        t.write_u64(8, VERSION);
        t.write_u64(16, pages);
        t
    }

    /// The table for `pages` pages in `path`: the existing one if `keep` and
    /// it is valid for that many pages (returned true), else a new one with
    /// every tag 0 (unknown).
    pub fn open(path: &Path, pages: u64, keep: bool) -> Result<(GenTable, bool), ImageError> {
        let size = HEADER + 8 * pages;
        let (file, kept) = open_file(path, size, keep)?;
        let map = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| ImageError::Bad {
            path: path.to_path_buf(),
            why: format!("cannot map it: {e}"),
        })?;
        let t = GenTable {
            map,
            pages,
            path: path.to_path_buf(),
        };
        let valid = kept && t.read_header().is_ok();
        if !valid {
            t.write_u64(0, u64::from_le_bytes(MAGIC));
            t.write_u64(8, VERSION);
            t.write_u64(16, pages);
            t.set_header(false, 0, 0);
            // Every tag unknown: a file of the right size kept with a bad
            // or old header may still hold tags of another history.
            t.set_all(0);
        }
        Ok((t, valid))
    }

    fn write_u64(&self, at: u64, v: u64) {
        self.map
            .write_obj(v, GuestAddress(at))
            .expect("inside the table's mapping");
    }

    fn read_u64(&self, at: u64) -> u64 {
        self.map
            .read_obj(GuestAddress(at))
            .expect("inside the table's mapping")
    }

    fn read_header(&self) -> Result<GenHeader, ImageError> {
        let bad = |why: String| ImageError::Bad {
            path: self.path.clone(),
            why,
        };
        if self.read_u64(0) != u64::from_le_bytes(MAGIC) {
            return Err(bad("not a castor generation table (bad magic)".into()));
        }
        if self.read_u64(8) != VERSION {
            return Err(bad(format!(
                "version {} (this castor reads 1)",
                self.read_u64(8)
            )));
        }
        let pages = self.read_u64(16);
        if pages != self.pages {
            return Err(bad(format!("{pages} pages, expected {}", self.pages)));
        }
        Ok(GenHeader {
            pages,
            clean: self.read_u64(24) == 1,
            session: self.read_u64(32),
            epoch: self.read_u64(40),
        })
    }

    /// The header.
    pub fn header(&self) -> GenHeader {
        self.read_header().unwrap_or(GenHeader {
            pages: self.pages,
            clean: false,
            session: 0,
            epoch: 0,
        })
    }

    /// Records whether the image is exactly as described, and the last
    /// checkpoint recorded.
    pub fn set_header(&self, clean: bool, session: u64, epoch: u64) {
        self.write_u64(24, 0);
        self.write_u64(32, session);
        self.write_u64(40, epoch);
        self.write_u64(24, clean as u64);
    }

    /// Pages described.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The tag of page `p` (0 beyond the table).
    pub fn get(&self, p: u64) -> u64 {
        if p >= self.pages {
            return 0;
        }
        self.read_u64(HEADER + 8 * p)
    }

    /// Sets the tag of page `p` (ignored beyond the table).
    pub fn set(&self, p: u64, tag: u64) {
        if p < self.pages {
            self.write_u64(HEADER + 8 * p, tag);
        }
    }

    /// Sets every tag.
    pub fn set_all(&self, tag: u64) {
        let chunk: Vec<u8> = std::iter::repeat_n(tag.to_le_bytes(), 4096)
            .flatten()
            .collect();
        let mut p = 0;
        while p < self.pages {
            let n = (self.pages - p).min(4096);
            self.map
                .write_slice(&chunk[..n as usize * 8], GuestAddress(HEADER + 8 * p))
                .expect("inside the table's mapping");
            p += n;
        }
    }

    /// Every tag, in page order.
    pub fn tags(&self) -> Vec<u64> {
        let mut bytes = vec![0u8; self.pages as usize * 8];
        self.map
            .read_slice(&mut bytes, GuestAddress(HEADER))
            .expect("inside the table's mapping");
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn ram_and_tags_outlive_their_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let p = ImagePaths::new(dir.path(), "vm1", "node-a").unwrap();
        let size = 16 << 20;
        {
            let (mem, kept) = ram_in_file(&p.ram, size, true).unwrap();
            assert!(!kept);
            mem.write_obj(0xABCDu64, GuestAddress(0x5000)).unwrap();
            let (g, kept) =
                GenTable::open(&p.gen, crate::memory::ram_size(&mem) / PAGE_SIZE, true).unwrap();
            assert!(!kept);
            assert_eq!(g.get(5), 0);
            g.set_all(7);
            g.set(5, tag(1, 2));
            g.set_header(true, 1, 2);
        }
        let (mem, kept) = ram_in_file(&p.ram, size, true).unwrap();
        assert!(kept);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0xABCD);
        let (g, kept) = GenTable::open(&p.gen, 4096, true).unwrap();
        assert!(kept);
        assert_eq!(g.get(5), tag(1, 2));
        assert_eq!(g.get(6), 7);
        assert_eq!(
            g.header(),
            GenHeader {
                pages: 4096,
                clean: true,
                session: 1,
                epoch: 2
            }
        );
        // Another size: a fresh, zeroed image.
        drop(mem);
        let (mem, kept) = ram_in_file(&p.ram, 32 << 20, true).unwrap();
        assert!(!kept);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0);
        let (_, kept) = GenTable::open(&p.gen, 8192, true).unwrap();
        assert!(!kept);
        assert!(mem.num_regions() == 1);
    }

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        for n in ["", ".hidden", "a/b", "a b", "../x"] {
            assert!(ImagePaths::new(Path::new("/tmp"), n, "a").is_err(), "{n}");
        }
    }

    #[test]
    fn tags_differ_by_session_and_epoch() {
        assert_ne!(tag(1, 2), tag(1, 3));
        assert_ne!(tag(1, 2), tag(2, 2));
        assert_ne!(tag(0, 0), 0);
        let d = page_digests(&[0u8; 8192]);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], d[1]);
        assert_eq!(d[0], page_digest(&[0u8; 4096]));
    }
}
