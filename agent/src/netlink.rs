//! Just enough rtnetlink, written by hand, to configure links, addresses and routes: a crate
//! for it would cost agent size, which every boot pays for (the agent is unpacked from the
//! initramfs by emulated guest kernel code).
//!
//! A message is an `nlmsghdr`, a fixed family header (`ifinfomsg`, `ifaddrmsg`, `rtmsg`) and
//! attributes (`rtattr`: length, type, payload), each padded to 4 bytes. Every request asks for
//! an acknowledgement, so a failure comes back as the errno of that request, with the kernel's
//! extended-ack text when it gives one.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// include/uapi/linux/netlink.h and rtnetlink.h; the unit tests hold them against libc's.
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_NEWROUTE: u16 = 24;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
/// In an error message: extended-ack attributes follow the echoed header.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
/// The network namespace to move a link into, as an fd of the sender's (`ip link set netns`).
pub const IFLA_NET_NS_FD: u16 = 28;
pub const IFLA_PERM_ADDRESS: u16 = 54;
/// `ifi_type` of ethernet devices (virtio-net, TAP, veth) and of the loopback.
pub const ARPHRD_ETHER: u16 = 1;
pub const ARPHRD_LOOPBACK: u16 = 772;
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFA_BROADCAST: u16 = 4;
pub const IFA_F_NODAD: u8 = 0x02;
pub const RTA_DST: u16 = 1;
pub const RTA_OIF: u16 = 4;
pub const RTA_GATEWAY: u16 = 5;
pub const RTA_PRIORITY: u16 = 6;
pub const RTA_PREFSRC: u16 = 7;
pub const RT_TABLE_MAIN: u8 = 254;
/// What `ip route add` (and so the engines' CNI plugins) give routes; `ip route` leaves it out.
pub const RTPROT_BOOT: u8 = 3;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
pub const RTN_UNICAST: u8 = 1;

const HEADER_LEN: usize = 16;

/// Rounds up to the 4-byte alignment of netlink headers and attributes.
const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A request being built: header, family header, attributes.
pub struct Message {
    buf: Vec<u8>,
}

impl Message {
    /// `family_header` is the fixed struct after the `nlmsghdr` (its length is a multiple of 4).
    pub fn new(kind: u16, flags: u16, family_header: &[u8]) -> Message {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&[0; 4]); // nlmsg_len, set by `bytes`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&[0; 8]); // nlmsg_seq (set when sent), nlmsg_pid: the kernel's
        buf.extend_from_slice(family_header);
        Message { buf }
    }

    pub fn attr(mut self, kind: u16, payload: &[u8]) -> Message {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    pub fn attr_u32(self, kind: u16, value: u32) -> Message {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel wants interface names.
    pub fn attr_str(self, kind: u16, value: &str) -> Message {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.attr(kind, &payload)
    }

    /// The message as sent, with its length and sequence number filled in.
    pub(crate) fn bytes(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// `struct ifinfomsg`: which link (`index`), and the flags to change (`change` says which bits
/// of `flags` count).
pub fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0] = libc::AF_UNSPEC as u8;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

/// `struct ifaddrmsg`.
pub fn ifaddrmsg(family: u8, prefix: u8, flags: u8, index: i32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = family;
    h[1] = prefix;
    h[2] = flags;
    h[3] = RT_SCOPE_UNIVERSE;
    h[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    h
}

/// `struct rtmsg` of a unicast route in the main table.
pub fn rtmsg(family: u8, dst_len: u8, scope: u8) -> [u8; 12] {
    [
        family,
        dst_len,
        0, // rtm_src_len
        0, // rtm_tos
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        scope,
        RTN_UNICAST,
        0,
        0,
        0,
        0, // rtm_flags
    ]
}

/// The attributes in `buf` (after a family header), as (type, payload). Stops at the first
/// malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]);
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        // NLA_F_NESTED and NLA_F_NET_BYTEORDER are not part of the type.
        Some((kind & 0x3fff, payload))
    })
}

/// One netlink message of a reply: type, flags, sequence number and payload.
struct Reply<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn replies(mut buf: &[u8]) -> impl Iterator<Item = Reply<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < HEADER_LEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < HEADER_LEN || len > buf.len() {
            return None;
        }
        let reply = Reply {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().ok()?),
            payload: &buf[HEADER_LEN..len],
        };
        buf = &buf[align(len).min(buf.len())..];
        Some(reply)
    })
}

