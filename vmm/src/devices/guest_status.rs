//! The guest status page: one MMIO page the agent writes to (through `/dev/mem`) to say "I am up"
//! (the boot marker the VMM times) and "a clean shutdown follows". A write costs the guest one
//! exit, and the VMM measures boot time itself instead of parsing console text.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::lifecycle::Lifecycle;

pub use cocoon_vmm_abi::guest_status::{AGENT_UP, SHUTDOWN_FOLLOWS, STATUS_OFFSET};

/// What a snapshot keeps of the guest status page: the page itself holds nothing, but the
/// lifecycle must know after a restore that the agent is up (the VM is ready at once) and
/// whether it announced a shutdown (so the reset that follows is a clean power-off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatusState {
    pub agent_up: bool,
    pub shutdown_announced: bool,
}

impl GuestStatusState {
    pub fn save(lifecycle: &Lifecycle) -> GuestStatusState {
        GuestStatusState {
            agent_up: lifecycle.agent_up().is_some(),
            shutdown_announced: lifecycle.shutdown_announced(),
        }
    }

    /// Tells a restored VM's lifecycle. The agent-up time becomes the restore's: the boot
    /// marker of a restored VM means "ready", which it is from here on.
    pub fn apply(&self, lifecycle: &Lifecycle) {
        if self.agent_up {
            lifecycle.mark_agent_up();
        }
        if self.shutdown_announced {
            lifecycle.announce_shutdown();
        }
    }
}

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

    #[test]
    fn a_restored_lifecycle_knows_the_agent_is_up_and_the_shutdown_notice() {
        let (l, _rx) = Lifecycle::new(Instant::now(), SystemTime::now());
        assert_eq!(GuestStatusState::save(&l), GuestStatusState::default());
        l.mark_agent_up();
        l.announce_shutdown();
        let state = GuestStatusState::save(&l);
        assert_eq!(
            state,
            GuestStatusState {
                agent_up: true,
                shutdown_announced: true
            }
        );
        let (restored, rx) = Lifecycle::new(Instant::now(), SystemTime::now());
        state.apply(&restored);
        assert!(restored.agent_up().is_some());
        restored.reset_requested();
        assert_eq!(rx.recv().unwrap(), ExitReason::PoweredOff);
    }
}
