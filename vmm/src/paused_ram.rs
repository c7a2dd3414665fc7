//! Reading a paused machine's RAM as one slice (a migration's digest of
//! all of RAM at the switch, without copying it first).

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::machine::{Machine, MachineError};

impl Machine {
    /// Calls `f` with all of guest RAM as one slice; the machine must be
    /// paused and its RAM in one region (guests of at most 3 GiB).
    ///
    /// Soundness: while the machine is paused no vCPU runs and its network
    /// card is quiesced (`Machine::pause`), so nothing this machine owns
    /// writes the RAM until [`Machine::resume`], which needs `&mut self`
    /// and so cannot happen while the shared borrow `f` runs under lives.
    /// The caller must not write the RAM through another handle (a clone of
    /// [`Machine::memory`]) meanwhile — castor's only writers are the
    /// machine's own devices and, on a backup, the replica (which is not a
    /// running machine's RAM).
    pub fn with_paused_ram<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, MachineError> {
        if !self.is_paused() {
            return Err(MachineError::NotPaused);
        }
        let mem = self.memory();
        if mem.num_regions() != 1 {
            return Err(MachineError::Config(
                "guest RAM is not one region (more than 3 GiB)".into(),
            ));
        }
        let r = mem.iter().next().expect("one region");
        let (ptr, len) = (r.as_ptr(), r.len() as usize);
        // SAFETY: `ptr..ptr + len` is the live, readable mapping of the
        // machine's only RAM region, kept mapped by `&self` for as long as
        // the slice lives (it cannot escape `f`). Nothing writes it
        // meanwhile: the machine is paused (checked) and cannot resume
        // during the borrow; other handles' writes are excluded by this
        // function's documented contract.
        let ram = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        Ok(f(ram))
    }
}
