//! Receive coalescing: consecutive TCP/IPv4 segments of one flow read from the TAP are merged
//! into one GSO frame for the guest (what a NIC's LRO does).
//!
//! Why: on a PVM host every packet costs the guest thousands of emulated kernel instructions
//! (interrupt, driver, allocations, GRO, TCP, the ACK), whatever its size. A local sender paced
//! to the guest's slow rate hands the TAP one or two MSS per skb, so TUN's own offloads rarely
//! produce large frames; merged here, the guest's stack sees one 64 KiB segment instead of 44.
//!
//! Only what merges back losslessly is taken: IPv4 without options or fragments, TCP with ACK
//! and at most PSH (carried by the merged frame), a checksum the host produced or checked (NEEDS_CSUM or DATA_VALID), the same
//! addresses, ports, TOS, TTL, DF, ACK number, window and options, in sequence. A timestamp
//! option may advance from segment to segment; the merged frame carries the latest (as
//! FreeBSD's LRO does), so the guest echoes the newest value. The merged frame goes to the
//! guest with NEEDS_CSUM and the pseudo-header sum in the TCP checksum field, as TUN itself
//! hands over a GSO frame.

use super::header::{F_DATA_VALID, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, VNET_HDR_SIZE, VnetHeader};

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
/// Where the IPv4 header starts in a frame (after the virtio-net and Ethernet headers).
const IP: usize = VNET_HDR_SIZE + ETH_HLEN;
/// Where the TCP header starts (IPv4 without options).
const TCP: usize = IP + IP_HLEN;
/// The TCP checksum field, from the start of the packet (what `csum_start`/`csum_offset` name).
const CSUM_START: u16 = (ETH_HLEN + IP_HLEN) as u16;
const CSUM_OFFSET: u16 = 16;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
/// The largest IPv4 packet.
const MAX_IP_LEN: usize = 65535;

/// A frame from the TAP that can start or extend a merged frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Bytes before the payload (virtio-net header included).
    pub head_len: usize,
    pub payload_len: usize,
    pub seq: u32,
    /// The segment size the merged frame gets: the payload's, or the frame's own GSO size.
    pub mss: usize,
    /// This segment must be the last one merged: shorter than its MSS. (PSH does not end a
    /// run: a sender waiting for send-buffer space sets it on every skb; the merged frame
    /// carries it, and how long a frame may wait is the device's hold policy.)
    pub ends: bool,
    /// The frame was already a GSO frame (its MSS is the sender's, not its length).
    pub gso: bool,
    /// Offset of the timestamp option's TSval, when the options are exactly NOP NOP TS.
    pub ts: Option<usize>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Ones' complement sum of `data` (big-endian 16-bit words), not folded.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// What `frame` (virtio-net header, Ethernet, IPv4, TCP, payload) is, if it may be merged.
pub fn parse(frame: &[u8]) -> Option<Segment> {
    let hdr = VnetHeader::parse(frame)?;
    let checked = match hdr.flags {
        F_NEEDS_CSUM => hdr.csum_start == CSUM_START && hdr.csum_offset == CSUM_OFFSET,
        F_DATA_VALID => true,
        _ => false,
    };
    if !checked || frame.len() < TCP + 20 {
        return None;
    }
    if be16(frame, VNET_HDR_SIZE + 12) != 0x0800 {
        return None;
    }
    let ip = &frame[IP..];
    // Version 4 and no options; no fragment; TCP; the packet fills the frame (no padding).
    if ip[0] != 0x45 || be16(ip, 6) & 0x3fff != 0 || ip[9] != 6 {
        return None;
    }
    if usize::from(be16(ip, 2)) != frame.len() - IP || fold(sum16(&ip[..IP_HLEN], 0)) != 0xffff {
        return None;
    }
    let tcp = &frame[TCP..];
    let doff = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    // ACK with at most PSH: no SYN, FIN, RST, URG, ECE or CWR, whose meaning a merge would blur.
    if doff < 20 || tcp.len() <= doff || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    let head_len = TCP + doff;
    let payload_len = frame.len() - head_len;
    let mss = match hdr.gso_type {
        GSO_NONE => payload_len,
        GSO_TCPV4 if hdr.gso_size > 0 => usize::from(hdr.gso_size),
        _ => return None,
    };
    let ts = (doff == 32 && tcp[20..24] == [1, 1, 8, 10]).then_some(TCP + 24);
    Some(Segment {
        head_len,
        payload_len,
        seq: be32(tcp, 4),
        mss,
        ends: !payload_len.is_multiple_of(mss),
        gso: hdr.gso_type != GSO_NONE,
        ts,
    })
}

