//! The backup's disk: always at the last committed checkpoint, like its RAM.
//!
//! A checkpoint's disk blocks are staged with the rest of the checkpoint
//! (bounded by `protocol::staging_bound`, which counts the disk) and written
//! only when it commits, through a journal beside the disk file
//! (`DISK.castor-journal`):
//!
//! 1. the epoch's blocks, decoded, go to the journal in one write, behind a
//!    header (magic, session, epoch, count) and followed by a trailer
//!    (xxh3-64 of everything before it, then the same magic): a journal is
//!    complete only with its trailer;
//! 2. the blocks are written to the disk;
//! 3. the journal is emptied (truncated to zero).
//!
//! **Invariant: a backup killed at any moment of a commit comes back with a
//! disk at epoch k−1 or at k, never between.** Killed in step 1, the journal
//! is incomplete and the disk untouched (k−1): [`BackupDisk::open`] drops
//! the journal. Killed in step 2 or before step 3 finished, the journal is
//! complete: `open` writes it again (idempotent) and the disk is at k. A
//! journal is only ever written for the epoch after the one the disk is at,
//! and emptied before the next commit begins, so replaying it never rolls
//! the disk back.
//!
//! Durability: an epoch in which the guest completed a FLUSH
//! ([`protocol::disk::DiskCommit::flushed`]) is made durable before the ack:
//! journal and disk are fdatasynced. So when a flushed write's effects are
//! released to the world, both hosts have it on stable storage. Other
//! epochs stay in the page cache (a process kill loses nothing; a power
//! loss of the backup's host may lose them, and the next session's
//! digest-based resync puts them back).
//!
//! After every commit the disk's digest sum must equal the primary's at the
//! pause; if not (or a write failed), the replica is at no checkpoint and is
//! invalidated like a failed `--verify` (no takeover until a resync).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use protocol::disk::{DiskCommit, BLOCK};
use tracing::{info, warn};
use vmm::disk::Disk;

const MAGIC: &[u8; 8] = b"CSTRJNL1";
type Block = Box<[u8; BLOCK]>;
const HEADER: usize = 8 + 8 + 8 + 8;
const TRAILER: usize = 8 + 8;

/// Why a checkpoint's disk part was not applied.
#[derive(Debug, thiserror::Error)]
pub enum DiskApplyError {
    /// The records are malformed: nothing was written.
    #[error("{0}; the disk is unchanged")]
    Records(#[from] protocol::disk::DiskError),
    /// Writing the journal failed: nothing was written to the disk.
    #[error("writing the disk's journal {path}: {err}; the disk is unchanged")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// Writing the disk failed part-way: it is at no checkpoint.
    #[error("writing block {block} of the disk {path}: {err}")]
    Write {
        /// The disk.
        path: PathBuf,
        /// The block.
        block: u64,
        /// The error.
        err: std::io::Error,
    },
    /// The disk does not equal the primary's after the checkpoint.
    #[error("the disk's digest sum after checkpoint {epoch} is {ours:#018x}, the primary's {theirs:#018x}: the disk differs from the primary's")]
    Mismatch {
        /// The epoch.
        epoch: u64,
        /// This node's sum.
        ours: u64,
        /// The primary's.
        theirs: u64,
    },
}

impl DiskApplyError {
    /// The disk was written (or found different): it is at no checkpoint.
    pub fn disk_touched(&self) -> bool {
        matches!(
            self,
            DiskApplyError::Write { .. } | DiskApplyError::Mismatch { .. }
        )
    }
}

/// The backup's disk and its journal.
#[derive(Debug)]
pub struct BackupDisk {
    disk: Arc<Disk>,
    journal_path: PathBuf,
    journal: File,
}

/// The journal's path for a disk file.
pub fn journal_path(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".castor-journal");
    PathBuf::from(p)
}

