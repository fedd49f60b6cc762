//! Snapshot state of the legacy devices.
//!
//! The UART's registers and receive FIFO are kept in our own mirror of vm-superio's
//! `SerialState`, so the format is ours whatever that crate does; where its output goes is the
//! restoring process's choice. The i8042 keeps nothing: it has no registers, only the reset
//! line into the lifecycle.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

use super::serial::{IrqTrigger, SerialConsole};

/// The 16550A's receive FIFO (vm-superio refuses more).
pub const FIFO_SIZE: usize = 64;

// Interrupt enable and identification bits (16550A) whose interrupt a restore re-raises.
const IER_RDA: u8 = 0b0000_0001;
const IER_THR_EMPTY: u8 = 0b0000_0010;
const IIR_THR_EMPTY: u8 = 0b0000_0010;
const IIR_RDA: u8 = 0b0000_0100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<&vm_superio::SerialState> for SerialState {
    fn from(s: &vm_superio::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialState {
    /// Whether the UART has an enabled interrupt pending, which the guest must see again.
    fn interrupt_pending(&self) -> bool {
        let ier = self.interrupt_enable;
        let iir = self.interrupt_identification;
        (ier & IER_THR_EMPTY != 0 && iir & IIR_THR_EMPTY != 0)
            || (ier & IER_RDA != 0 && iir & IIR_RDA != 0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("serial port: the receive FIFO holds {0} bytes, more than its {FIFO_SIZE}")]
    FifoTooLong(usize),
    #[error("serial port: {0}")]
    Uart(String),
}

impl SerialConsole {
    pub fn save(&self) -> SerialState {
        SerialState::from(&self.uart.state())
    }

    /// The UART as saved, raising `irq` and writing to `out`. Register values are taken as
    /// they are (each is one the guest could have written); a FIFO longer than the UART's is
    /// refused, and so is a state whose pending interrupt cannot be raised.
    pub fn restore(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> Result<Self, SerialRestoreError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialRestoreError::FifoTooLong(state.in_buffer.len()));
        }
        let uart = Serial::from_state(&state.into(), IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialRestoreError::Uart(e.to_string()))?;
        Ok(SerialConsole { uart })
    }

    /// Raises the UART's interrupt again if one is pending: vm-superio raised it while
    /// restoring, possibly before the interrupt controller's state was put back over it.
    pub fn after_restore(&self) {
        if self.save().interrupt_pending()
            && let Err(e) = self.uart.interrupt_evt().0.write(1)
        {
            tracing::warn!("cannot raise the serial interrupt: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    use crate::devices::legacy::serial::tests::Shared;

    const LCR: u64 = 3;
    const IER: u64 = 1;
    const SCRATCH: u64 = 7;

    fn eventfd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn registers_survive_and_output_goes_to_the_new_sink() {
        let mut dev = SerialConsole::new(eventfd(), Box::new(std::io::sink()));
        dev.write(LCR, &[0x03]);
        dev.write(SCRATCH, &[0x5a]);
        dev.write(IER, &[IER_THR_EMPTY]);
        let state = dev.save();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let back: SerialState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);

        let out = Shared::default();
        let irq = eventfd();
        let raised = irq.try_clone().unwrap();
        let mut restored = SerialConsole::restore(irq, Box::new(out.clone()), &back).unwrap();
        assert_eq!(restored.save(), state);
        let mut b = [0u8];
        restored.read(SCRATCH, &mut b);
        assert_eq!(b, [0x5a]);
        // The pending THR-empty interrupt is raised again once the irqchip is back.
        let _ = raised.read();
        restored.after_restore();
        assert_eq!(raised.read().unwrap(), 1);
        restored.write(0, b"k");
        assert_eq!(&*out.0.lock().unwrap(), b"k");
    }

    #[test]
    fn an_overlong_fifo_is_refused() {
        let mut state = SerialConsole::new(eventfd(), Box::new(std::io::sink())).save();
        state.in_buffer = vec![b'x'; FIFO_SIZE + 1];
        assert!(matches!(
            SerialConsole::restore(eventfd(), Box::new(std::io::sink()), &state),
            Err(SerialRestoreError::FifoTooLong(65))
        ));
        state.in_buffer.truncate(FIFO_SIZE);
        assert!(SerialConsole::restore(eventfd(), Box::new(std::io::sink()), &state).is_ok());
    }
}