/// A request the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{source}{}", .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct NetlinkError {
    pub source: std::io::Error,
    /// The kernel's extended-ack message, e.g. "Invalid prefix for given prefix length".
    pub detail: Option<String>,
}

impl NetlinkError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl From<std::io::Error> for NetlinkError {
    fn from(source: std::io::Error) -> NetlinkError {
        NetlinkError {
            source,
            detail: None,
        }
    }
}

/// The errno of an `NLMSG_ERROR` payload (0 is an acknowledgement) and its extended-ack text.
fn parse_error(flags: u16, payload: &[u8]) -> Option<(i32, Option<String>)> {
    let errno = -i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    // With NETLINK_CAP_ACK only the request's header is echoed; the attributes follow it.
    let detail = (flags & NLM_F_ACK_TLVS != 0)
        .then(|| payload.get(4 + HEADER_LEN..))
        .flatten()
        .and_then(|tlvs| attrs(tlvs).find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG))
        .map(|(_, text)| {
            let text = text.split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(text).into_owned()
        });
    Some((errno, detail))
}

/// A link as RTM_GETLINK shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: i32,
    /// `ifi_type`: the link layer, [`ARPHRD_ETHER`] for a NIC, [`ARPHRD_LOOPBACK`] for `lo`.
    pub link_type: u16,
    pub flags: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// The address the device came with (IFLA_PERM_ADDRESS), which a MAC change leaves.
    pub permanent_mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
}

