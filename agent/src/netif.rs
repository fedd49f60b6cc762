//! Guest network interfaces: address, netmask and link state through the classic ioctls, and
//! an ICMP echo for reachability checks.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn socket(kind: libc::c_int, protocol: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned by nothing else.
    let fd = check(unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: fd was just created.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!(
            "bad interface name {name:?}"
        )));
    }
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(ifr)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The first interface that is not the loopback (virtio-net's is `eth0`).
pub fn first_ethernet() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Gives `name` the address `addr/prefix` and brings it up.
pub fn configure(name: &str, addr: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
    if prefix > 32 {
        return Err(std::io::Error::other(format!(
            "prefix /{prefix} is not IPv4"
        )));
    }
    let sock = socket(libc::SOCK_DGRAM, 0)?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    for (request, value) in [(SIOCSIFADDR, addr), (SIOCSIFNETMASK, Ipv4Addr::from(mask))] {
        let mut ifr = ifreq(name)?;
        ifr.ifr_ifru.ifru_addr = sockaddr(value);
        // SAFETY: the ioctl reads the ifreq we own for the duration of the call.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut ifr) })?;
    }
    set_up(&sock, name)
}

/// Brings `name` up in the calling thread's network namespace. For `lo` the kernel then adds
/// 127.0.0.1/8 and ::1 itself, which is all a container's loopback needs.
pub fn bring_up(name: &str) -> std::io::Result<()> {
    set_up(&socket(libc::SOCK_DGRAM, 0)?, name)
}

fn set_up(sock: &OwnedFd, name: &str) -> std::io::Result<()> {
    let mut ifr = ifreq(name)?;
    // SAFETY: the ioctl fills the ifreq we own for the duration of the call (ifru_flags).
    check(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: the kernel just wrote ifru_flags, the member we read.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS reads the ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, &mut ifr) })?;
    Ok(())
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one ICMP echo request to `target`; true when the reply comes within `timeout`.
pub fn ping(target: Ipv4Addr, timeout: Duration) -> std::io::Result<bool> {
    let sock = socket(libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval we own.
    check(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    let id: u16 = 0xc0c0;
    let mut packet = vec![8u8, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes());
    packet.extend_from_slice(b"cocoon-agent ping payload 32 by");
    let sum = icmp_checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    let to = sockaddr(target);
    // SAFETY: packet and the address are valid for the call.
    check(unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            &to,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        ) as libc::c_int
    })?;
    let mut buf = [0u8; 1500];
    loop {
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return if err.kind() == std::io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(err)
            };
        }
        let reply = &buf[..n as usize];
        let ihl = usize::from(reply.first().copied().unwrap_or(0) & 0xf) * 4;
        // An echo reply (type 0) with our id; raw sockets also see our own request.
        if reply.len() >= ihl + 8 && reply[ihl] == 0 && reply[ihl + 4..ihl + 6] == id.to_be_bytes()
        {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_checksum_of_a_known_packet() {
        // Echo request, id 1, seq 1, no payload: checksum 0xf7fd.
        assert_eq!(icmp_checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }
}
