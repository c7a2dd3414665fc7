//! The guest console: bytes the guest writes to its serial port, numbered by
//! their offset in the whole console stream since boot.
//!
//! Two devices feed it: the 8250 UART (ring-0 guest code, any kernel) and
//! castor's MMIO console window ([`MMIO_CONSOLE_BASE`]), which castor's guest
//! uses from ring 3 because under kvm_pvm its ring 3 does not get IOPL 3, so a
//! ring-3 `out` faults (docs/design.md, "What kvm_pvm decides"). A store of
//! the 8-byte word at `MMIO_CONSOLE_BASE + 8 * (n - 1)` appends its first `n`
//! bytes (1..=8) to the stream.
//!
//! The offset travels with the machine state, so a restored guest (or, later,
//! a backup taking over) continues the stream at exactly the next byte.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Guest-physical base of castor's console window (in the MMIO hole, no RAM behind it).
pub const MMIO_CONSOLE_BASE: u64 = 0xFEB0_0000;
/// Size of the console window in bytes.
pub const MMIO_CONSOLE_LEN: u64 = 64;

/// Where console bytes go. `offset` is the stream offset of `bytes[0]`.
pub trait ConsoleSink: Send {
    /// Receives bytes the guest wrote, in order.
    fn write(&mut self, offset: u64, bytes: &[u8]);
    /// Called when the machine pauses or stops, to push out buffered bytes.
    fn flush(&mut self) {}
}

/// Writes the console to this process's standard output.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl ConsoleSink for StdoutSink {
    fn write(&mut self, _offset: u64, bytes: &[u8]) {
        // Standard output is line-buffered: a whole line reaches it at once.
        // A closed stdout must not stop the guest, so errors are ignored.
        let _ = io::stdout().write_all(bytes);
    }
    fn flush(&mut self) {
        let _ = io::stdout().flush();
    }
}

/// Collects the console in memory (tests, benchmarks, probes).
#[derive(Debug, Default, Clone)]
pub struct MemorySink(pub Arc<Mutex<Vec<u8>>>);

impl MemorySink {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().expect("console buffer lock").clone()
    }
}

impl ConsoleSink for MemorySink {
    fn write(&mut self, _offset: u64, bytes: &[u8]) {
        self.0
            .lock()
            .expect("console buffer lock")
            .extend_from_slice(bytes);
    }
}

struct Inner {
    offset: u64,
    sink: Box<dyn ConsoleSink>,
}

/// The console stream: a sink and the offset of the next byte.
#[derive(Clone)]
pub struct Console(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Console(offset {})", self.offset())
    }
}

impl Console {
    /// A console whose next byte has stream offset `offset`.
    pub fn new(sink: Box<dyn ConsoleSink>, offset: u64) -> Self {
        Console(Arc::new(Mutex::new(Inner { offset, sink })))
    }

    /// Offset of the next byte the guest will write.
    pub fn offset(&self) -> u64 {
        self.0.lock().expect("console lock").offset
    }

    /// Pushes buffered bytes out of the sink.
    pub fn flush(&self) {
        self.0.lock().expect("console lock").sink.flush();
    }

    /// Appends guest bytes to the stream.
    pub fn write(&self, bytes: &[u8]) {
        let mut inner = self.0.lock().expect("console lock");
        let off = inner.offset;
        inner.sink.write(off, bytes);
        inner.offset += bytes.len() as u64;
    }

    pub(crate) fn writer(&self) -> ConsoleWriter {
        ConsoleWriter(self.clone())
    }
}

/// The serial device's output side.
pub(crate) struct ConsoleWriter(Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
