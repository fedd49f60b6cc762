//! One vsock stream between a guest port and a host Unix socket, with the virtio credit
//! accounting that keeps either side from sending more than the other can buffer.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{HOST_CID, Header, MAX_PAYLOAD, TYPE_STREAM};

/// What we tell the guest we can buffer per connection (bytes from the guest not yet written
/// to the host socket). The guest may never have more than this in flight.
pub const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    AwaitingResponse,
    Established,
}

/// The guest broke the credit rules.
#[derive(Debug, PartialEq, Eq)]
pub struct CreditViolation;

pub struct Connection {
    pub stream: UnixStream,
    /// Our end of the stream (the host's port).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    pub state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest (wrapping, as in the spec).
    rx_cnt: u32,
    /// Payload bytes from the guest written to the host socket (wrapping).
    fwd_cnt: u32,
    last_reported_fwd_cnt: u32,
    to_host: VecDeque<u8>,
    /// Bytes the host sent before the connection was established.
    pub early: Vec<u8>,
    /// Edge-triggered readiness: the host socket may have data we have not read yet.
    pub host_readable: bool,
    /// The host closed its sending side (we told the guest with SHUTDOWN).
    pub host_eof: bool,
    /// The guest will send nothing more; close our write side once `to_host` drains.
    pub guest_done_sending: bool,
    /// The guest closed the connection; remove it once `to_host` drains.
    pub guest_closed: bool,
    /// Our write side of the host socket is shut down (done once: shutting down again wakes
    /// the socket's pollers again, and edge-triggered epoll would never go quiet).
    host_write_shut: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_reported_fwd_cnt: 0,
            to_host: VecDeque::new(),
            early: Vec::new(),
            host_readable: false,
            host_eof: false,
            guest_done_sending: false,
            guest_closed: false,
            host_write_shut: false,
        }
    }

    /// Every guest packet carries its current buffer size and forward count.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// How many more payload bytes the guest can take. A guest claiming to have forwarded more
    /// than we sent gets no credit rather than an overflowed one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// A header from us to the guest on this connection.
    pub fn header(&self, guest_cid: u64, op: u16, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Takes payload from the guest: written to the host socket now where it can be, kept
    /// otherwise. More than our advertised buffer is a violation.
    pub fn push_from_guest(&mut self, data: &[u8]) -> Result<std::io::Result<()>, CreditViolation> {
        if self.to_host.len() + data.len() > BUF_ALLOC as usize {
            return Err(CreditViolation);
        }
        self.to_host.extend(data);
        Ok(self.flush_to_host())
    }

    /// Writes what the host socket takes; `Ok` when it took all it could without blocking.
    pub fn flush_to_host(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Tells the host no more data comes (once).
    pub fn shut_host_write(&mut self) {
        if !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    pub fn to_host_is_empty(&self) -> bool {
        self.to_host.is_empty()
    }

    /// Whether the guest should hear about buffer space we freed (it may be waiting for it).
    pub fn needs_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_reported_fwd_cnt) >= BUF_ALLOC / 4
    }

    /// Records that a packet carrying our `fwd_cnt` went to the guest.
    pub fn credit_reported(&mut self) {
        self.last_reported_fwd_cnt = self.fwd_cnt;
    }

    /// Reads host data for the guest: at most `room` bytes and what the guest has credit for.
    /// `Ok(None)`: nothing to read now (or no credit); `Ok(Some(empty))`: the host closed.
    pub fn read_for_guest(&mut self, room: usize) -> std::io::Result<Option<Vec<u8>>> {
        let want = room.min(self.peer_credit() as usize).min(MAX_PAYLOAD);
        if want == 0 {
            return Ok(None);
        }
        if !self.early.is_empty() {
            let n = want.min(self.early.len());
            let data: Vec<u8> = self.early.drain(..n).collect();
            self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
            return Ok(Some(data));
        }
        let mut buf = vec![0u8; want];
        loop {
            match self.stream.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 1 << 30, 5000, State::Established), b)
    }

    #[test]
    fn credit_follows_the_guests_buffer_and_forward_count() {
        let (mut c, mut host) = conn();
        assert_eq!(
            c.peer_credit(),
            0,
            "no credit before the guest says its buffer size"
        );
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 0,
            ..Default::default()
        });
        host.write_all(&[1u8; 300]).unwrap();
        let got = c.read_for_guest(4096).unwrap().unwrap();
        assert_eq!(got.len(), 100, "limited by the guest's credit");
        assert_eq!(c.peer_credit(), 0);
        assert_eq!(c.read_for_guest(4096).unwrap(), None);
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 60);
        // A lying guest (forwarded more than it got) gets nothing.
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 1000,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_data_beyond_our_buffer_is_a_violation() {
        let (mut c, _host) = conn();
        // The host never reads: the socket buffer fills, then ours.
        let chunk = vec![0u8; 64 * 1024];
        let mut pushed = 0usize;
        while let Ok(result) = c.push_from_guest(&chunk) {
            result.unwrap();
            pushed += chunk.len();
            assert!(pushed < 64 << 20, "never refused");
        }
        assert!(!c.to_host_is_empty());
    }

    #[test]
    fn forwarded_bytes_trigger_credit_updates() {
        let (mut c, mut host) = conn();
        c.push_from_guest(&vec![5u8; (BUF_ALLOC / 4) as usize])
            .unwrap()
            .unwrap();
        assert!(c.needs_credit_update());
        assert_eq!(c.header(3, 6, 0).fwd_cnt, BUF_ALLOC / 4);
        c.credit_reported();
        assert!(!c.needs_credit_update());
        let mut got = vec![0u8; (BUF_ALLOC / 4) as usize];
        host.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|b| *b == 5));
    }
}
