//! A snapshot on disk: a directory with the machine state and guest RAM.
//!
//! - `memory.bin`: guest RAM, regions in address order, raw (all-zero pages
//!   are left as holes: a sparse file), followed by a [`TRAILER_LEN`]-byte
//!   trailer: magic `CASTRAM1`, the RAM size, the blake3 digest of the RAM
//!   bytes, and a CRC-32 of the trailer.
//! - `state.bin`: a [`HEADER_LEN`]-byte header — magic `CASTSNAP`, format
//!   version, the RAM size and the blake3 digest of the RAM, and a CRC-32 of
//!   the header — then the encoded [`MachineState`] (its own magic, version,
//!   length and CRC).
//!
//! The RAM digest ties the two files together: it is the snapshot's
//! identifier. Restoring checks that `memory.bin`'s trailer names the RAM
//! `state.bin` describes (else the two files come from different snapshots),
//! then hashes the RAM while loading it and refuses it unless it matches (a
//! damaged `memory.bin`). The RAM digest is plain blake3 of the first
//! `RAM size` bytes of `memory.bin`, so `head -c SIZE memory.bin | b3sum`
//! computes it too.
//!
//! Writing is atomic and durable, in this order: `memory.bin` and
//! `state.bin` are written to temporary names and fsynced; an existing
//! `state.bin` is removed and the directory fsynced (from here the directory
//! is not a snapshot); the new `memory.bin` is renamed into place and the
//! directory fsynced; then `state.bin` (the commit point) and the directory
//! once more. So after a crash at any point, a `state.bin` is either absent or
//! beside the complete, durable `memory.bin` it describes — never beside a
//! half-written or another snapshot's one. (An interrupted rewrite loses the
//! old snapshot; the temporary files it leaves are named in the error.)

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMem, PAGE_SIZE};
use crate::state::{MachineState, StateError};

/// File name of the machine state.
pub const STATE_FILE: &str = "state.bin";
/// File name of guest RAM.
pub const MEMORY_FILE: &str = "memory.bin";
/// Magic of `state.bin`'s header.
pub const STATE_MAGIC: [u8; 8] = *b"CASTSNAP";
/// Version of the snapshot format (the header and the trailer).
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of `state.bin`'s header.
pub const HEADER_LEN: usize = 56;
/// Magic of `memory.bin`'s trailer.
pub const MEMORY_MAGIC: [u8; 8] = *b"CASTRAM1";
/// Bytes of `memory.bin`'s trailer.
pub const TRAILER_LEN: usize = 64;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system error on a named file.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        err: std::io::Error,
    },
    /// The directory has no state file.
    #[error(
        "{dir} is not a castor snapshot (no {STATE_FILE}); take one with `castor run --snapshot-at`{hint}"
    )]
    NotASnapshot {
        /// The directory.
        dir: PathBuf,
        /// Empty, or why there is no state file.
        hint: &'static str,
    },
    /// The state file is damaged.
    #[error("{path}: {err}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        err: StateError,
    },
    /// The state file's snapshot header is damaged or missing.
    #[error("{path}: {what}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// memory.bin is shorter than the RAM the state describes.
    #[error("{path} is truncated: it holds {found} bytes, the snapshot's RAM and trailer are {expected} bytes")]
    MemoryTruncated {
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// RAM size plus the trailer.
        expected: u64,
    },
    /// memory.bin's trailer is missing or damaged.
    #[error("{path}: {what}")]
    MemoryTrailer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// memory.bin belongs to another snapshot than state.bin.
    #[error("{memory} belongs to another snapshot than {state}: {what}; the two files must come from the same snapshot")]
    Mixed {
        /// memory.bin.
        memory: PathBuf,
        /// state.bin.
        state: PathBuf,
        /// How they differ.
        what: String,
    },
    /// memory.bin's RAM does not hash to the digest both files record.
    #[error("{path} is corrupted: its RAM hashes to blake3 {found}, but the snapshot recorded {expected}")]
    MemoryCorrupt {
        /// The file.
        path: PathBuf,
        /// What the RAM hashes to (hex, first 16 bytes).
        found: String,
        /// What the snapshot recorded (hex, first 16 bytes).
        expected: String,
    },
    /// Reading guest memory failed.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn hex16(d: &[u8; 32]) -> String {
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn tmp_name(file: &str) -> String {
    format!(".{file}.tmp")
}

