//! The 8250 UART at COM1 (I/O ports 0x3F8-0x3FF, IRQ 4), from vm-superio,
//! writing into the [`Console`](crate::console::Console).

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleWriter;
use crate::state::SerialRegs;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3F8;
/// GSI of COM1's interrupt.
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// castor's serial device.
pub struct SerialDevice(Serial<IrqTrigger, NoEvents, ConsoleWriter>);

/// The register offset of `port` if it belongs to COM1.
pub fn port_offset(port: u16) -> Option<u8> {
    (COM1_BASE..COM1_BASE + 8)
        .contains(&port)
        .then(|| (port - COM1_BASE) as u8)
}

impl SerialDevice {
    pub(crate) fn new(trigger: IrqTrigger, out: ConsoleWriter, regs: Option<&SerialRegs>) -> Self {
        match regs {
            None => SerialDevice(Serial::new(trigger, out)),
            Some(r) => {
                let state = SerialState {
                    baud_divisor_low: r.baud_divisor_low,
                    baud_divisor_high: r.baud_divisor_high,
                    interrupt_enable: r.interrupt_enable,
                    interrupt_identification: r.interrupt_identification,
                    line_control: r.line_control,
                    line_status: r.line_status,
                    modem_control: r.modem_control,
                    modem_status: r.modem_status,
                    scratch: r.scratch,
                    in_buffer: r.in_buffer.clone(),
                };
                // from_state only fails when the input buffer is over-long,
                // which MachineState::validate refuses beforehand.
                SerialDevice(
                    Serial::from_state(&state, trigger, NoEvents, out)
                        .unwrap_or_else(|_| unreachable!("serial state validated before restore")),
                )
            }
        }
    }

    /// Guest write to register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.0.write(offset, value) {
            tracing::warn!("serial write: {e:?}");
        }
    }

    /// Guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }

    /// The registers, for the machine state.
    pub fn regs(&self) -> SerialRegs {
        let s = self.0.state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}
