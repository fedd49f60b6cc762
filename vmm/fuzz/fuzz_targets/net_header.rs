//! The virtio-net header checks never panic: whatever `check_tx` passes lies within its frame
//! and uses only negotiated offloads; `fit_rx` and the receive coalescer take any TAP frame.
#![no_main]

use cocoon_vmm::devices::virtio::net::coalesce::{self, Merged};
use cocoon_vmm::devices::virtio::net::device::{
    FEATURES, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};
use cocoon_vmm::devices::virtio::net::header::{
    F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, VNET_HDR_SIZE, check_tx, fit_rx,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the driver's features (the offloads all sit in the low 16 bits),
    // the rest is a frame; a second frame after a 0xff 0xff separator feeds the coalescer.
    let Some((pick, frame)) = data.split_at_checked(2) else {
        return;
    };
    let features = FEATURES & u64::from(u16::from_le_bytes([pick[0], pick[1]]));
    if let Ok(hdr) = check_tx(frame, features) {
        let packet = frame.len() - VNET_HDR_SIZE;
        assert!(packet > 0);
        if hdr.flags & F_NEEDS_CSUM != 0 {
            assert!(features & VIRTIO_NET_F_CSUM != 0);
            assert!(usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2 <= packet);
        }
        match hdr.gso_type & !GSO_ECN {
            GSO_NONE => assert_eq!(hdr.gso_type, GSO_NONE),
            GSO_TCPV4 => assert!(features & VIRTIO_NET_F_HOST_TSO4 != 0),
            _ => assert!(features & VIRTIO_NET_F_HOST_TSO6 != 0),
        }
        if hdr.gso_type != GSO_NONE {
            assert!(hdr.gso_size > 0 && usize::from(hdr.hdr_len) <= packet);
        }
    }
    let mut rx = frame.to_vec();
    let _ = fit_rx(&mut rx, features);
    let (first, second) = match frame.windows(2).position(|w| w == [0xff, 0xff]) {
        Some(at) => (&frame[..at], &frame[at + 2..]),
        None => (frame, &[][..]),
    };
    if let Some(seg) = coalesce::parse(first) {
        let mut merged = Merged::start(Vec::new(), first, seg);
        if let Some(next) = coalesce::parse(second) {
            merged.append(second, next);
        }
        let out = merged.finish();
        assert!(out.len() >= first.len() && out.len() <= VNET_HDR_SIZE + 14 + 65535);
    }
});
