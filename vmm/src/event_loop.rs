//! The device thread: waits on the queue-notify eventfds KVM signals when the guest kicks a
//! virtqueue, and lets the device serve that queue. vCPUs never block on device I/O.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::devices::virtio::mmio::MmioTransport;

/// One queue's kick: the eventfd KVM writes, and which transport/queue it belongs to.
pub struct QueueKick {
    pub eventfd: EventFd,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue: usize,
}

pub struct EventLoop {
    epoll: Epoll,
    kicks: Vec<QueueKick>,
}

impl EventLoop {
    pub fn new(kicks: Vec<QueueKick>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (i, kick) in kicks.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                kick.eventfd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(EventLoop { epoll, kicks })
    }

    /// Serves kicks until the process ends.
    pub fn run(self) {
        let mut events = vec![EpollEvent::default(); self.kicks.len().max(1)];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("device event loop stopped: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let Some(kick) = self.kicks.get(event.data() as usize) else {
                    continue;
                };
                // Reading resets the counter; several kicks in a row are served by one pass.
                let _ = kick.eventfd.read();
                lock(&kick.transport).notify(kick.queue);
            }
        }
    }
}
