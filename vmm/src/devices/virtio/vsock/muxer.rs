//! The host side of the vsock device, in Firecracker's "hybrid" shape: guest streams end in
//! Unix sockets.
//!
//! - Host to guest: a client connects to the VMM's socket `PATH` and writes `CONNECT <port>\n`;
//!   once the guest's listener on `<port>` accepts, the client reads `OK <host_port>\n` and
//!   the socket carries the stream. If nobody listens, the socket is closed instead.
//! - Guest to host: a guest connect to (CID 2, port P) reaches the Unix socket `PATH_P`; if
//!   nothing listens there the guest gets a reset.
//!
//! Everything runs on the device thread. Host sockets are non-blocking and edge-triggered in
//! the muxer's own epoll, which the device thread watches as one fd. A connection whose guest
//! has no credit or whose host is slow only stops itself: data waits in that connection's
//! buffers, bounded by the credit rules.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use cocoon_vmm_abi::uds::{bind_unix, connect_unix};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, State};
use super::packet::{
    HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Longest `CONNECT <port>\n` line we wait for.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports for host-initiated connections start here (clear of guest-chosen ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most connections (and pending CONNECTs) at once: bounds what a client or guest can pin.
pub const MAX_CONNECTIONS: usize = 1024;

type Key = (u32, u32); // (local_port, peer_port)

/// epoll data: the kind in the top two bits, then a pending client's fd or a connection serial.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_PENDING: u64 = 1 << 62;
const TOKEN_CONN: u64 = 2 << 62;
const TOKEN_KIND: u64 = 3 << 62;

struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Counters for the benchmark and for debugging a guest.
#[derive(Debug, Default, Clone, Copy)]
pub struct MuxerMetrics {
    pub connections: u64,
    pub resets_sent: u64,
    pub bad_packets: u64,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    conn_by_token: HashMap<u64, Key>,
    token_by_conn: HashMap<Key, u64>,
    next_token: u64,
    pending: HashMap<RawFd, PendingConnect>,
    /// Packets without payload waiting for an RX buffer.
    control: VecDeque<Header>,
    /// Connections that may have host data to send, served round-robin.
    readable: VecDeque<Key>,
    next_port: u32,
    pub metrics: MuxerMetrics,
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket file there is replaced; any other file is not).
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<Muxer> {
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(uds_path)?;
            } else {
                return Err(std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                ));
            }
        }
        // The path is the engine's state directory plus a name: any length.
        let listener = bind_unix(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            conn_by_token: HashMap::new(),
            token_by_conn: HashMap::new(),
            next_token: 0,
            pending: HashMap::new(),
            control: VecDeque::new(),
            readable: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            metrics: MuxerMetrics::default(),
        })
    }

    /// The VM has ended: every host client's connection (accepted, mid-`CONNECT`, or still in
    /// the listener's backlog) is closed, so it reads EOF instead of waiting for a guest that
    /// will not answer, and new ones are refused. The socket file stays: a VM restored in its
    /// place may already have bound the path again.
    pub fn close_host_side(&mut self) {
        self.conns.clear();
        self.conn_by_token.clear();
        self.token_by_conn.clear();
        self.pending.clear();
        self.readable.clear();
        self.control.clear();
        // SAFETY: shutdown(2) on the listener we own; a connect to it is then refused.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        while let Ok((stream, _)) = self.listener.accept() {
            drop(stream);
        }
    }

    /// The socket host clients connect to (`PATH_<port>` for guest connects derives from it).
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Whether a packet may be waiting for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.readable.is_empty()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drains the muxer's epoll: new clients, CONNECT lines, readable and writable sockets.
    /// At most `MAX_ROUNDS` batches per call, so a socket that keeps signalling cannot hold
    /// the device thread (the outer epoll is level-triggered: what is left comes back).
    pub fn handle_host_events(&mut self) {
        const MAX_ROUNDS: usize = 16;
        let mut events = [EpollEvent::default(); 64];
        for _ in 0..MAX_ROUNDS {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll failed: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let data = event.data();
                let set = event.event_set();
                match data & TOKEN_KIND {
                    TOKEN_LISTENER => self.accept_clients(),
                    TOKEN_PENDING => self.read_connect_line((data & !TOKEN_KIND) as RawFd),
                    _ => {
                        if let Some(key) = self.conn_by_token.get(&data).copied() {
                            self.host_socket_ready(key, set);
                        }
                    }
                }
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() + self.conns.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: the client sees the socket close
                    }
                    let fd = stream.as_raw_fd();
                    let ev = EpollEvent::new(
                        EventSet::IN | EventSet::READ_HANG_UP,
                        TOKEN_PENDING | fd as u64,
                    );
                    if self.epoll.ctl(ControlOperation::Add, fd, ev).is_ok() {
                        self.pending.insert(
                            fd,
                            PendingConnect {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock, or a transient accept error: try on the next event
            }
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - p.line.len();
        let done = match p.stream.read(&mut buf[..room.max(1)]) {
            Ok(0) => true,
            Ok(n) => {
                p.line.extend_from_slice(&buf[..n]);
                p.line.contains(&b'\n') || p.line.len() >= MAX_CONNECT_LINE
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                false
            }
            Err(_) => true,
        };
        if !done {
            return;
        }
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some((port, early)) = parse_connect(&p.line) else {
            return; // malformed: closing the socket is the answer
        };
        let local = self.allocate_port();
        let mut conn = Connection::new(p.stream, local, port, State::AwaitingResponse);
        conn.early = early;
        let request = conn.header(self.guest_cid, OP_REQUEST, 0);
        if self.add_connection(conn) {
            self.control.push_back(request);
        }
    }

    /// The host-side port the next host-initiated connection gets.
    pub fn next_port(&self) -> u32 {
        self.next_port
    }

    /// Goes on allocating host-side ports from `port` (a restored device continues where the
    /// saved one was: see `VsockState::next_port`).
    pub fn continue_ports_from(&mut self, port: u32) {
        self.next_port = port.max(FIRST_LOCAL_PORT);
    }

    fn allocate_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = if port == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    fn add_connection(&mut self, conn: Connection) -> bool {
        let key = (conn.local_port, conn.peer_port);
        let token = TOKEN_CONN | (self.next_token & !TOKEN_KIND);
        self.next_token += 1;
        let ev = EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
            token,
        );
        if self
            .epoll
            .ctl(ControlOperation::Add, conn.stream.as_raw_fd(), ev)
            .is_err()
        {
            return false;
        }
        self.conn_by_token.insert(token, key);
        self.token_by_conn.insert(key, token);
        self.conns.insert(key, conn);
        self.metrics.connections += 1;
        true
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if let Some(token) = self.token_by_conn.remove(&key) {
                self.conn_by_token.remove(&token);
            }
        }
    }

    /// Resets a connection: the guest hears RST, the host socket is closed.
    fn reset(&mut self, key: Key) {
        if let Some(conn) = self.conns.get(&key) {
            let rst = conn.header(self.guest_cid, OP_RST, 0);
            self.control.push_back(rst);
            self.metrics.resets_sent += 1;
        }
        self.remove(key);
    }

    fn host_socket_ready(&mut self, key: Key, set: EventSet) {
        tracing::trace!(?key, ?set, "vsock: host socket ready");
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP)
            && !conn.host_readable
        {
            conn.host_readable = true;
            self.readable.push_back(key);
        }
        if set.contains(EventSet::OUT) {
            self.flush(key);
        }
    }

    /// Writes buffered guest data to the host and finishes a pending shutdown or close.
    fn flush(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.flush_to_host().is_err() {
            self.reset(key);
            return;
        }
        let mut update = None;
        if conn.needs_credit_update() && conn.state == State::Established {
            update = Some(conn.header(self.guest_cid, OP_CREDIT_UPDATE, 0));
            conn.credit_reported();
        }
        let drained = conn.to_host_is_empty();
        let (closed, done_sending) = (conn.guest_closed, conn.guest_done_sending);
        if let Some(update) = update {
            self.control.push_back(update);
        }
        if drained && closed {
            self.reset(key);
        } else if drained
            && done_sending
            && let Some(conn) = self.conns.get_mut(&key)
        {
            conn.shut_host_write();
        }
    }

    /// A packet the guest sent (already parsed and bounded).
    pub fn handle_guest_packet(&mut self, header: Header, payload: &[u8]) {
        tracing::trace!(
            op = header.op,
            src = header.src_port,
            dst = header.dst_port,
            len = header.len,
            flags = header.flags,
            "vsock: from guest"
        );
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            self.metrics.bad_packets += 1;
            return; // not addressed from our guest to us: dropped
        }
        let key = (header.dst_port, header.src_port);
        if header.type_ != TYPE_STREAM {
            self.metrics.bad_packets += 1;
            self.reset_unknown(&header);
            return;
        }
        if header.op == OP_REQUEST {
            self.guest_connect(header);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if header.op != OP_RST {
                self.reset_unknown(&header);
            }
            return;
        };
        conn.update_peer_credit(&header);
        match (header.op, conn.state) {
            (OP_RESPONSE, State::AwaitingResponse) => {
                conn.state = State::Established;
                let ok = format!("OK {}\n", conn.local_port);
                // A fresh socket's buffer always takes a dozen bytes.
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset(key);
                } else if !conn.early.is_empty() && !conn.host_readable {
                    conn.host_readable = true;
                    self.readable.push_back(key);
                }
            }
            (OP_RW, State::Established) => match conn.push_from_guest(payload) {
                Ok(Ok(())) => self.flush(key),
                Ok(Err(_)) | Err(_) => self.reset(key),
            },
            (OP_CREDIT_UPDATE, State::Established) => {
                if conn.host_readable && !self.readable.contains(&key) {
                    self.readable.push_back(key);
                }
            }
            (OP_CREDIT_REQUEST, State::Established) => {
                let update = conn.header(self.guest_cid, OP_CREDIT_UPDATE, 0);
                conn.credit_reported();
                self.control.push_back(update);
            }
            (OP_SHUTDOWN, State::Established) => {
                if header.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                }
                if header.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    conn.guest_closed = true;
                }
                self.flush(key);
            }
            (OP_RST, _) => self.remove(key),
            _ => {
                self.metrics.bad_packets += 1;
                self.reset(key);
            }
        }
    }

    /// A guest connects to host port P: the Unix socket `PATH_P`.
    fn guest_connect(&mut self, header: Header) {
        let key = (header.dst_port, header.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.reset_unknown(&header);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", header.dst_port));
        let path = PathBuf::from(path);
        let stream = match connect_unix(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connect to {}: {e}", path.display());
                self.reset_unknown(&header);
                return;
            }
        };
        let mut conn =
            Connection::new(stream, header.dst_port, header.src_port, State::Established);
        conn.update_peer_credit(&header);
        let response = conn.header(self.guest_cid, OP_RESPONSE, 0);
        if self.add_connection(conn) {
            self.control.push_back(response);
        } else {
            self.reset_unknown(&header);
        }
    }

    /// RST for a packet that belongs to no connection.
    fn reset_unknown(&mut self, to: &Header) {
        self.metrics.resets_sent += 1;
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// The next packet for the guest, with at most `room` payload bytes.
    pub fn next_rx(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        let packet = self.next_rx_packet(room);
        if let Some((h, data)) = &packet {
            tracing::trace!(
                op = h.op,
                src = h.src_port,
                dst = h.dst_port,
                len = data.len(),
                flags = h.flags,
                "vsock: to guest"
            );
        }
        packet
    }

    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        // A buffer with no room for payload (a guest's odd RX chain) must not make a connection
        // look drained: it keeps its place until a real buffer comes.
        if room == 0 {
            return None;
        }
        while let Some(key) = self.readable.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.state != State::Established || conn.host_eof {
                conn.host_readable = false;
                continue;
            }
            match conn.read_for_guest(room) {
                Ok(Some(data)) if data.is_empty() => {
                    // The host will send no more.
                    conn.host_eof = true;
                    conn.host_readable = false;
                    let h = conn.header(self.guest_cid, OP_SHUTDOWN, SHUTDOWN_SEND);
                    conn.credit_reported();
                    return Some((h, Vec::new()));
                }
                Ok(Some(data)) => {
                    let h = conn.header(self.guest_cid, OP_RW, 0);
                    conn.credit_reported();
                    // More may be waiting (edge-triggered): come back after the others.
                    self.readable.push_back(key);
                    return Some((h, data));
                }
                Ok(None) => {
                    // No credit (a CREDIT_UPDATE re-queues it) or drained (the next edge does).
                    if conn.peer_credit() > 0 {
                        conn.host_readable = false;
                    }
                }
                Err(_) => {
                    self.reset(key);
                    if let Some(h) = self.control.pop_front() {
                        return Some((h, Vec::new()));
                    }
                }
            }
        }
        None
    }
}