/// A merged frame being built.
pub struct Merged {
    pub buf: Vec<u8>,
    first: Segment,
    next_seq: u32,
    segments: usize,
    psh: bool,
    /// No more may be added (the last segment ended the run, or it is full).
    pub ready: bool,
}

impl Merged {
    /// Starts a merged frame with `frame`, which `parse` described as `seg`.
    pub fn start(mut buf: Vec<u8>, frame: &[u8], seg: Segment) -> Merged {
        buf.clear();
        buf.extend_from_slice(frame);
        Merged {
            buf,
            first: seg,
            next_seq: seg.seq.wrapping_add(seg.payload_len as u32),
            segments: 1,
            psh: false,
            ready: seg.ends || Self::full(frame.len(), seg),
        }
    }

    fn full(len: usize, seg: Segment) -> bool {
        len - IP + seg.mss > MAX_IP_LEN
    }

    /// Whether `frame` (`seg`) continues this one.
    fn continues(&self, frame: &[u8], seg: Segment) -> bool {
        let head = &self.buf[..self.first.head_len];
        let (ip, ip2) = (&head[IP..TCP], &frame[IP..TCP]);
        let (tcp, tcp2) = (&head[TCP..], &frame[TCP..seg.head_len]);
        let same_ip = ip[1] == ip2[1] // TOS
            && ip[6] & 0x40 == ip2[6] & 0x40 // DF
            && ip[8] == ip2[8] // TTL
            && ip[12..20] == ip2[12..20]; // addresses
        // Ports, ACK number, then data offset, flags but PSH, window.
        let same_tcp = tcp[..4] == tcp2[..4]
            && tcp[8..12] == tcp2[8..12]
            && tcp[12] == tcp2[12]
            && tcp[13] & !TCP_PSH == tcp2[13] & !TCP_PSH
            && tcp[14..16] == tcp2[14..16];
        let same_options = match (self.first.ts, seg.ts) {
            (Some(at), Some(_)) => {
                // The timestamps may only move forward; nothing else may differ.
                let newer = |off: usize| {
                    let (old, new) = (be32(&self.buf, at + off), be32(frame, at + off));
                    new.wrapping_sub(old) as i32 >= 0
                };
                newer(0) && newer(4)
            }
            (None, None) => head[TCP + 20..] == frame[TCP + 20..seg.head_len],
            _ => false,
        };
        // A plain segment shorter than the MSS is the sender's last one of a run.
        let same_mss = seg.mss == self.first.mss || (!seg.gso && seg.payload_len < self.first.mss);
        self.first.head_len == seg.head_len
            && same_mss
            && seg.seq == self.next_seq
            && same_ip
            && same_tcp
            && same_options
            && self.buf.len() - IP + seg.payload_len <= MAX_IP_LEN
    }

    /// Adds `frame` (`seg`) if it continues this one; false (and nothing changed) otherwise.
    pub fn append(&mut self, frame: &[u8], seg: Segment) -> bool {
        if self.ready || !self.continues(frame, seg) {
            return false;
        }
        if let Some(at) = self.first.ts {
            self.buf[at..at + 8].copy_from_slice(&frame[at..at + 8]);
        }
        self.buf.extend_from_slice(&frame[seg.head_len..]);
        self.next_seq = seg.seq.wrapping_add(seg.payload_len as u32);
        self.segments += 1;
        self.psh |= frame[TCP + 13] & TCP_PSH != 0;
        let short = !seg.payload_len.is_multiple_of(self.first.mss);
        self.ready = seg.ends || short || Self::full(self.buf.len(), self.first);
        true
    }

