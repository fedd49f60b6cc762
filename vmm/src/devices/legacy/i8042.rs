//! The part of an i8042 keyboard controller a guest needs: a status register that says "ready"
//! and the 0xFE command on port 0x64, which pulses the CPU reset line. With `reboot=k` that is how
//! the guest says it is done.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::lifecycle::Lifecycle;

/// Offset of the command/status port (0x64) from the data port (0x60).
pub const COMMAND_OFFSET: u64 = 4;
/// Command: pulse the reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    lifecycle: Arc<Lifecycle>,
}

impl I8042 {
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        I8042 { lifecycle }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: input and output buffers empty, so the guest's kb_wait() returns at once.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.lifecycle.reset_requested();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::ExitReason;
    use std::time::{Instant, SystemTime};

    #[test]
    fn only_fe_on_the_command_port_resets() {
        let (l, rx) = Lifecycle::new(Instant::now(), SystemTime::now());
        let mut dev = I8042::new(Arc::new(l));
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(rx.try_recv().is_err());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(rx.try_recv().unwrap(), ExitReason::UnexpectedReset);
    }
}
