//! The device thread: waits on the queue-notify eventfds KVM signals when the guest kicks a
//! virtqueue, and on the devices' host-side fds (sockets, TAPs), and lets the device serve them.
//! vCPUs never block on device I/O.

use std::os::fd::{AsRawFd, RawFd};
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

enum Source {
    Kick(QueueKick),
    Host(Arc<Mutex<MmioTransport>>),
    /// Written by the VM handle when the VM has ended.
    Stop,
}

pub struct EventLoop {
    epoll: Epoll,
    sources: Vec<Source>,
    /// Kept open for as long as epoll watches it.
    _stop: EventFd,
}

impl EventLoop {
    /// Watches `kicks`, and the host-side fd of every transport in `hosts` that has one, until
    /// `stop` is written.
    pub fn new(
        kicks: Vec<QueueKick>,
        hosts: Vec<Arc<Mutex<MmioTransport>>>,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut sources: Vec<(RawFd, Source)> = kicks
            .into_iter()
            .map(|k| (k.eventfd.as_raw_fd(), Source::Kick(k)))
            .collect();
        for transport in hosts {
            let fd = lock(&transport).host_event_fd();
            if let Some(fd) = fd {
                sources.push((fd, Source::Host(transport)));
            }
        }
        sources.push((stop.as_raw_fd(), Source::Stop));
        for (i, (fd, _)) in sources.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(EventLoop {
            epoll,
            sources: sources.into_iter().map(|(_, s)| s).collect(),
            _stop: stop,
        })
    }

    /// Whether there is nothing to serve but the stop (no thread is needed then).
    pub fn is_empty(&self) -> bool {
        self.sources.len() <= 1
    }

    /// Serves events until stopped.
    pub fn run(self) {
        let mut events = vec![EpollEvent::default(); self.sources.len().max(1)];
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
                match self.sources.get(event.data() as usize) {
                    Some(Source::Kick(kick)) => {
                        // Reading resets the counter; several kicks in a row are served by one pass.
                        let _ = kick.eventfd.read();
                        lock(&kick.transport).notify(kick.queue);
                    }
                    Some(Source::Host(transport)) => lock(transport).host_event(),
                    Some(Source::Stop) => return,
                    None => {}
                }
            }
        }
    }
}
