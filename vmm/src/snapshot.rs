//! A snapshot on disk: a directory with the machine state and guest RAM.
//!
//! - `memory.bin`: guest RAM, regions in address order, raw; all-zero pages
//!   are left as holes (sparse file).
//! - `state.bin`: the encoded [`MachineState`] (magic, version, CRC).
//!
//! Both are written to temporary names and renamed; `state.bin` last, so a
//! new directory with a `state.bin` holds a complete snapshot. Rewriting a
//! snapshot in place is not atomic: an interruption between the two renames
//! leaves the new `memory.bin` beside the old `state.bin` (undetected when the
//! RAM size is the same). Only `memory.bin` is fsynced; neither `state.bin`
//! nor the directory is.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMem, PAGE_SIZE};
use crate::state::{MachineState, StateError};

/// File name of the machine state.
pub const STATE_FILE: &str = "state.bin";
/// File name of guest RAM.
pub const MEMORY_FILE: &str = "memory.bin";

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
        "{0} is not a castor snapshot (no {STATE_FILE}); take one with `castor run --snapshot-at`"
    )]
    NotASnapshot(PathBuf),
    /// The state file is damaged.
    #[error("{path}: {err}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        err: StateError,
    },
    /// memory.bin does not match the RAM size in the state.
    #[error("{path} holds {found} bytes but the machine state describes {expected} bytes of RAM: the snapshot is truncated or mixed up")]
    MemorySize {
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// RAM size.
        expected: u64,
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

/// Writes `state` and the contents of `mem` into `dir` (created if missing).
pub fn write(dir: &Path, state: &MachineState, mem: &GuestMem) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_tmp = dir.join(format!("{MEMORY_FILE}.tmp"));
    let mut f = File::create(&mem_tmp).map_err(io(&mem_tmp))?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut pos = 0u64;
    for r in mem.iter() {
        let (start, len) = (r.start_addr().0, r.len());
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            mem.read_slice(&mut page, GuestAddress(start + off))?;
            if page.iter().any(|&b| b != 0) {
                f.seek(SeekFrom::Start(pos)).map_err(io(&mem_tmp))?;
                f.write_all(&page).map_err(io(&mem_tmp))?;
            }
            pos += PAGE_SIZE;
        }
    }
    f.set_len(pos).map_err(io(&mem_tmp))?;
    f.sync_all().map_err(io(&mem_tmp))?;
    let mem_path = dir.join(MEMORY_FILE);
    fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;
    let state_tmp = dir.join(format!("{STATE_FILE}.tmp"));
    fs::write(&state_tmp, state.encode()).map_err(io(&state_tmp))?;
    let state_path = dir.join(STATE_FILE);
    fs::rename(&state_tmp, &state_path).map_err(io(&state_path))?;
    Ok(())
}

/// Reads and validates the machine state of the snapshot in `dir`, and checks
/// that its memory file has the right size.
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotASnapshot(dir.to_path_buf()))
        }
        Err(err) => return Err(SnapshotError::Io { path, err }),
    };
    let state = MachineState::decode(&bytes).map_err(|err| SnapshotError::State { path, err })?;
    let mem_path = dir.join(MEMORY_FILE);
    let found = fs::metadata(&mem_path).map_err(io(&mem_path))?.len();
    if found != state.memory_size() {
        return Err(SnapshotError::MemorySize {
            path: mem_path,
            found,
            expected: state.memory_size(),
        });
    }
    Ok(state)
}

/// Copies the snapshot's RAM into `mem` (whose layout matches the state).
pub fn fill_memory(dir: &Path, mem: &GuestMem) -> std::io::Result<()> {
    let path = dir.join(MEMORY_FILE);
    let mut f = File::open(&path)?;
    for r in mem.iter() {
        mem.read_exact_volatile_from(r.start_addr(), &mut f, r.len() as usize)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}