/// Creates `path` afresh (a stale temporary file is removed first).
fn create_fresh(path: &Path) -> Result<File, SnapshotError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io(path)(err)),
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))
}

/// `state.bin`'s header.
fn header(ram: u64, digest: &[u8; 32]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&STATE_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&ram.to_le_bytes());
    h[20..52].copy_from_slice(digest);
    let crc = crc32fast::hash(&h[..52]);
    h[52..56].copy_from_slice(&crc.to_le_bytes());
    h
}

/// `memory.bin`'s trailer.
fn trailer(ram: u64, digest: &[u8; 32]) -> [u8; TRAILER_LEN] {
    let mut t = [0u8; TRAILER_LEN];
    t[..8].copy_from_slice(&MEMORY_MAGIC);
    t[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    t[16..24].copy_from_slice(&ram.to_le_bytes());
    t[24..56].copy_from_slice(digest);
    let crc = crc32fast::hash(&t[..56]);
    t[56..60].copy_from_slice(&crc.to_le_bytes());
    t
}

/// The RAM size and digest in a header or trailer whose magic, version and
/// CRC (over `crc_at` bytes) are right; otherwise what is wrong.
fn parse_tag(
    b: &[u8],
    magic: &[u8; 8],
    ram_at: usize,
    crc_at: usize,
) -> Result<(u64, [u8; 32]), String> {
    if b[..8] != *magic {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(b[crc_at..crc_at + 4].try_into().unwrap());
    if crc != crc32fast::hash(&b[..crc_at]) {
        return Err("checksum mismatch (damaged)".into());
    }
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(format!(
            "snapshot format version {version}; this castor reads version {FORMAT_VERSION}"
        ));
    }
    let ram = u64::from_le_bytes(b[ram_at..ram_at + 8].try_into().unwrap());
    let digest = b[ram_at + 8..ram_at + 40].try_into().unwrap();
    Ok((ram, digest))
}

/// Writes `state` and the contents of `mem` into `dir` (created if missing),
/// atomically and durably (see the module documentation for the order).
pub fn write(dir: &Path, state: &MachineState, mem: &GuestMem) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_tmp = dir.join(tmp_name(MEMORY_FILE));
    let mut f = create_fresh(&mem_tmp)?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    for r in mem.iter() {
        let (start, len) = (r.start_addr().0, r.len());
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            mem.read_slice(&mut page, GuestAddress(start + off))?;
            hasher.update(&page);
            if page.iter().any(|&b| b != 0) {
                f.seek(SeekFrom::Start(pos)).map_err(io(&mem_tmp))?;
                f.write_all(&page).map_err(io(&mem_tmp))?;
            }
            pos += PAGE_SIZE;
        }
    }
    let digest: [u8; 32] = *hasher.finalize().as_bytes();
    f.seek(SeekFrom::Start(pos)).map_err(io(&mem_tmp))?;
    f.write_all(&trailer(pos, &digest)).map_err(io(&mem_tmp))?;
    f.sync_all().map_err(io(&mem_tmp))?;
    drop(f);

    let state_tmp = dir.join(tmp_name(STATE_FILE));
    let mut f = create_fresh(&state_tmp)?;
    f.write_all(&header(pos, &digest))
        .and_then(|()| f.write_all(&state.encode()))
        .and_then(|()| f.sync_all())
        .map_err(io(&state_tmp))?;
    drop(f);

    let state_path = dir.join(STATE_FILE);
    match fs::remove_file(&state_path) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io(&state_path)(err)),
    }
    let mem_path = dir.join(MEMORY_FILE);
    fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;
    sync_dir(dir)?;
    fs::rename(&state_tmp, &state_path).map_err(io(&state_path))?;
    sync_dir(dir)
}

