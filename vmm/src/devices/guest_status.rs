//! The guest status page: one MMIO page the agent writes to (through `/dev/mem`) to say "I am up"
//! (the boot marker the VMM times) and "a clean shutdown follows". A write costs the guest one
//! exit, and the VMM measures boot time itself instead of parsing console text.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::lifecycle::Lifecycle;

pub use cocoon_agent_protocol::guest_status::{AGENT_UP, SHUTDOWN_FOLLOWS, STATUS_OFFSET};

pub struct GuestStatus {
    lifecycle: Arc<Lifecycle>,
}

impl GuestStatus {
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        GuestStatus { lifecycle }
    }
}

impl BusDevice for GuestStatus {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != STATUS_OFFSET {
            return;
        }
        match data.first().copied() {
            Some(AGENT_UP) => self.lifecycle.mark_agent_up(),
            Some(SHUTDOWN_FOLLOWS) => self.lifecycle.announce_shutdown(),
            other => tracing::debug!(?other, "unknown guest status write ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::ExitReason;
    use std::time::{Instant, SystemTime};

    #[test]
    fn marker_and_shutdown_notice() {
        let (l, rx) = Lifecycle::new(Instant::now(), SystemTime::now());
        let l = Arc::new(l);
        let mut dev = GuestStatus::new(l.clone());
        dev.write(8, &[AGENT_UP]);
        assert!(
            l.agent_up().is_none(),
            "writes elsewhere in the page are ignored"
        );
        dev.write(STATUS_OFFSET, &[0x77]);
        dev.write(STATUS_OFFSET, &[AGENT_UP]);
        assert!(l.agent_up().is_some());
        dev.write(STATUS_OFFSET, &[SHUTDOWN_FOLLOWS]);
        l.reset_requested();
        assert_eq!(rx.recv().unwrap(), ExitReason::PoweredOff);
    }
}