/// `CONNECT <port>\n` → the port and any bytes after the line.
fn parse_connect(line: &[u8]) -> Option<(u32, Vec<u8>)> {
    let end = line.iter().position(|b| *b == b'\n')?;
    let text = std::str::from_utf8(&line[..end]).ok()?;
    let port = text.strip_prefix("CONNECT ")?.trim().parse().ok()?;
    Some((port, line[end + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::tests::header as guest_header;

    const CID: u64 = 3;

    /// A test's scratch directory, removed when the test ends (passed or not).
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn muxer(name: &str) -> (Muxer, PathBuf, Scratch) {
        let dir = std::env::temp_dir().join(format!("cocoon-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        (Muxer::new(CID, &path).unwrap(), path, Scratch(dir))
    }

    fn settle(m: &mut Muxer) {
        for _ in 0..10 {
            m.handle_host_events();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A host client of a VM that ended reads EOF wherever it was: mid-`CONNECT`, or not yet
    /// accepted; and a new client is refused.
    #[test]
    fn clients_of_an_ended_vm_see_the_end() {
        use std::io::Read;
        let (mut m, path, _scratch) = muxer("ended");
        let mut waiting = UnixStream::connect(&path).unwrap();
        settle(&mut m);
        let mut queued = UnixStream::connect(&path).unwrap();
        m.close_host_side();
        for client in [&mut waiting, &mut queued] {
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 8];
            assert_eq!(client.read(&mut buf).unwrap(), 0, "EOF, not a wait");
        }
        assert!(UnixStream::connect(&path).is_err(), "refused after the end");
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some((52, vec![])));
        assert_eq!(parse_connect(b"CONNECT 52\nhi"), Some((52, b"hi".to_vec())));
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999\n"), None);
        assert_eq!(parse_connect(b"connect 1\n"), None);
        assert_eq!(parse_connect(b"CONNECT 1"), None);
    }

    #[test]
    fn sockets_in_a_long_state_dir() {
        // Docker's /var/run/docker/runtime-runc/moby/<64 hex>/ and then some.
        let root = std::env::temp_dir().join(format!("cocoon-vsock-long-{}", std::process::id()));
        let dir = root.join("r".repeat(130)).join("f".repeat(64));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        assert!(path.as_os_str().len() > 200);
        let mut m = Muxer::new(CID, &path).unwrap();

        let mut client = connect_unix(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        settle(&mut m);
        let (req, _) = m.next_rx(4096).expect("a REQUEST for the guest");
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 5000));

        // The guest-initiated companion PATH_7000 is longer still.
        let mut companion = path.clone().into_os_string();
        companion.push("_7000");
        let listener = bind_unix(Path::new(&companion)).unwrap();
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                ..guest_header(OP_REQUEST, 0)
            },
            &[],
        );
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!(h.op, OP_RESPONSE);
        listener.accept().unwrap();
        drop(m);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn host_connect_becomes_request_then_ok() {
        let (mut m, path, _scratch) = muxer("hostconn");
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        settle(&mut m);
        let (req, _) = m.next_rx(4096).expect("a REQUEST for the guest");
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid, req.src_cid),
            (OP_REQUEST, 5000, CID, HOST_CID)
        );
        // The guest accepts.
        let response = Header {
            op: OP_RESPONSE,
            src_port: 5000,
            dst_port: req.src_port,
            ..guest_header(OP_RESPONSE, 0)
        };
        m.handle_guest_packet(response, &[]);
        let mut ok = [0u8; 64];
        let n = client.read(&mut ok).unwrap();
        assert_eq!(
            std::str::from_utf8(&ok[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        // Guest data reaches the client.
        let rw = Header {
            op: OP_RW,
            src_port: 5000,
            dst_port: req.src_port,
            len: 3,
            ..guest_header(OP_RW, 3)
        };
        m.handle_guest_packet(rw, b"abc");
        let mut got = [0u8; 3];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        // Client data goes to the guest within its credit.
        client.write_all(b"xyz").unwrap();
        settle(&mut m);
        assert!(m.next_rx(0).is_none(), "a buffer without room gets nothing");
        let (h, data) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"xyz"[..]));
        // The client hangs up: the guest hears SHUTDOWN.
        drop(client);
        settle(&mut m);
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    }

    #[test]
    fn refused_host_connect_closes_the_client() {
        let (mut m, path, _scratch) = muxer("refused");
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 9\n").unwrap();
        settle(&mut m);
        let (req, _) = m.next_rx(4096).unwrap();
        let rst = Header {
            src_port: 9,
            dst_port: req.src_port,
            ..guest_header(OP_RST, 0)
        };
        m.handle_guest_packet(rst, &[]);
        assert_eq!(m.connection_count(), 0);
        let mut buf = [0u8; 8];
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "the client sees EOF, never OK"
        );
    }

    #[test]
    fn garbage_instead_of_connect_is_dropped() {
        let (mut m, path, _scratch) = muxer("garbage");
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(&[b'A'; 100]).unwrap();
        settle(&mut m);
        assert!(!m.has_rx_work());
        let mut buf = [0u8; 8];
        // Closed with our unread bytes in it: EOF or a reset, never data.
        assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
    }

    #[test]
    fn guest_connect_reaches_path_port_or_is_reset() {
        let (mut m, path, _scratch) = muxer("guestconn");
        // Nobody listens on PATH_7000.
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                ..guest_header(OP_REQUEST, 0)
            },
            &[],
        );
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, h.dst_port, h.src_port), (OP_RST, 1000, 7000));
        // Someone does.
        let listener = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                ..guest_header(OP_REQUEST, 0)
            },
            &[],
        );
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!(h.op, OP_RESPONSE);
        let (mut server, _) = listener.accept().unwrap();
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                ..guest_header(OP_RW, 4)
            },
            b"ping",
        );
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // The guest closes: after the data drained, RST and the host socket closes.
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                flags: 3,
                ..guest_header(OP_SHUTDOWN, 0)
            },
            &[],
        );
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_RST);
        assert_eq!(server.read(&mut got).unwrap(), 0);
    }

    #[test]
    fn hostile_guest_packets_do_no_harm() {
        let (mut m, _path, _scratch) = muxer("hostile");
        // Wrong source CID or destination: dropped silently.
        m.handle_guest_packet(
            Header {
                src_cid: 99,
                ..guest_header(OP_REQUEST, 0)
            },
            &[],
        );
        m.handle_guest_packet(
            Header {
                dst_cid: 5,
                ..guest_header(OP_REQUEST, 0)
            },
            &[],
        );
        assert!(!m.has_rx_work());
        // Unknown type, unknown op, data for no connection: reset.
        m.handle_guest_packet(
            Header {
                type_: 2,
                ..guest_header(OP_REQUEST, 0)
            },
            &[],
        );
        m.handle_guest_packet(guest_header(OP_RW, 3), b"abc");
        m.handle_guest_packet(guest_header(99, 0), &[]);
        for _ in 0..3 {
            assert_eq!(m.next_rx(4096).unwrap().0.op, OP_RST);
        }
        // RST for no connection: nothing (no RST storms).
        m.handle_guest_packet(guest_header(OP_RST, 0), &[]);
        assert!(m.next_rx(4096).is_none());
        assert_eq!(m.metrics.bad_packets, 3);
    }
}