/// What [`BackupDisk::open`] found in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// No journal, or an empty one: the last commit had finished.
    Clean,
    /// A complete journal of this epoch, written again: the disk is at it.
    Replayed {
        /// The journal's epoch.
        epoch: u64,
        /// Its blocks.
        blocks: u64,
    },
    /// An incomplete journal of this epoch, dropped: the disk is at the
    /// epoch before.
    Dropped {
        /// The journal's epoch (0 if its header was cut too).
        epoch: u64,
    },
}

impl BackupDisk {
    /// Takes `disk` as the backup's disk, first finishing or dropping what
    /// a killed predecessor left in its journal.
    pub fn open(disk: Arc<Disk>) -> std::io::Result<(BackupDisk, Recovered)> {
        let journal_path = journal_path(disk.path());
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)?;
        let me = BackupDisk {
            disk,
            journal_path,
            journal,
        };
        let found = me.recover()?;
        match found {
            Recovered::Clean => {}
            Recovered::Replayed { epoch, blocks } => info!(
                journal = %me.journal_path.display(),
                epoch, blocks,
                "the disk's last commit was cut short after its journal was complete: written again, the disk is at that checkpoint"
            ),
            Recovered::Dropped { epoch } => warn!(
                journal = %me.journal_path.display(),
                epoch,
                "the disk's last commit was cut short while its journal was written: dropped, the disk is at the checkpoint before"
            ),
        }
        Ok((me, found))
    }

    fn recover(&self) -> std::io::Result<Recovered> {
        let len = self.journal.metadata()?.len();
        if len == 0 {
            return Ok(Recovered::Clean);
        }
        let mut buf = vec![0u8; len.min(1 << 40) as usize];
        self.journal.read_exact_at(&mut buf, 0)?;
        let epoch = if buf.len() >= HEADER && &buf[..8] == MAGIC {
            u64::from_le_bytes(buf[16..24].try_into().expect("8"))
        } else {
            0
        };
        match parse_journal(&buf, self.disk.blocks()) {
            Some((epoch, blocks)) => {
                for (b, data) in &blocks {
                    self.disk.write_block(*b, data)?;
                }
                self.disk.sync()?;
                self.clear()?;
                Ok(Recovered::Replayed {
                    epoch,
                    blocks: blocks.len() as u64,
                })
            }
            None => {
                self.clear()?;
                Ok(Recovered::Dropped { epoch })
            }
        }
    }

    fn clear(&self) -> std::io::Result<()> {
        self.journal.set_len(0)
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Applies checkpoint `epoch`'s disk records (of session `session`):
    /// all of them, or — on a malformed epoch or a journal that cannot be
    /// written — none. Then checks the disk's digest sum against the
    /// primary's. Returns the blocks written.
    pub fn apply(
        &self,
        session: u64,
        epoch: u64,
        records: &[u8],
        commit: DiskCommit,
    ) -> Result<u64, DiskApplyError> {
        let entries = protocol::disk::parse(records, self.disk.blocks())?;
        self.apply_parsed(session, epoch, &entries, commit)
    }

    /// [`BackupDisk::apply`] of records already parsed (and so validated)
    /// for this disk.
    pub fn apply_parsed(
        &self,
        session: u64,
        epoch: u64,
        entries: &[protocol::disk::Entry<'_>],
        commit: DiskCommit,
    ) -> Result<u64, DiskApplyError> {
        let t = Instant::now();
        if !entries.is_empty() {
            let mut j = Vec::with_capacity(HEADER + entries.len() * (8 + BLOCK) + TRAILER);
            j.extend_from_slice(MAGIC);
            j.extend_from_slice(&session.to_le_bytes());
            j.extend_from_slice(&epoch.to_le_bytes());
            j.extend_from_slice(&(entries.len() as u64).to_le_bytes());
            let mut block = [0u8; BLOCK];
            for e in entries {
                e.content(&mut block);
                j.extend_from_slice(&e.block.to_le_bytes());
                j.extend_from_slice(&block);
            }
            let sum = xxhash_rust::xxh3::xxh3_64(&j);
            j.extend_from_slice(&sum.to_le_bytes());
            j.extend_from_slice(MAGIC);
            let journal = |err| DiskApplyError::Journal {
                path: self.journal_path.clone(),
                err,
            };
            self.journal
                .set_len(0)
                .and_then(|()| self.journal.write_all_at(&j, 0))
                .map_err(journal)?;
            if commit.flushed {
                self.journal.sync_data().map_err(journal)?;
            }
            for (i, e) in entries.iter().enumerate() {
                let at = HEADER + i * (8 + BLOCK) + 8;
                let data: &[u8; BLOCK] = j[at..at + BLOCK].try_into().expect("one block");
                self.disk
                    .write_block(e.block, data)
                    .map_err(|err| DiskApplyError::Write {
                        path: self.disk.path().to_path_buf(),
                        block: e.block,
                        err,
                    })?;
            }
            if commit.flushed {
                self.disk.sync().map_err(|err| DiskApplyError::Write {
                    path: self.disk.path().to_path_buf(),
                    block: entries[0].block,
                    err,
                })?;
            }
            self.clear().map_err(journal)?;
        }
        let ours = self.disk.sum();
        if ours != commit.sum {
            return Err(DiskApplyError::Mismatch {
                epoch,
                ours,
                theirs: commit.sum,
            });
        }
        tracing::trace!(
            epoch,
            blocks = entries.len(),
            us = t.elapsed().as_micros() as u64,
            "disk blocks committed"
        );
        Ok(entries.len() as u64)
    }
}

/// A complete journal's epoch and blocks, or `None` if it is incomplete or
/// damaged (cut short, a bad digest, a block beyond the disk).
fn parse_journal(buf: &[u8], disk_blocks: u64) -> Option<(u64, Vec<(u64, Block)>)> {
    if buf.len() < HEADER + TRAILER || &buf[..8] != MAGIC || &buf[buf.len() - 8..] != MAGIC {
        return None;
    }
    let body = &buf[..buf.len() - TRAILER];
    let sum = u64::from_le_bytes(buf[buf.len() - 16..buf.len() - 8].try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(body) != sum {
        return None;
    }
    let epoch = u64::from_le_bytes(body[16..24].try_into().ok()?);
    let count = u64::from_le_bytes(body[24..32].try_into().ok()?);
    if (body.len() - HEADER) as u64 != count.checked_mul(8 + BLOCK as u64)? {
        return None;
    }
    let mut out = Vec::with_capacity(count as usize);
    for rec in body[HEADER..].chunks_exact(8 + BLOCK) {
        let b = u64::from_le_bytes(rec[..8].try_into().ok()?);
        if b >= disk_blocks {
            return None;
        }
        let data: Block = Box::new(rec[8..].try_into().ok()?);
        out.push((b, data));
    }
    Some((epoch, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::disk::encode_block;

    fn disk(dir: &Path, blocks: u64) -> Arc<Disk> {
        let p = dir.join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(blocks * BLOCK as u64).unwrap();
        Arc::new(Disk::open(&p).unwrap())
    }

    fn records(blocks: &[(u64, u8)]) -> Vec<u8> {
        let mut r = Vec::new();
        for &(b, v) in blocks {
            encode_block(b, &[v; BLOCK], &mut r);
        }
        r
    }

    fn sum_after(blocks: u64, writes: &[(u64, u8)]) -> u64 {
        let mut content = vec![0u8; blocks as usize];
        for &(b, v) in writes {
            content[b as usize] = v;
        }
        content
            .iter()
            .enumerate()
            .map(|(b, &v)| vmm::disk::block_digest(b as u64, &[v; BLOCK]))
            .fold(0u64, u64::wrapping_add)
    }

    #[test]
    fn a_commit_writes_the_blocks_and_checks_the_sum() {
        let dir = tempfile::tempdir().unwrap();
        let (d, found) = BackupDisk::open(disk(dir.path(), 16)).unwrap();
        assert_eq!(found, Recovered::Clean);
        let w = [(1, 7u8), (5, 9)];
        let sum = sum_after(16, &w);
        let n = d
            .apply(1, 1, &records(&w), DiskCommit { sum, flushed: true })
            .unwrap();
        assert_eq!(n, 2);
        let mut b = [0u8; BLOCK];
        d.disk().read_block(5, &mut b).unwrap();
        assert_eq!(b, [9; BLOCK]);
        assert_eq!(
            std::fs::metadata(journal_path(d.disk().path()))
                .unwrap()
                .len(),
            0
        );
        // A wrong sum is a mismatch: the disk is at no checkpoint.
        let e = d
            .apply(
                1,
                2,
                &records(&[(2, 1)]),
                DiskCommit {
                    sum: 1,
                    flushed: false,
                },
            )
            .unwrap_err();
        assert!(e.disk_touched(), "{e}");
        // Malformed records write nothing.
        let before = d.disk().sum();
        let mut bad = records(&[(3, 1)]);
        bad.truncate(bad.len() - 1);
        let e = d
            .apply(
                1,
                3,
                &bad,
                DiskCommit {
                    sum: 0,
                    flushed: false,
                },
            )
            .unwrap_err();
        assert!(!e.disk_touched(), "{e}");
        assert_eq!(d.disk().sum(), before);
    }

    #[test]
    fn a_commit_cut_at_any_byte_of_its_journal_leaves_the_disk_at_k_minus_1_or_k() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = [(0, 1u8), (3, 1)];
        let k = [(0, 2u8), (2, 2), (7, 2)];
        let (at_k1, at_k) = (
            sum_after(8, &k1),
            sum_after(8, &[(0, 2), (2, 2), (3, 1), (7, 2)]),
        );
        // The journal epoch k writes, taken from a real commit.
        let full = {
            let (d, _) = BackupDisk::open(disk(dir.path(), 8)).unwrap();
            d.apply(
                1,
                1,
                &records(&k1),
                DiskCommit {
                    sum: at_k1,
                    flushed: false,
                },
            )
            .unwrap();
            // What apply writes to the journal for k (before it writes the
            // disk and empties the journal).
            let mut j = Vec::new();
            j.extend_from_slice(MAGIC);
            j.extend_from_slice(&1u64.to_le_bytes());
            j.extend_from_slice(&2u64.to_le_bytes());
            j.extend_from_slice(&3u64.to_le_bytes());
            for &(b, v) in &k {
                j.extend_from_slice(&(b as u64).to_le_bytes());
                j.extend_from_slice(&[v; BLOCK]);
            }
            let s = xxhash_rust::xxh3::xxh3_64(&j);
            j.extend_from_slice(&s.to_le_bytes());
            j.extend_from_slice(MAGIC);
            j
        };
        let img = dir.path().join("disk.img");
        let base = std::fs::read(&img).unwrap();
        let cuts = [
            0,
            1,
            31,
            32,
            100,
            4200,
            full.len() / 2,
            full.len() - 9,
            full.len() - 1,
            full.len(),
        ];
        for &cut in &cuts {
            for written in [0usize, 1, 2, 3] {
                // The disk as k−1 plus the first `written` blocks of k (only
                // possible once the journal is whole), and the journal cut.
                if written > 0 && cut < full.len() {
                    continue;
                }
                std::fs::write(&img, &base).unwrap();
                {
                    let f = OpenOptions::new().write(true).open(&img).unwrap();
                    for &(b, v) in &k[..written] {
                        f.write_all_at(&[v; BLOCK], b as u64 * BLOCK as u64)
                            .unwrap();
                    }
                }
                std::fs::write(journal_path(&img), &full[..cut]).unwrap();
                let (d, found) = BackupDisk::open(Arc::new(Disk::open(&img).unwrap())).unwrap();
                let sum = d.disk().sum();
                if cut == full.len() {
                    assert_eq!(
                        found,
                        Recovered::Replayed {
                            epoch: 2,
                            blocks: 3
                        }
                    );
                    assert_eq!(sum, at_k, "cut {cut}, written {written}");
                } else {
                    assert!(
                        matches!(found, Recovered::Dropped { .. } | Recovered::Clean),
                        "cut {cut}: {found:?}"
                    );
                    assert_eq!(sum, at_k1, "cut {cut}");
                }
            }
        }
    }
}
