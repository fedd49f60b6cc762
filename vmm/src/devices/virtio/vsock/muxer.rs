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
//!
//! What a guest can make the host hold is bounded: connections (`MAX_CONNECTIONS`), the
//! packets it is owed (`MAX_CONTROL`: past it the device leaves TX chains in their ring), and
//! time, by a timer in the same epoll: an unanswered CONNECT (`CONNECT_TIMEOUT`), a connection
//! one side has closed and the other does not finish (`HALF_CLOSED_TIMEOUT`, `CLOSE_TIMEOUT`).

use crate::devices::timer::Timer;
use std::collections::{HashMap, VecDeque};

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_vmm_abi::uds::{bind_unix, connect_unix};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, State};
use super::packet::{
    HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Longest `CONNECT <port>\n` line we wait for.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports for host-initiated connections start here (clear of guest-chosen ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most connections (and pending CONNECTs) at once: bounds what a client or guest can pin.
pub const MAX_CONNECTIONS: usize = 1024;
/// Packets without payload owed to the guest (RESPONSE, RST, CREDIT_UPDATE, REQUEST) at which
/// the muxer takes no more work that needs an answer: the device leaves the guest's TX chains
/// in their ring and new host CONNECTs are refused, until the guest gives RX buffers. Each
/// guest packet adds at most two, and while none is taken the connections already open add at
/// most a few each (an RST, the credit updates for the data they hold), so a guest that floods
/// requests and never takes the answers holds a few thousand 44-byte headers at most.
pub const MAX_CONTROL: usize = 128;
/// A host CONNECT the guest neither accepts nor refuses in this long is refused (the client
/// sees its socket close) and the guest gets a reset. A live guest answers in milliseconds;
/// this is for one that never will (hung, or hostile).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One side has closed and the other takes nothing of what is left for this long (a guest
/// without credit or RX buffers for the last data of a host client that closed; a host
/// client that does not read what a guest sent before closing): the connection is reset and
/// its socket closed. Counted from the last progress, as TCP gives up on an orphaned
/// connection whose peer keeps a zero window. A half-close (one direction shut, the socket
/// still held on both sides) has no deadline: the host side can end it whenever it likes.
pub const HALF_CLOSED_TIMEOUT: Duration = Duration::from_secs(60);
/// We sent the guest SHUTDOWN with both flags (the host socket is done): its RST is awaited
/// this long before we reset (as Firecracker does; a Linux guest keeps the data it has).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// accept(2) failing other than for an empty backlog (EMFILE, ENFILE, ENOBUFS): the
/// level-triggered listener is left out of epoll this long, or until one of our sockets closes,
/// so it cannot spin the device thread.
pub const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// How often deadlines are looked at while any is set: they fire up to this late.
const TIMER_TICK: Duration = Duration::from_millis(500);

type Key = (u32, u32); // (local_port, peer_port)

/// epoll data: the kind in the top two bits, then a pending client's fd or a connection serial.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_PENDING: u64 = 1 << 62;
const TOKEN_CONN: u64 = 2 << 62;
const TOKEN_TIMER: u64 = 3 << 62;
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
    /// Periodic while a deadline is set or the listener rests (`TIMER_TICK`).
    timer: Timer,
    timer_running: bool,
    /// Set while accept(2) fails: the listener is out of epoll until then.
    listener_paused_until: Option<Instant>,
    /// accept(2) failed and was logged; cleared by the next accepted client (one log a streak).
    accept_failing: bool,
    /// The VM ended: the listener is shut down and never polled again.
    listener_closed: bool,
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
        let timer = Timer::in_epoll(&epoll, TOKEN_TIMER)?;
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
            timer,
            timer_running: false,
            listener_paused_until: None,
            accept_failing: false,
            listener_closed: false,
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
        // A shut-down listener polls readable for ever and accept(2) fails on it.
        self.listener_closed = true;
        self.listener_paused_until = None;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        self.set_timer(false);
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

    /// Packets owed to the guest that wait for RX buffers.
    #[cfg(test)]
    pub fn owed_packets(&self) -> usize {
        self.control.len()
    }

    /// Whether the guest owes us RX buffers for `MAX_CONTROL` packets: until it gives them, its
    /// TX queue is not served (answering would only grow the queue).
    pub fn control_full(&self) -> bool {
        self.control.len() >= MAX_CONTROL
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
                    TOKEN_TIMER => {
                        self.timer.clear();
                        self.expire(Instant::now());
                    }
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
        let mut accepted = false;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    accepted = true;
                    self.accept_failing = false;
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
                Err(e) if e.kind() == ErrorKind::WouldBlock && accepted => return,
                // That client gave up while in the backlog; the next may be fine.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => accepted = true,
                // Out of fds (or readable with nothing to take, which would repeat as well).
                Err(e) => {
                    self.pause_listener(&e, Instant::now());
                    return;
                }
            }
        }
    }

    /// accept(2) fails (out of fds, most likely) while the listener polls readable, so it would
    /// fail again at once: the listener leaves epoll for `ACCEPT_BACKOFF` or until one of our
    /// sockets closes. The clients wait in the backlog meanwhile.
    fn pause_listener(&mut self, error: &std::io::Error, now: Instant) {
        if self.accept_failing {
            tracing::debug!("vsock: accept on {}: {error}", self.uds_path.display());
        } else {
            tracing::warn!(
                "vsock: cannot accept clients on {}: {error}; trying again in {ACCEPT_BACKOFF:?} \
                 or when a connection closes",
                self.uds_path.display()
            );
            self.accept_failing = true;
        }
        if self.listener_paused_until.is_none() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.listener_paused_until = Some(now + ACCEPT_BACKOFF);
        self.set_timer(true);
    }

    fn resume_listener(&mut self) {
        if self.listener_paused_until.take().is_some() && !self.listener_closed {
            let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
            {
                tracing::warn!("vsock: cannot poll the listener again: {e}");
            }
        }
    }

    /// Starts (or stops) the periodic timer that looks at deadlines.
    fn set_timer(&mut self, on: bool) {
        if self.timer_running == on {
            return;
        }
        let tick = if on { TIMER_TICK } else { Duration::ZERO };
        if let Err(e) = self.timer.set(tick, tick) {
            // Deadlines are then only looked at when the timer is next started.
            tracing::warn!("vsock: cannot set the timer: {e}");
            return;
        }
        self.timer_running = on;
    }

    /// Sets connection `key`'s deadline `after` from now.
    fn set_deadline(&mut self, key: Key, after: Duration) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.deadline = Some(Instant::now() + after);
            self.set_timer(true);
        }
    }

    /// Resets every connection whose deadline is past at `now`, and lets the listener poll
    /// again once its rest is over. The timer stops when nothing is left to wait for.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get(&key) {
                tracing::debug!(?key, state = ?conn.state, "vsock: connection timed out");
            }
            self.reset(key);
        }
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.resume_listener();
        }
        let waiting = self.listener_paused_until.is_some()
            || self.conns.values().any(|c| c.deadline.is_some());
        self.set_timer(waiting);
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
        if self.control_full() {
            // The guest takes no packets: its REQUEST would only grow the queue.
            tracing::debug!("vsock: CONNECT {port} refused: the guest is not taking packets");
            return;
        }
        let local = self.allocate_port();
        let key = (local, port);
        let mut conn = Connection::new(p.stream, local, port, State::AwaitingResponse);
        conn.early = early;
        let request = conn.header(self.guest_cid, OP_REQUEST, 0);
        if self.add_connection(conn) {
            self.control.push_back(request);
            self.set_deadline(key, CONNECT_TIMEOUT);
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
            // An fd is free again.
            self.resume_listener();
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
        let hang_up = set.contains(EventSet::HANG_UP);
        if hang_up && (conn.state == State::AwaitingResponse || conn.guest_closed) {
            // Nobody is left to finish it: the client gave up waiting for the guest, or the
            // host went while the guest's last data waited for it.
            self.reset(key);
            return;
        }
        let shut = hang_up || set.contains(EventSet::READ_HANG_UP);
        conn.host_rdhup |= shut;
        if hang_up && !conn.host_gone && conn.state == State::Established {
            conn.host_gone = true;
            if conn.host_eof {
                // The guest has had all the data; now nobody reads what it sends either.
                let shutdown = conn.header(self.guest_cid, OP_SHUTDOWN, SHUTDOWN_BOTH);
                conn.state = State::Closing;
                self.control.push_back(shutdown);
                self.set_deadline(key, CLOSE_TIMEOUT);
            } else {
                // The rest of the data goes as the guest takes it, but not at its leisure.
                self.set_deadline(key, HALF_CLOSED_TIMEOUT);
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            if !conn.host_readable {
                conn.host_readable = true;
                self.readable.push_back(key);
            } else if shut && !self.readable.contains(&key) {
                // Even a connection waiting for credit is looked at: its end of stream needs
                // none.
                self.readable.push_back(key);
            }
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
        let waiting = conn.to_host_len();
        if conn.flush_to_host().is_err() {
            self.reset(key);
            return;
        }
        if conn.guest_closed && conn.to_host_len() < waiting {
            // Progress on a connection the guest has closed: its deadline moves on.
            conn.deadline = Some(Instant::now() + HALF_CLOSED_TIMEOUT);
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
                conn.deadline = None;
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
                if header.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH {
                    conn.guest_closed = true;
                }
                self.flush(key);
                if self
                    .conns
                    .get(&key)
                    .is_some_and(|c| c.guest_closed && c.deadline.is_none())
                {
                    // Its last data waits for a host that may never read it.
                    self.set_deadline(key, HALF_CLOSED_TIMEOUT);
                }
            }
            (OP_RST, _) => self.remove(key),
            // The guest closes too: both sides are done.
            (OP_SHUTDOWN, State::Closing) => self.reset(key),
            // Sent before it saw our SHUTDOWN: nobody is there to take it.
            (_, State::Closing) => {}
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
                    // The host will send no more; if it is gone altogether, it reads no more
                    // either, and only the guest's RST is left to wait for.
                    conn.host_eof = true;
                    conn.host_readable = false;
                    let flags = if conn.host_gone {
                        conn.state = State::Closing;
                        conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                        SHUTDOWN_BOTH
                    } else {
                        SHUTDOWN_SEND
                    };
                    let h = conn.header(self.guest_cid, OP_SHUTDOWN, flags);
                    conn.credit_reported();
                    if flags == SHUTDOWN_BOTH {
                        self.set_timer(true);
                    }
                    return Some((h, Vec::new()));
                }
                Ok(Some(data)) => {
                    if conn.host_gone {
                        // Progress: the guest is taking what the host left.
                        conn.deadline = Some(Instant::now() + HALF_CLOSED_TIMEOUT);
                    }
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

    fn muxer(name: &str) -> (Muxer, PathBuf) {
        let dir = std::env::temp_dir().join(format!("cocoon-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        (Muxer::new(CID, &path).unwrap(), path)
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
        let (mut m, path) = muxer("ended");
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
        let (mut m, path) = muxer("hostconn");
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
        // The client hangs up: the guest hears SHUTDOWN both ways (nobody reads any more
        // either), and its RST ends the connection.
        drop(client);
        settle(&mut m);
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        m.handle_guest_packet(
            Header {
                src_port: 5000,
                dst_port: req.src_port,
                ..guest_header(OP_RST, 0)
            },
            &[],
        );
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn refused_host_connect_closes_the_client() {
        let (mut m, path) = muxer("refused");
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
        let (mut m, path) = muxer("garbage");
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
        let (mut m, path) = muxer("guestconn");
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
        let (mut m, _path) = muxer("hostile");
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

    /// A guest-initiated connection to `PATH_7000` whose guest offers `buf_alloc` bytes of
    /// credit, its RESPONSE taken; returns the host's end.
    fn guest_connection(m: &mut Muxer, path: &Path, buf_alloc: u32) -> UnixStream {
        let listener = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                buf_alloc,
                ..guest_header(OP_REQUEST, 0)
            },
            &[],
        );
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_RESPONSE);
        listener.accept().unwrap().0
    }

    const GUEST_KEY: Key = (7000, 1000);

    /// A host end that closes with data the guest has no credit for: the guest cannot keep the
    /// connection (and our fd) past `HALF_CLOSED_TIMEOUT`.
    #[test]
    fn a_host_that_hangs_up_is_closed_whatever_the_guests_credit() {
        let (mut m, path) = muxer("hupcredit");
        let mut server = guest_connection(&mut m, &path, 0);
        server.write_all(b"last words").unwrap();
        drop(server);
        settle(&mut m);
        assert!(m.next_rx(4096).is_none(), "no credit: nothing to send");
        let now = Instant::now();
        m.expire(now + HALF_CLOSED_TIMEOUT / 2);
        assert_eq!(m.connection_count(), 1, "the guest may still take it");
        m.expire(now + HALF_CLOSED_TIMEOUT + Duration::from_secs(1));
        assert_eq!(m.connection_count(), 0);
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, h.dst_port), (OP_RST, 1000));
    }

    /// An empty host end that closes is told to a guest without credit (a SHUTDOWN needs
    /// none), and a guest that never answers with RST is reset after `CLOSE_TIMEOUT`.
    #[test]
    fn a_host_end_of_stream_needs_no_credit() {
        let (mut m, path) = muxer("eofcredit");
        drop(guest_connection(&mut m, &path, 0));
        settle(&mut m);
        let (h, _) = m.next_rx(4096).expect("the end of stream, without credit");
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        assert!(m.timer_running);
        let now = Instant::now();
        m.expire(now);
        assert_eq!(m.connection_count(), 1, "waiting for the guest's RST");
        m.expire(now + CLOSE_TIMEOUT + Duration::from_secs(1));
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_RST);
        assert!(!m.timer_running, "nothing left to wait for");
    }

    /// A half-close (the host shut its sending side, and still holds its socket) is told to the
    /// guest without credit, and has no deadline: the host can end it when it likes.
    #[test]
    fn a_half_close_is_told_and_kept() {
        let (mut m, path) = muxer("halfclose");
        let server = guest_connection(&mut m, &path, 0);
        server.shutdown(std::net::Shutdown::Write).unwrap();
        settle(&mut m);
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        m.expire(Instant::now() + HALF_CLOSED_TIMEOUT * 10);
        assert_eq!(m.connection_count(), 1);
        // The guest still sends; the host reads it.
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                ..guest_header(OP_RW, 2)
            },
            b"ok",
        );
        let mut got = [0u8; 2];
        (&server).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok");
    }

    /// A host client that gives up waiting for the guest's RESPONSE is closed at once.
    #[test]
    fn a_client_that_gives_up_on_its_connect_is_forgotten() {
        let (mut m, path) = muxer("giveup");
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        settle(&mut m);
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_REQUEST);
        drop(client);
        settle(&mut m);
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_RST);
    }

    /// A host CONNECT the guest neither accepts nor refuses is refused after `CONNECT_TIMEOUT`.
    #[test]
    fn an_unanswered_connect_times_out() {
        let (mut m, path) = muxer("unanswered");
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        settle(&mut m);
        let (req, _) = m.next_rx(4096).unwrap();
        assert_eq!(req.op, OP_REQUEST);
        assert!(m.timer_running);
        let now = Instant::now();
        m.expire(now + CONNECT_TIMEOUT / 2);
        assert_eq!(m.connection_count(), 1);
        m.expire(now + CONNECT_TIMEOUT + Duration::from_secs(1));
        assert_eq!(m.connection_count(), 0);
        let (rst, _) = m.next_rx(4096).unwrap();
        assert_eq!((rst.op, rst.src_port), (OP_RST, req.src_port));
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "refused: EOF, never OK");
    }

    /// The guest closed with data the host never reads: reset after `HALF_CLOSED_TIMEOUT`.
    #[test]
    fn a_closed_guests_data_does_not_wait_for_ever() {
        let (mut m, path) = muxer("guestclosed");
        let _server = guest_connection(&mut m, &path, 65536);
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..4 {
            m.handle_guest_packet(
                Header {
                    dst_port: 7000,
                    ..guest_header(OP_RW, chunk.len() as u32)
                },
                &chunk,
            );
            if m.conns[&GUEST_KEY].to_host_len() > 0 {
                break;
            }
        }
        assert!(
            m.conns[&GUEST_KEY].to_host_len() > 0,
            "the host socket is full"
        );
        m.handle_guest_packet(
            Header {
                dst_port: 7000,
                flags: SHUTDOWN_BOTH,
                ..guest_header(OP_SHUTDOWN, 0)
            },
            &[],
        );
        while m.next_rx(4096).is_some() {}
        assert_eq!(m.connection_count(), 1, "its data still waits");
        m.expire(Instant::now() + HALF_CLOSED_TIMEOUT + Duration::from_secs(1));
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_RST);
    }

    /// While the guest owes us `MAX_CONTROL` packets, new host CONNECTs are refused instead of
    /// adding REQUESTs.
    #[test]
    fn connects_are_refused_while_the_guest_takes_no_packets() {
        let (mut m, path) = muxer("ctlfull");
        for _ in 0..MAX_CONTROL {
            m.handle_guest_packet(guest_header(OP_RW, 1), b"x");
        }
        assert!(m.control_full());
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        settle(&mut m);
        assert_eq!(m.owed_packets(), MAX_CONTROL);
        assert_eq!(m.connection_count(), 0);
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "refused");
    }

    /// Whether the muxer's epoll fd (what the device thread polls) is readable now.
    fn muxer_ready(m: &Muxer) -> bool {
        let mut pfd = libc::pollfd {
            fd: m.epoll_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own, without waiting.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    /// A listener that polls readable with nothing to accept (here: shut down) leaves epoll
    /// for a while, so the device thread, which polls level-triggered, does not spin.
    #[test]
    fn a_listener_readable_for_nothing_does_not_spin() {
        let (mut m, _path) = muxer("acceptfail");
        // SAFETY: shutdown(2) on the listener the muxer owns.
        unsafe { libc::shutdown(m.listener.as_raw_fd(), libc::SHUT_RDWR) };
        assert!(muxer_ready(&m));
        m.handle_host_events();
        assert!(!muxer_ready(&m), "nothing for the device thread to spin on");
        assert!(m.accept_failing && m.timer_running);
        // After the rest it is tried again, and rests again.
        m.expire(Instant::now() + ACCEPT_BACKOFF);
        assert!(muxer_ready(&m));
        m.handle_host_events();
        assert!(!muxer_ready(&m));
    }

    /// accept(2) failing with EMFILE while a client waits (the listener stays readable) leaves
    /// the listener out of epoll until its rest is over; then the client is taken. Runs in a
    /// child process of its own: the fd limit is the whole process's.
    #[test]
    fn out_of_fds_accept_does_not_spin() {
        const NAME: &str = "devices::virtio::vsock::muxer::tests::out_of_fds_accept_does_not_spin";
        if std::env::var_os("COCOON_TEST_EMFILE_CHILD").is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
                .env("COCOON_TEST_EMFILE_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let (mut m, path) = muxer("emfile");
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes the rlimit we own.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(rc, 0);
        let saved = limit;
        // The lowest free fd: with the limit there, no new fd can be made.
        let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd();
        limit.rlim_cur = lowest_free as libc::rlim_t;
        // SAFETY: setrlimit(2) reads the rlimit we own; this process is the test's alone.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        assert!(muxer_ready(&m));
        m.handle_host_events();
        let spinning = muxer_ready(&m);
        // SAFETY: setrlimit(2) reads the rlimit we own (the limit we found).
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) }, 0);
        assert!(!spinning, "nothing for the device thread to spin on");
        assert!(m.accept_failing);
        m.expire(Instant::now() + ACCEPT_BACKOFF);
        settle(&mut m);
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_REQUEST);
    }

    #[test]
    fn the_listener_comes_back_after_its_rest() {
        let (mut m, path) = muxer("acceptrest");
        let now = Instant::now();
        m.pause_listener(&std::io::Error::from_raw_os_error(libc::EMFILE), now);
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        settle(&mut m);
        assert!(!m.has_rx_work(), "the client waits in the backlog");
        m.expire(now + ACCEPT_BACKOFF);
        settle(&mut m);
        assert_eq!(m.next_rx(4096).unwrap().0.op, OP_REQUEST);
        assert!(!m.accept_failing);
    }
}
