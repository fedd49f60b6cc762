//! A monotonic timerfd watched by a device's own epoll: how a device thread that only waits
//! on fds wakes up at a time (net's hold of a coalesced frame, vsock's deadlines).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub struct Timer(File);

impl Timer {
    /// A stopped timer, readable in `epoll` under `token` once it expires.
    pub fn in_epoll(epoll: &Epoll, token: u64) -> std::io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; on success we own the new descriptor.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just created and nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        epoll.ctl(
            ControlOperation::Add,
            file.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        Ok(Timer(file))
    }

    /// Expires after `first`, then every `interval` (zero: once); a zero `first` stops it.
    pub fn set(&self, first: Duration, interval: Duration) -> std::io::Result<()> {
        let spec = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let value = libc::itimerspec {
            it_interval: spec(interval),
            it_value: spec(first),
        };
        // SAFETY: timerfd_settime reads the itimerspec we own; the old value is not asked for.
        if unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &value, std::ptr::null_mut()) } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Clears an expiry (epoll watches it level-triggered).
    pub fn clear(&self) {
        let mut expirations = [0u8; 8];
        let _ = (&self.0).read(&mut expirations);
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