/// A snapshot on disk whose files belong together: its machine state is
/// decoded and checked, and `memory.bin` is the right size and names the same
/// RAM. The RAM itself is checked against its digest by
/// [`Snapshot::fill_memory`], while it is loaded.
#[derive(Debug)]
pub struct Snapshot {
    /// The machine state.
    pub state: MachineState,
    /// The blake3 digest of the RAM: the snapshot's identifier.
    pub memory_digest: [u8; 32],
    dir: PathBuf,
}

impl Snapshot {
    /// Opens the snapshot in `dir`: reads and validates `state.bin`, and
    /// checks that `memory.bin` is complete and belongs to it.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let interrupted = dir.join(tmp_name(STATE_FILE)).exists()
                    || dir.join(tmp_name(MEMORY_FILE)).exists();
                return Err(SnapshotError::NotASnapshot {
                    dir: dir.to_path_buf(),
                    hint: if interrupted {
                        "; it holds the temporary files of an interrupted snapshot write"
                    } else {
                        ""
                    },
                });
            }
            Err(err) => return Err(SnapshotError::Io { path, err }),
        };
        let header_err = |what: String| SnapshotError::Header {
            path: path.clone(),
            what,
        };
        if bytes.len() >= 8 && bytes[..8] == crate::state::MAGIC {
            return Err(header_err(
                "written by an older castor: no RAM digest, so its memory.bin cannot be checked; \
                 take a new snapshot"
                    .into(),
            ));
        }
        if bytes.len() < HEADER_LEN {
            return Err(header_err(format!(
                "truncated: {} bytes, shorter than the {HEADER_LEN}-byte snapshot header",
                bytes.len()
            )));
        }
        let (ram, digest) = parse_tag(&bytes[..HEADER_LEN], &STATE_MAGIC, 12, 52)
            .map_err(|what| header_err(format!("snapshot header: {what}")))?;
        let state =
            MachineState::decode(&bytes[HEADER_LEN..]).map_err(|err| SnapshotError::State {
                path: path.clone(),
                err,
            })?;
        if ram != state.memory_size() {
            return Err(header_err(format!(
                "the header records {ram} bytes of RAM, the machine state {}",
                state.memory_size()
            )));
        }

        let mem_path = dir.join(MEMORY_FILE);
        let mut f = File::open(&mem_path).map_err(io(&mem_path))?;
        let found = f.metadata().map_err(io(&mem_path))?.len();
        let expected = ram + TRAILER_LEN as u64;
        let mut t = [0u8; TRAILER_LEN];
        let tag = if found >= TRAILER_LEN as u64 {
            f.seek(SeekFrom::Start(found - TRAILER_LEN as u64))
                .and_then(|_| f.read_exact(&mut t))
                .map_err(io(&mem_path))?;
            parse_tag(&t, &MEMORY_MAGIC, 16, 56)
        } else {
            Err("too short".into())
        };
        match tag {
            Ok((their_ram, their_digest)) => {
                if their_ram != ram || their_digest != digest {
                    return Err(SnapshotError::Mixed {
                        memory: mem_path,
                        state: path,
                        what: if their_ram != ram {
                            format!("it holds {their_ram} bytes of RAM, the state describes {ram}")
                        } else {
                            format!(
                                "it holds RAM with blake3 {}, the state expects {}",
                                hex16(&their_digest),
                                hex16(&digest)
                            )
                        },
                    });
                }
                if found != expected {
                    return Err(SnapshotError::MemoryTrailer {
                        path: mem_path,
                        what: format!("{found} bytes, expected {expected}: damaged"),
                    });
                }
            }
            Err(_) if found < expected => {
                return Err(SnapshotError::MemoryTruncated {
                    path: mem_path,
                    found,
                    expected,
                })
            }
            Err(what) => {
                return Err(SnapshotError::MemoryTrailer {
                    path: mem_path,
                    what: format!(
                        "no valid snapshot trailer ({what}): damaged, or not a castor memory.bin"
                    ),
                })
            }
        }
        Ok(Snapshot {
            state,
            memory_digest: digest,
            dir: dir.to_path_buf(),
        })
    }

    /// Copies the snapshot's RAM into `mem` (whose layout matches the state),
    /// hashing it on the way; refuses it unless it matches the digest the
    /// snapshot recorded. Pages that are all zero are not written (fresh
    /// guest memory is zero).
    pub fn fill_memory(&self, mem: &GuestMem) -> Result<(), SnapshotError> {
        let path = self.dir.join(MEMORY_FILE);
        let mut f = File::open(&path).map_err(io(&path))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for r in mem.iter() {
            let (start, len) = (r.start_addr().0, r.len());
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                f.read_exact(&mut buf[..n]).map_err(|err| {
                    if err.kind() == std::io::ErrorKind::UnexpectedEof {
                        SnapshotError::MemoryTruncated {
                            path: path.clone(),
                            found: f.metadata().map_or(0, |m| m.len()),
                            expected: self.state.memory_size() + TRAILER_LEN as u64,
                        }
                    } else {
                        io(&path)(err)
                    }
                })?;
                hasher.update(&buf[..n]);
                for (i, page) in buf[..n].chunks(PAGE_SIZE as usize).enumerate() {
                    if page.iter().any(|&b| b != 0) {
                        let at = start + off + (i as u64) * PAGE_SIZE;
                        mem.write_slice(page, GuestAddress(at))?;
                    }
                }
                off += n as u64;
            }
        }
        let found: [u8; 32] = *hasher.finalize().as_bytes();
        if found != self.memory_digest {
            return Err(SnapshotError::MemoryCorrupt {
                path,
                found: hex16(&found),
                expected: hex16(&self.memory_digest),
            });
        }
        Ok(())
    }
}