    /// The frame to hand the guest: one segment as it came; several as one TCPv4 GSO frame.
    pub fn finish(mut self) -> Vec<u8> {
        if self.segments == 1 {
            return self.buf;
        }
        let b = &mut self.buf;
        let ip_len = b.len() - IP;
        b[IP + 2..IP + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        b[IP + 10..IP + 12].fill(0);
        let ip_sum = !fold(sum16(&b[IP..TCP], 0));
        b[IP + 10..IP + 12].copy_from_slice(&ip_sum.to_be_bytes());
        if self.psh {
            b[TCP + 13] |= TCP_PSH;
        }
        // The pseudo-header sum, which the guest's stack completes (CHECKSUM_PARTIAL).
        let tcp_len = (ip_len - IP_HLEN) as u32;
        let pseudo = fold(sum16(&b[IP + 12..IP + 20], 6 + tcp_len));
        b[TCP + 16..TCP + 18].copy_from_slice(&pseudo.to_be_bytes());
        let hdr_len = (self.first.head_len - VNET_HDR_SIZE) as u16;
        b[0] = F_NEEDS_CSUM;
        b[1] = GSO_TCPV4;
        b[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&(self.first.mss as u16).to_le_bytes());
        b[6..8].copy_from_slice(&CSUM_START.to_le_bytes());
        b[8..10].copy_from_slice(&CSUM_OFFSET.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;
    pub(crate) const ACK: u8 = TCP_ACK;
    pub(crate) const PSH: u8 = TCP_PSH;

    /// A TCP/IPv4 frame from the TAP: NEEDS_CSUM, NOP NOP TS options, `payload` bytes of data.
    pub(crate) fn segment(seq: u32, payload: usize, flags: u8, tsval: u32) -> Vec<u8> {
        let mut f = vec![0u8; TCP + 32 + payload];
        f[0] = F_NEEDS_CSUM;
        f[6..8].copy_from_slice(&CSUM_START.to_le_bytes());
        f[8..10].copy_from_slice(&CSUM_OFFSET.to_le_bytes());
        f[VNET_HDR_SIZE + 12..VNET_HDR_SIZE + 14].copy_from_slice(&[8, 0]);
        let ip_len = (f.len() - IP) as u16;
        let ip = &mut f[IP..TCP];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let sum = !fold(sum16(ip, 0));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let tcp = &mut f[TCP..];
        tcp[0..4].copy_from_slice(&[0x1f, 0x40, 0x1b, 0x58]);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
        tcp[12] = 8 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&502u16.to_be_bytes());
        tcp[20..24].copy_from_slice(&[1, 1, 8, 10]);
        tcp[24..28].copy_from_slice(&tsval.to_be_bytes());
        tcp[28..32].copy_from_slice(&9u32.to_be_bytes());
        for (i, b) in tcp[32..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        f
    }

    fn merge(frames: &[Vec<u8>]) -> (Merged, usize) {
        let seg = parse(&frames[0]).unwrap();
        let mut m = Merged::start(Vec::new(), &frames[0], seg);
        let mut taken = 1;
        for f in &frames[1..] {
            if !m.append(f, parse(f).unwrap()) {
                break;
            }
            taken += 1;
        }
        (m, taken)
    }

    #[test]
    fn consecutive_segments_become_one_gso_frame() {
        let frames: Vec<Vec<u8>> = (0..4u32)
            .map(|i| {
                segment(
                    1000 + i * 1448,
                    1448,
                    TCP_ACK | if i == 3 { TCP_PSH } else { 0 },
                    5 + i,
                )
            })
            .collect();
        let (m, taken) = merge(&frames);
        assert_eq!(taken, 4);
        assert!(!m.ready, "PSH is carried, not a reason to stop");
        let out = m.finish();
        assert_eq!(out.len(), TCP + 32 + 4 * 1448);
        let hdr = VnetHeader::parse(&out).unwrap();
        assert_eq!(
            (
                hdr.flags,
                hdr.gso_type,
                hdr.gso_size,
                hdr.hdr_len,
                hdr.csum_start,
                hdr.csum_offset
            ),
            (F_NEEDS_CSUM, GSO_TCPV4, 1448, 66, 34, 16)
        );
        assert_eq!(usize::from(be16(&out, IP + 2)), out.len() - IP);
        assert_eq!(fold(sum16(&out[IP..TCP], 0)), 0xffff, "IP checksum");
        assert_eq!(out[TCP + 13], TCP_ACK | TCP_PSH);
        assert_eq!(be32(&out, TCP + 24), 8, "the latest TSval");
        // The payload, in order.
        for (i, frame) in frames.iter().enumerate() {
            let at = TCP + 32 + i * 1448;
            assert_eq!(out[at..at + 1448], frame[TCP + 32..]);
        }
        // The checksum field holds the pseudo-header sum: completing it gives a valid segment.
        let tcp_len = (out.len() - TCP) as u32;
        let pseudo = sum16(&out[IP + 12..IP + 20], 6 + tcp_len);
        let mut whole = out[TCP..].to_vec();
        let partial = be16(&whole, 16);
        assert_eq!(partial, fold(pseudo));
        whole[16..18].fill(0);
        let check = !fold(sum16(&whole, pseudo));
        whole[16..18].copy_from_slice(&check.to_be_bytes());
        assert_eq!(fold(sum16(&whole, pseudo)), 0xffff);
    }

    #[test]
    fn what_would_not_merge_back_is_left_alone() {
        let base = segment(1000, 1448, TCP_ACK, 5);
        let next = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut s = segment(2448, 1448, TCP_ACK, 5);
            f(&mut s);
            s
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("gap in sequence", segment(2449, 1448, TCP_ACK, 5)),
            ("older timestamp", segment(2448, 1448, TCP_ACK, 4)),
            ("longer than the MSS", segment(2448, 1449, TCP_ACK, 5)),
            ("other port", next(&|s| s[TCP + 1] ^= 1)),
            ("other ACK number", next(&|s| s[TCP + 11] ^= 1)),
            ("other window", next(&|s| s[TCP + 15] ^= 1)),
            ("other TTL", next(&|s| s[IP + 8] = 63)),
        ];
        for (what, f) in cases {
            let seg = parse(&f);
            let (mut m, _) = merge(std::slice::from_ref(&base));
            assert!(!seg.is_some_and(|s| m.append(&f, s)), "{what}");
            assert_eq!(m.finish(), base, "{what}: a single segment goes as it came");
        }
        // Not mergeable at all.
        let refused = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut s = segment(1000, 1448, TCP_ACK, 5);
            f(&mut s);
            parse(&s).is_none()
        };
        assert!(
            refused(&|s| s[0] = 0),
            "checksum neither offloaded nor checked"
        );
        assert!(refused(&|s| s[TCP + 13] |= TCP_FIN));
        assert!(refused(&|s| s[TCP + 13] = TCP_SYN | TCP_ACK));
        assert!(refused(&|s| s[TCP + 13] |= TCP_RST));
        assert!(refused(&|s| s[TCP + 13] |= 0x40), "ECE");
        assert!(refused(&|s| s[IP + 6] |= 0x20), "more fragments");
        assert!(refused(&|s| s[IP + 9] = 17), "UDP");
        assert!(refused(&|s| s[IP + 11] ^= 1), "bad IP checksum");
        assert!(refused(&|s| s[VNET_HDR_SIZE + 13] = 0xdd), "IPv6");
        assert!(refused(&|s| s.truncate(TCP + 32)), "no payload");
        assert!(refused(&|s| s.truncate(TCP + 10)), "short");
        assert!(refused(&|s| s.push(0)), "padding");
        assert!(parse(&[]).is_none());
    }

    #[test]
    fn a_short_segment_ends_the_run_and_a_full_frame_stops() {
        let (m, taken) = merge(&[
            segment(0, 1448, TCP_ACK, 1),
            segment(1448, 100, TCP_ACK, 1),
            segment(1548, 1448, TCP_ACK, 1),
        ]);
        assert_eq!(taken, 2);
        assert!(m.ready);
        let frames: Vec<Vec<u8>> = (0..60u32)
            .map(|i| segment(i * 1448, 1448, TCP_ACK, 1))
            .collect();
        let (m, taken) = merge(&frames);
        assert!(m.ready);
        assert!(m.buf.len() - IP <= MAX_IP_LEN);
        assert_eq!(taken, (MAX_IP_LEN - IP_HLEN - 32) / 1448);
    }
}
