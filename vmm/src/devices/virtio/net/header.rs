//! `struct virtio_net_hdr_v1`, the 12 bytes in front of every frame, and the checks it gets.
//!
//! A guest's TX header goes to the host kernel (the TAP turns it into GSO and checksum
//! metadata), so it is checked here first: only what the guest negotiated and what lies within
//! its frame passes. An RX header comes from the TAP and is fitted to what the guest accepted.

use super::device::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

/// `struct virtio_net_hdr_v1`, which virtio 1.x always uses (`num_buffers` included).
pub const VNET_HDR_SIZE: usize = 12;

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;
/// Where `num_buffers` sits in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHeader {
    /// The header at the start of `bytes`, if there are enough of them.
    pub fn parse(bytes: &[u8]) -> Option<VnetHeader> {
        let b = bytes.get(..VNET_HDR_SIZE)?;
        let le = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Some(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadHeader {
    #[error("frame of {0} bytes is not longer than its virtio-net header")]
    Short(usize),
    #[error("flags {0:#x} other than NEEDS_CSUM")]
    Flags(u8),
    #[error("NEEDS_CSUM without the checksum offload negotiated")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} does not fit in the {len}-byte packet")]
    CsumOutside { start: u16, offset: u16, len: usize },
    #[error("GSO type {0:#x} is not TCPv4 or TCPv6")]
    GsoType(u8),
    #[error("GSO type {0:#x} without its offload negotiated")]
    GsoNotNegotiated(u8),
    #[error("GSO type {0:#x} with segment size 0")]
    GsoSizeZero(u8),
    #[error("GSO header length {hdr_len} beyond the {len}-byte packet")]
    HdrLen { hdr_len: u16, len: usize },
}

/// Checks the header of a guest TX `frame` (header and packet) against the driver's
/// `features`; the TAP only gets frames that pass.
pub fn check_tx(frame: &[u8], features: u64) -> Result<VnetHeader, BadHeader> {
    let hdr = match VnetHeader::parse(frame) {
        Some(h) if frame.len() > VNET_HDR_SIZE => h,
        _ => return Err(BadHeader::Short(frame.len())),
    };
    let packet_len = frame.len() - VNET_HDR_SIZE;
    // DATA_VALID and RSC_INFO are the device's to set (virtio 1.x 5.1.6.2): from a driver they
    // are as unknown as any other bit.
    if hdr.flags & !F_NEEDS_CSUM != 0 {
        return Err(BadHeader::Flags(hdr.flags));
    }
    if hdr.flags & F_NEEDS_CSUM != 0 {
        if features & VIRTIO_NET_F_CSUM == 0 {
            return Err(BadHeader::CsumNotNegotiated);
        }
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > packet_len {
            return Err(BadHeader::CsumOutside {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: packet_len,
            });
        }
    }
    let needed = match hdr.gso_type & !GSO_ECN {
        GSO_NONE if hdr.gso_type == GSO_NONE => None,
        GSO_TCPV4 => Some(VIRTIO_NET_F_HOST_TSO4),
        GSO_TCPV6 => Some(VIRTIO_NET_F_HOST_TSO6),
        _ => return Err(BadHeader::GsoType(hdr.gso_type)),
    };
    if let Some(feature) = needed {
        if features & feature == 0 {
            return Err(BadHeader::GsoNotNegotiated(hdr.gso_type));
        }
        if hdr.gso_size == 0 {
            return Err(BadHeader::GsoSizeZero(hdr.gso_type));
        }
        if usize::from(hdr.hdr_len) > packet_len {
            return Err(BadHeader::HdrLen {
                hdr_len: hdr.hdr_len,
                len: packet_len,
            });
        }
    }
    Ok(hdr)
}

/// Fits the header of a frame from the TAP to what the guest accepted (`features`): flags are
/// cleared for a guest without GUEST_CSUM (virtio 1.x 5.1.6.3.1), and a partial checksum or a
/// GSO frame the guest did not accept is refused (the TAP's offloads follow the guest's, but
/// frames it queued before a change may still come).
pub fn fit_rx(frame: &mut [u8], features: u64) -> Result<(), BadHeader> {
    let hdr = match VnetHeader::parse(frame) {
        Some(h) if frame.len() > VNET_HDR_SIZE => h,
        _ => return Err(BadHeader::Short(frame.len())),
    };
    if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            return Err(BadHeader::CsumNotNegotiated);
        }
        frame[0] = 0;
    } else if hdr.flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
        return Err(BadHeader::Flags(hdr.flags));
    }
    let needed = match hdr.gso_type {
        GSO_NONE => return Ok(()),
        GSO_TCPV4 => VIRTIO_NET_F_GUEST_TSO4,
        GSO_TCPV6 => VIRTIO_NET_F_GUEST_TSO6,
        // ECN and UDP offloads are never asked of the TAP.
        other => return Err(BadHeader::GsoType(other)),
    };
    if features & needed == 0 || features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return Err(BadHeader::GsoNotNegotiated(hdr.gso_type));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_HOST_TSO6
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_GUEST_TSO6;

    fn frame(hdr: VnetHeader, packet_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_SIZE + packet_len];
        f[0] = hdr.flags;
        f[1] = hdr.gso_type;
        f[2..4].copy_from_slice(&hdr.hdr_len.to_le_bytes());
        f[4..6].copy_from_slice(&hdr.gso_size.to_le_bytes());
        f[6..8].copy_from_slice(&hdr.csum_start.to_le_bytes());
        f[8..10].copy_from_slice(&hdr.csum_offset.to_le_bytes());
        f[10..12].copy_from_slice(&hdr.num_buffers.to_le_bytes());
        f
    }

    fn plain() -> VnetHeader {
        VnetHeader {
            flags: 0,
            gso_type: GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: 0,
            csum_offset: 0,
            num_buffers: 0,
        }
    }

    /// A TCPv4 TSO frame as Linux sends it: checksum partial at the TCP header.
    fn tso4() -> VnetHeader {
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..plain()
        }
    }

    #[test]
    fn valid_tx_frames_pass() {
        assert_eq!(check_tx(&frame(plain(), 60), 0), Ok(plain()));
        assert!(check_tx(&frame(tso4(), 65000), ALL).is_ok());
        let tso6 = VnetHeader {
            gso_type: GSO_TCPV6,
            csum_start: 54,
            ..tso4()
        };
        assert!(
            check_tx(
                &frame(tso6, 9000),
                VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO6
            )
            .is_ok()
        );
        let ecn = VnetHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..tso4()
        };
        assert!(check_tx(&frame(ecn, 3000), ALL).is_ok());
        let csum_only = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..plain()
        };
        // The checksum field ends exactly at the packet's end.
        assert!(check_tx(&frame(csum_only, 42), VIRTIO_NET_F_CSUM).is_ok());
        // num_buffers is the device's field: whatever the driver left there is ignored.
        let junk = VnetHeader {
            num_buffers: 0xbeef,
            ..plain()
        };
        assert!(check_tx(&frame(junk, 60), 0).is_ok());
    }

    #[test]
    fn each_bad_tx_header_is_refused() {
        let cases: Vec<(VnetHeader, usize, u64, BadHeader)> = vec![
            (
                VnetHeader {
                    flags: F_DATA_VALID,
                    ..plain()
                },
                60,
                ALL,
                BadHeader::Flags(F_DATA_VALID),
            ),
            (
                VnetHeader {
                    flags: 0x80 | F_NEEDS_CSUM,
                    ..tso4()
                },
                9000,
                ALL,
                BadHeader::Flags(0x81),
            ),
            (
                VnetHeader {
                    gso_type: 3, // UDP (UFO)
                    ..tso4()
                },
                9000,
                ALL,
                BadHeader::GsoType(3),
            ),
            (
                VnetHeader {
                    gso_type: 5, // UDP_L4
                    ..tso4()
                },
                9000,
                ALL,
                BadHeader::GsoType(5),
            ),
            (
                VnetHeader {
                    gso_type: GSO_ECN,
                    ..plain()
                },
                60,
                ALL,
                BadHeader::GsoType(GSO_ECN),
            ),
            (
                tso4(),
                9000,
                ALL & !VIRTIO_NET_F_HOST_TSO4,
                BadHeader::GsoNotNegotiated(GSO_TCPV4),
            ),
            (
                VnetHeader {
                    gso_type: GSO_TCPV6,
                    ..tso4()
                },
                9000,
                ALL & !VIRTIO_NET_F_HOST_TSO6,
                BadHeader::GsoNotNegotiated(GSO_TCPV6),
            ),
            (
                VnetHeader {
                    gso_size: 0,
                    ..tso4()
                },
                9000,
                ALL,
                BadHeader::GsoSizeZero(GSO_TCPV4),
            ),
            (
                VnetHeader {
                    hdr_len: 101,
                    ..tso4()
                },
                100,
                ALL,
                BadHeader::HdrLen {
                    hdr_len: 101,
                    len: 100,
                },
            ),
            (
                VnetHeader {
                    csum_start: 40,
                    csum_offset: 59,
                    ..tso4()
                },
                100,
                ALL,
                BadHeader::CsumOutside {
                    start: 40,
                    offset: 59,
                    len: 100,
                },
            ),
            (
                VnetHeader {
                    flags: F_NEEDS_CSUM,
                    csum_start: u16::MAX,
                    csum_offset: u16::MAX,
                    ..plain()
                },
                60,
                ALL,
                BadHeader::CsumOutside {
                    start: u16::MAX,
                    offset: u16::MAX,
                    len: 60,
                },
            ),
            (
                tso4(),
                9000,
                ALL & !VIRTIO_NET_F_CSUM,
                BadHeader::CsumNotNegotiated,
            ),
        ];
        for (hdr, len, features, want) in cases {
            assert_eq!(
                check_tx(&frame(hdr, len), features),
                Err(want),
                "{hdr:?} len {len}"
            );
        }
        assert_eq!(check_tx(&[0; 12], ALL), Err(BadHeader::Short(12)));
        assert_eq!(check_tx(&[0; 3], ALL), Err(BadHeader::Short(3)));
    }

    #[test]
    fn rx_headers_are_fitted_to_the_guest() {
        // A guest without GUEST_CSUM sees no flags, and no partial checksum or GSO frame.
        let mut valid = frame(
            VnetHeader {
                flags: F_DATA_VALID,
                ..plain()
            },
            60,
        );
        assert_eq!(fit_rx(&mut valid, 0), Ok(()));
        assert_eq!(valid[0], 0);
        assert_eq!(
            fit_rx(&mut frame(tso4(), 9000), 0),
            Err(BadHeader::CsumNotNegotiated)
        );
        let gso_no_csum = VnetHeader { flags: 0, ..tso4() };
        assert!(fit_rx(&mut frame(gso_no_csum, 9000), 0).is_err());
        // One with it keeps them; GSO needs the matching GUEST_TSO.
        let mut f = frame(tso4(), 9000);
        assert_eq!(fit_rx(&mut f, ALL), Ok(()));
        assert_eq!(f[0], F_NEEDS_CSUM);
        assert_eq!(
            fit_rx(&mut frame(tso4(), 9000), ALL & !VIRTIO_NET_F_GUEST_TSO4),
            Err(BadHeader::GsoNotNegotiated(GSO_TCPV4))
        );
        let ecn = VnetHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..tso4()
        };
        assert!(fit_rx(&mut frame(ecn, 9000), ALL).is_err());
        assert!(fit_rx(&mut [0u8; 12], ALL).is_err());
    }
}