/// Reads and validates the machine state of the snapshot in `dir`, and checks
/// that its memory file is complete and belongs to it ([`Snapshot::open`]).
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    Snapshot::open(dir).map(|s| s.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    /// 64 MiB of guest memory (the sample state's size), a few pages written
    /// with `seed` and the rest left zero.
    fn guest(seed: u8) -> GuestMem {
        let mem = memory::create(64 << 20).unwrap();
        for p in [0u64, 1, 100, 5000, 16383] {
            let page: Vec<u8> = (0..PAGE_SIZE)
                .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(p as u8))
                .collect();
            mem.write_slice(&page, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        mem
    }

    fn ram(mem: &GuestMem) -> Vec<u8> {
        let mut v = vec![0u8; 64 << 20];
        mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    fn snapshot(dir: &Path, seed: u8) -> GuestMem {
        let mem = guest(seed);
        write(dir, &crate::state::tests::sample(), &mem).unwrap();
        mem
    }

    fn restore_err(dir: &Path) -> String {
        match Snapshot::open(dir) {
            Err(e) => e.to_string(),
            Ok(s) => s
                .fill_memory(&memory::create(64 << 20).unwrap())
                .expect_err("a damaged snapshot was restored")
                .to_string(),
        }
    }

    fn copy(from: &Path, to: &Path, file: &str) {
        fs::create_dir_all(to).unwrap();
        fs::copy(from.join(file), to.join(file)).unwrap();
    }

    #[test]
    fn a_snapshot_restores_exactly_and_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        let mem = snapshot(&dir, 3);
        // Rewritten in place with other contents: the new one is read.
        let mem = {
            let _ = mem;
            snapshot(&dir, 7)
        };
        let snap = Snapshot::open(&dir).unwrap();
        assert_eq!(snap.state.encode(), crate::state::tests::sample().encode());
        let restored = memory::create(64 << 20).unwrap();
        snap.fill_memory(&restored).unwrap();
        assert!(ram(&restored) == ram(&mem), "restored RAM differs");
        assert_eq!(snap.memory_digest, *blake3::hash(&ram(&mem)).as_bytes());
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, [MEMORY_FILE, STATE_FILE]);
        let len = fs::metadata(dir.join(MEMORY_FILE)).unwrap().len();
        assert_eq!(len, (64 << 20) + TRAILER_LEN as u64);
    }

    #[test]
    fn mixed_snapshots_are_refused_naming_both_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, mixed) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("mixed"),
        );
        snapshot(&a, 3);
        snapshot(&b, 5);
        copy(&a, &mixed, STATE_FILE);
        copy(&b, &mixed, MEMORY_FILE);
        let e = restore_err(&mixed);
        assert!(
            e.contains("memory.bin belongs to another snapshot than")
                && e.contains("state.bin")
                && e.contains("blake3"),
            "{e}"
        );
        // And the other way round.
        copy(&b, &mixed, STATE_FILE);
        copy(&a, &mixed, MEMORY_FILE);
        assert!(restore_err(&mixed).contains("belongs to another snapshot"));
    }

    #[test]
    fn truncated_or_corrupted_memory_is_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        snapshot(&good, 3);
        let mem = fs::read(good.join(MEMORY_FILE)).unwrap();
        let bad = tmp.path().join("bad");
        copy(&good, &bad, STATE_FILE);
        let n = mem.len();
        for cut in [0, 1000, n / 2, n - TRAILER_LEN - 1, n - TRAILER_LEN, n - 1] {
            fs::write(bad.join(MEMORY_FILE), &mem[..cut]).unwrap();
            let e = restore_err(&bad);
            assert!(
                e.contains("memory.bin is truncated") && e.contains(&format!("holds {cut} bytes")),
                "cut at {cut}: {e}"
            );
        }
        // A flipped bit in a written page, and in a page that was a hole.
        for at in [100 * PAGE_SIZE as usize + 17, 7 * PAGE_SIZE as usize] {
            let mut m = mem.clone();
            m[at] ^= 1;
            fs::write(bad.join(MEMORY_FILE), &m).unwrap();
            let e = restore_err(&bad);
            assert!(
                e.contains("memory.bin is corrupted") && e.contains("hashes to blake3"),
                "{e}"
            );
        }
        // A damaged trailer.
        let mut m = mem.clone();
        m[n - 20] ^= 1;
        fs::write(bad.join(MEMORY_FILE), &m).unwrap();
        let e = restore_err(&bad);
        assert!(
            e.contains("memory.bin: no valid snapshot trailer") && e.contains("checksum"),
            "{e}"
        );
        // Missing.
        fs::remove_file(bad.join(MEMORY_FILE)).unwrap();
        let e = restore_err(&bad);
        assert!(
            e.contains("memory.bin") && e.contains("No such file"),
            "{e}"
        );
    }

    #[test]
    fn damaged_or_old_state_files_are_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        snapshot(&good, 3);
        let st = fs::read(good.join(STATE_FILE)).unwrap();
        let bad = tmp.path().join("bad");
        copy(&good, &bad, MEMORY_FILE);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (st[..10].to_vec(), "truncated"),
            (st[..HEADER_LEN + 20].to_vec(), "truncated"),
            (st[..st.len() - 1].to_vec(), "truncated"),
            (
                {
                    let mut s = st.clone();
                    s[30] ^= 1;
                    s
                },
                "snapshot header: checksum",
            ),
            (
                {
                    let mut s = st.clone();
                    let n = s.len();
                    s[HEADER_LEN + (n - HEADER_LEN) / 2] ^= 1;
                    s
                },
                "checksum",
            ),
            (
                crate::state::tests::sample().encode(),
                "written by an older castor",
            ),
            (
                b"hello world, not a snapshot at all!!!!!!!!!!!!!!!!!!!!!!!!".to_vec(),
                "bad magic",
            ),
        ];
        for (bytes, want) in cases {
            fs::write(bad.join(STATE_FILE), &bytes).unwrap();
            let e = restore_err(&bad);
            assert!(
                e.contains("state.bin") && e.contains(want),
                "want '{want}': {e}"
            );
        }
        // An interrupted write leaves no state.bin, and says so.
        fs::remove_file(bad.join(STATE_FILE)).unwrap();
        fs::write(bad.join(tmp_name(STATE_FILE)), &st).unwrap();
        let e = restore_err(&bad);
        assert!(
            e.contains("is not a castor snapshot") && e.contains("interrupted"),
            "{e}"
        );
    }
}