fn parse_link(payload: &[u8]) -> Option<Link> {
    let header = payload.get(..16)?;
    // ifi_family (1 byte), padding, ifi_type (2), ifi_index (4), ifi_flags (4), ifi_change.
    let mut link = Link {
        index: i32::from_ne_bytes(header[4..8].try_into().ok()?),
        link_type: u16::from_ne_bytes([header[2], header[3]]),
        flags: u32::from_ne_bytes(header[8..12].try_into().ok()?),
        name: String::new(),
        mac: None,
        permanent_mac: None,
        mtu: None,
    };
    for (kind, value) in attrs(&payload[16..]) {
        match kind {
            IFLA_IFNAME => {
                let name = value.split(|&b| b == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_ADDRESS => link.mac = value.try_into().ok(),
            IFLA_PERM_ADDRESS => link.permanent_mac = value.try_into().ok(),
            IFLA_MTU => link.mtu = value.try_into().ok().map(u32::from_ne_bytes),
            _ => {}
        }
    }
    Some(link)
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> std::io::Result<Netlink> {
        // SAFETY: plain socket(2); the fd is owned by nothing else.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Errors explained in words, and acknowledgements without a copy of the request. Both
        // only improve the replies, so a kernel without them is fine.
        for option in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            let on: libc::c_int = 1;
            // SAFETY: setsockopt reads an int we own for the duration of the call.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    option,
                    (&raw const on).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok(Netlink {
            fd,
            seq: 0,
            // A link dump carries a few KiB of statistics per link; the kernel fills at most
            // this much per datagram and goes on in the next.
            buf: vec![0; 32 << 10],
        })
    }

    fn send(&mut self, message: &mut Message) -> std::io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = message.bytes(self.seq);
        // SAFETY: send reads `bytes`, which outlives the call. The kernel is the default peer
        // of an unconnected netlink socket.
        let rc = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// The next datagram's length in `self.buf`.
    fn receive(&mut self) -> std::io::Result<usize> {
        loop {
            // SAFETY: recv writes at most buf.len() bytes into our buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Sends `message` and waits for its acknowledgement.
    pub fn request(&mut self, mut message: Message) -> Result<(), NetlinkError> {
        let flags = u16::from_ne_bytes([message.buf[6], message.buf[7]]) | NLM_F_ACK;
        message.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        let seq = self.send(&mut message)?;
        loop {
            let n = self.receive()?;
            for reply in replies(&self.buf[..n]) {
                if reply.seq != seq || reply.kind != NLMSG_ERROR {
                    continue;
                }
                let (errno, detail) = parse_error(reply.flags, reply.payload)
                    .ok_or_else(|| std::io::Error::other("truncated netlink acknowledgement"))?;
                return match errno {
                    0 => Ok(()),
                    errno => Err(NetlinkError {
                        source: std::io::Error::from_raw_os_error(errno),
                        detail,
                    }),
                };
            }
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let seq = self.send(&mut Message::new(
            RTM_GETLINK,
            NLM_F_DUMP,
            &ifinfomsg(0, 0, 0),
        ))?;
        let mut links = Vec::new();
        loop {
            let n = self.receive()?;
            for reply in replies(&self.buf[..n]) {
                if reply.seq != seq {
                    continue;
                }
                match reply.kind {
                    NLMSG_DONE => return Ok(links),
                    NLMSG_ERROR => {
                        let (errno, detail) =
                            parse_error(reply.flags, reply.payload).unwrap_or((libc::EIO, None));
                        return Err(NetlinkError {
                            source: std::io::Error::from_raw_os_error(errno),
                            detail,
                        });
                    }
                    RTM_NEWLINK => links.extend(parse_link(reply.payload)),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_kernels() {
        assert_eq!(NLMSG_ERROR, libc::NLMSG_ERROR as u16);
        assert_eq!(NLMSG_DONE, libc::NLMSG_DONE as u16);
        assert_eq!(RTM_NEWLINK, libc::RTM_NEWLINK);
        assert_eq!(RTM_GETLINK, libc::RTM_GETLINK);
        assert_eq!(RTM_NEWADDR, libc::RTM_NEWADDR);
        assert_eq!(RTM_NEWROUTE, libc::RTM_NEWROUTE);
        assert_eq!(NLM_F_REQUEST, libc::NLM_F_REQUEST as u16);
        assert_eq!(NLM_F_ACK, libc::NLM_F_ACK as u16);
        assert_eq!(NLM_F_EXCL, libc::NLM_F_EXCL as u16);
        assert_eq!(NLM_F_CREATE, libc::NLM_F_CREATE as u16);
        assert_eq!(NLM_F_DUMP, libc::NLM_F_DUMP as u16);
        assert_eq!(NETLINK_CAP_ACK, libc::NETLINK_CAP_ACK);
        assert_eq!(NETLINK_EXT_ACK, libc::NETLINK_EXT_ACK);
        assert_eq!(IFLA_ADDRESS, libc::IFLA_ADDRESS);
        assert_eq!(IFLA_IFNAME, libc::IFLA_IFNAME);
        assert_eq!(IFLA_MTU, libc::IFLA_MTU);
        assert_eq!(IFLA_PERM_ADDRESS, libc::IFLA_PERM_ADDRESS);
        assert_eq!(IFLA_NET_NS_FD, libc::IFLA_NET_NS_FD);
        assert_eq!(ARPHRD_ETHER, libc::ARPHRD_ETHER);
        assert_eq!(ARPHRD_LOOPBACK, libc::ARPHRD_LOOPBACK);
        assert_eq!(IFA_ADDRESS, libc::IFA_ADDRESS);
        assert_eq!(IFA_LOCAL, libc::IFA_LOCAL);
        assert_eq!(IFA_BROADCAST, libc::IFA_BROADCAST);
        assert_eq!(u32::from(IFA_F_NODAD), libc::IFA_F_NODAD);
        assert_eq!(RTA_DST, libc::RTA_DST);
        assert_eq!(RTA_OIF, libc::RTA_OIF);
        assert_eq!(RTA_GATEWAY, libc::RTA_GATEWAY);
        assert_eq!(RTA_PRIORITY, libc::RTA_PRIORITY);
        assert_eq!(RTA_PREFSRC, libc::RTA_PREFSRC);
        assert_eq!(RT_TABLE_MAIN, libc::RT_TABLE_MAIN);
        assert_eq!(RTPROT_BOOT, libc::RTPROT_BOOT);
        assert_eq!(RT_SCOPE_UNIVERSE, libc::RT_SCOPE_UNIVERSE);
        assert_eq!(RT_SCOPE_LINK, libc::RT_SCOPE_LINK);
        assert_eq!(RTN_UNICAST, libc::RTN_UNICAST);
        assert_eq!(size_of::<libc::nlmsghdr>(), HEADER_LEN);
        assert_eq!(size_of::<libc::ifinfomsg>(), ifinfomsg(0, 0, 0).len());
        assert_eq!(size_of::<libc::ifaddrmsg>(), ifaddrmsg(0, 0, 0, 0).len());
    }

    #[test]
    fn attributes_are_padded_to_four_bytes_and_the_length_covers_all() {
        let mut message = Message::new(RTM_NEWLINK, 0, &ifinfomsg(7, 0, 0))
            .attr_str(IFLA_IFNAME, "eth0")
            .attr_u32(IFLA_MTU, 1400)
            .attr(IFLA_ADDRESS, &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let bytes = message.bytes(9).to_vec();
        // header 16 + ifinfomsg 16 + name (4 + 5 -> 12) + mtu (8) + MAC (4 + 6 -> 12)
        assert_eq!(bytes.len(), 64);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 64);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), RTM_NEWLINK);
        assert_eq!(u16::from_ne_bytes([bytes[6], bytes[7]]), NLM_F_REQUEST);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 9);
        assert_eq!(i32::from_ne_bytes(bytes[20..24].try_into().unwrap()), 7);
        // rta_len counts the payload without its padding; the padding is zeros.
        assert_eq!(
            &bytes[32..44],
            &[9, 0, 3, 0, b'e', b't', b'h', b'0', 0, 0, 0, 0]
        );
        assert_eq!(&bytes[44..48], &[8, 0, 4, 0]);
        assert_eq!(u32::from_ne_bytes(bytes[48..52].try_into().unwrap()), 1400);
        assert_eq!(
            &bytes[52..64],
            &[10, 0, 1, 0, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0]
        );

        let parsed: Vec<(u16, Vec<u8>)> =
            attrs(&bytes[32..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(
            parsed,
            [
                (IFLA_IFNAME, b"eth0\0".to_vec()),
                (IFLA_MTU, 1400u32.to_ne_bytes().to_vec()),
                (IFLA_ADDRESS, vec![0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            ]
        );
        // A truncated attribute ends the walk instead of reading past the buffer.
        assert_eq!(attrs(&bytes[32..40]).count(), 0);
    }

    #[test]
    fn a_link_dump_entry_and_an_error_with_its_explanation_are_read() {
        // As the kernel fills it: ifi_type set (ifinfomsg() leaves it 0 for requests).
        let mut header = ifinfomsg(3, 1, 0);
        header[2..4].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        let mut dump = Message::new(RTM_NEWLINK, 0x2, &header)
            .attr_str(IFLA_IFNAME, "eth1")
            .attr(IFLA_ADDRESS, &[2, 0xc0, 0xc0, 0, 0, 1])
            .attr(IFLA_PERM_ADDRESS, &[2, 0xc0, 0xc0, 0, 0, 2])
            .attr_u32(IFLA_MTU, 1500);
        let bytes = dump.bytes(1).to_vec();
        let reply = replies(&bytes).next().unwrap();
        assert_eq!(
            parse_link(reply.payload),
            Some(Link {
                index: 3,
                link_type: ARPHRD_ETHER,
                flags: 1,
                name: "eth1".into(),
                mac: Some([2, 0xc0, 0xc0, 0, 0, 1]),
                permanent_mac: Some([2, 0xc0, 0xc0, 0, 0, 2]),
                mtu: Some(1500),
            })
        );

        // nlmsgerr: -errno, the request's header, then the extended-ack attributes.
        let mut payload = (-libc::EINVAL).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; HEADER_LEN]);
        let mut error = Message::new(NLMSG_ERROR, NLM_F_ACK_TLVS, &payload)
            .attr_str(NLMSGERR_ATTR_MSG, "Invalid prefix for given prefix length");
        let bytes = error.bytes(5).to_vec();
        let reply = replies(&bytes).next().unwrap();
        assert_eq!((reply.kind, reply.seq), (NLMSG_ERROR, 5));
        assert_eq!(
            parse_error(reply.flags, reply.payload),
            Some((
                libc::EINVAL,
                Some("Invalid prefix for given prefix length".into())
            ))
        );
        assert_eq!(parse_error(0, &[0; 20]), Some((0, None)));
    }
}
