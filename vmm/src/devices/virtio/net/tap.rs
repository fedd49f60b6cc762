//! A TAP device carrying the virtio-net header in front of every frame (IFF_VNET_HDR), so
//! frames move between the guest and the TAP without reformatting. Opened by name, or taken
//! from a file descriptor the caller opened (perhaps in another network namespace).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::header::VNET_HDR_SIZE;
use crate::config::TapSource;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUNSETOFFLOAD` bits: what the TAP may hand us (partial checksums, TCP segmentation offload
/// frames). Each must be one the guest accepted.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error(
        "cannot attach to TAP device {name}: {source} (does it exist in this network namespace?)"
    )]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot duplicate TAP fd {fd}: {source} (is it open in this process?)")]
    Dup { fd: RawFd, source: std::io::Error },
    #[error("fd {fd} is not an attached TUN/TAP device (TUNGETIFF: {source})")]
    NotTun { fd: RawFd, source: std::io::Error },
    #[error(
        "fd {fd} (interface {name}) has flags {flags:#x}: a TAP needs IFF_TAP, IFF_NO_PI and \
         IFF_VNET_HDR"
    )]
    Flags { fd: RawFd, name: String, flags: u16 },
    #[error("TAP device {name}: cannot {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
}

pub struct Tap {
    pub file: File,
    /// The interface's name, for messages.
    pub name: String,
    /// Opened by name, so a snapshot can name it; an fd cannot be saved.
    pub by_name: bool,
}

impl Tap {
    /// The TAP `source` names; `None` for a detached NIC.
    pub fn from_source(source: &TapSource) -> Result<Option<Tap>, TapError> {
        match source {
            TapSource::Name(name) => Tap::open(name).map(Some),
            TapSource::Fd(fd) => Tap::from_fd(*fd).map(Some),
            TapSource::Detached => Ok(None),
        }
    }

    /// Attaches to (or creates) the TAP device `name`, non-blocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain data; all-zero is valid and we fill the name and flags.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes the ifreq we own for the duration of the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr) } < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
            by_name: true,
        };
        tap.prepare()?;
        Ok(tap)
    }

    /// Takes a TAP the caller opened: duplicates `fd` (close-on-exec, ours to close), checks it
    /// is a TAP with the virtio-net header and makes it non-blocking.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_DUPFD_CLOEXEC only reads `fd`'s table entry; a bad fd fails with EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(TapError::Dup {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `dup` is a descriptor we just created and nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF fills the ifreq we own; on anything but an attached TUN/TAP it fails.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut ifr) } < 0 {
            return Err(TapError::NotTun {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        let name: String = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        let needed = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if flags & needed != needed {
            return Err(TapError::Flags {
                fd,
                name,
                flags: flags as u16,
            });
        }
        // SAFETY: F_GETFL only reads the descriptor's status flags.
        let status = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let set = if status < 0 {
            status
        } else {
            // SAFETY: F_SETFL sets status flags on a descriptor we own.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK) }
        };
        if set < 0 {
            return Err(TapError::Setup {
                name,
                what: "make it non-blocking",
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name,
            by_name: false,
        };
        tap.prepare()?;
        Ok(tap)
    }

    /// The 12-byte header virtio 1.x uses, and no offloads until the guest accepts some: a
    /// TAP used before (persistent, or the caller's) may still have a previous guest's.
    fn prepare(&self) -> Result<(), TapError> {
        let size = VNET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::Setup {
                name: self.name.clone(),
                what: "set the virtio-net header size",
                source: std::io::Error::last_os_error(),
            });
        }
        self.set_offload(0).map_err(|source| TapError::Setup {
            name: self.name.clone(),
            what: "clear its offloads",
            source,
        })
    }

    /// Which offloaded frames (`TUN_F_*`) the TAP may hand us.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs `f` on a thread of its own in a new network namespace (a TAP made there disappears
    /// with its last fd); `None` when this process may not make one (not root).
    pub(crate) fn in_new_netns<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread, which ends after `f`.
            (unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0).then(f)
        })
        .join()
        .unwrap()
    }

    /// /dev/net/tun opened with `flags` on the device `name`.
    pub(crate) fn raw_tun(name: &str, flags: libc::c_short) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: plain data, zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = flags;
        // SAFETY: TUNSETIFF on our own ifreq.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr) };
        assert_eq!(rc, 0, "TUNSETIFF {name}");
        file
    }

    #[test]
    fn an_fd_that_is_no_tap_is_refused() {
        let null = File::open("/dev/null").unwrap();
        let e = Tap::from_fd(null.as_raw_fd()).err().unwrap();
        assert!(matches!(e, TapError::NotTun { .. }), "{e}");
        assert!(matches!(
            Tap::from_fd(999_999).err().unwrap(),
            TapError::Dup { .. }
        ));
    }

    #[test]
    fn a_tap_fd_is_duplicated_and_checked() {
        let Some(()) = in_new_netns(|| {
            let good = raw_tun("tapfd0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
            let tap = Tap::from_fd(good.as_raw_fd()).unwrap();
            assert_eq!(tap.name, "tapfd0");
            assert!(!tap.by_name);
            assert_ne!(tap.file.as_raw_fd(), good.as_raw_fd());
            // SAFETY: F_GETFD/F_GETFL only read flags.
            let (fd_flags, status) = unsafe {
                (
                    libc::fcntl(tap.file.as_raw_fd(), libc::F_GETFD),
                    libc::fcntl(tap.file.as_raw_fd(), libc::F_GETFL),
                )
            };
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
            assert_ne!(status & libc::O_NONBLOCK, 0);
            tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                .unwrap();
            drop(tap);
            // The caller's fd is still its own and still open.
            assert!(Tap::from_fd(good.as_raw_fd()).is_ok());

            let no_vnet = raw_tun("tapfd1", IFF_TAP | IFF_NO_PI);
            let e = Tap::from_fd(no_vnet.as_raw_fd()).err().unwrap();
            assert!(
                matches!(e, TapError::Flags { ref name, .. } if name == "tapfd1"),
                "{e}"
            );
            let tun = raw_tun("tunfd0", 0x0001 | IFF_NO_PI | IFF_VNET_HDR);
            assert!(matches!(
                Tap::from_fd(tun.as_raw_fd()).err().unwrap(),
                TapError::Flags { .. }
            ));
        }) else {
            eprintln!("SKIPPED a_tap_fd_is_duplicated_and_checked: needs CAP_SYS_ADMIN");
            return;
        };
    }
}
