//! COM1, a 16550A-compatible UART (vm-superio's), whose output goes to stdout or a file.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial port's IRQ through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub(super) type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct SerialConsole {
    // Visible to `persist.rs`, which saves and rebuilds the UART.
    pub(super) uart: Uart,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [first, rest @ ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(offset);
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(value)) = (u8::try_from(offset), data.first())
            && let Err(e) = self.uart.write(offset, *value)
        {
            // The console is best effort: a full disk or closed stdout must not stop the VM.
            tracing::debug!("serial output dropped: {e}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A console sink the test can read back.
    #[derive(Clone, Default)]
    pub(crate) struct Shared(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let out = Shared::default();
        let mut dev = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Line status register says the transmitter is empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
