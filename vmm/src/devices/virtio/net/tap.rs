//! A TAP device opened by name, carrying the virtio-net header in front of every frame
//! (IFF_VNET_HDR), so frames move between the guest and the TAP without reformatting.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `struct virtio_net_hdr_v1`, which virtio 1.x always uses.
pub const VNET_HDR_SIZE: usize = 12;

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
}

pub struct Tap {
    pub file: File,
    pub name: String,
}

impl Tap {
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
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short | IFF_VNET_HDR;
        let attach_err = |source| TapError::Attach {
            name: name.into(),
            source,
        };
        // SAFETY: TUNSETIFF reads and writes the ifreq we own for the duration of the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr) } < 0 {
            return Err(attach_err(std::io::Error::last_os_error()));
        }
        let size = VNET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(attach_err(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }
}
