//! The device thread: waits on the queue-notify eventfds KVM signals when the guest kicks a
//! virtqueue, and on the devices' host-side fds (sockets, TAPs), and lets the device serve them.
//! vCPUs never block on device I/O.
//!
//! One thread serves every device, so no device may keep it: each pass over a queue is bounded
//! (`CHAIN_BUDGET`), and a device that stopped at its budget is served again after the thread
//! has looked at its other fds (`MmioTransport::serve_pending`), round-robin.

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
    /// Every transport once, for the work devices left pending.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
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
        let mut transports: Vec<Arc<Mutex<MmioTransport>>> = Vec::new();
        for t in kicks.iter().map(|k| &k.transport).chain(&hosts) {
            if !transports.iter().any(|known| Arc::ptr_eq(known, t)) {
                transports.push(t.clone());
            }
        }
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
            transports,
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
        // A restored device may have left work before the thread started.
        let mut pending = self.serve_pending();
        loop {
            // With work pending, only a look at the fds: nothing may wait behind it.
            let timeout = if pending { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
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
            pending = self.serve_pending();
        }
    }

    /// One more pass for every device that stopped at its budget; whether any still has work.
    fn serve_pending(&self) -> bool {
        let mut pending = false;
        for transport in &self.transports {
            let mut transport = lock(transport);
            if transport.has_pending_work() {
                pending |= transport.serve_pending();
            }
        }
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{activate, counting_transport};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    /// A device that never runs out of work (every pass says `more`) is served again without
    /// a kick, pass by pass, and another device's kick is still served meanwhile.
    #[test]
    fn a_busy_device_is_served_in_turns_with_the_others() {
        let (mut busy, busy_passes, busy_wants) = counting_transport();
        let (mut calm, calm_passes, _) = counting_transport();
        activate(&mut busy);
        activate(&mut calm);
        busy_wants.store(usize::MAX, Ordering::SeqCst);
        let busy = Arc::new(Mutex::new(busy));
        let calm = Arc::new(Mutex::new(calm));
        let kick = |transport: &Arc<Mutex<MmioTransport>>| {
            let eventfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let writer = eventfd.try_clone().unwrap();
            let kick = QueueKick {
                eventfd,
                transport: transport.clone(),
                queue: 0,
            };
            (kick, writer)
        };
        let (busy_kick, kick_busy) = kick(&busy);
        let (calm_kick, kick_calm) = kick(&calm);
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let stopper = stop.try_clone().unwrap();
        let event_loop = EventLoop::new(
            vec![busy_kick, calm_kick],
            vec![busy.clone(), calm.clone()],
            stop,
        )
        .unwrap();
        let thread = std::thread::spawn(move || event_loop.run());

        kick_busy.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while busy_passes.load(Ordering::SeqCst) < 100 {
            assert!(
                Instant::now() < deadline,
                "the busy device is not served again"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        kick_calm.write(1).unwrap();
        while calm_passes.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the other device is starved");
            std::thread::sleep(Duration::from_millis(1));
        }
        stopper.write(1).unwrap();
        thread.join().unwrap();
    }
}
