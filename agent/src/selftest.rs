//! The device self-test service (`cocoon.selftest=1` on the kernel command line): a vsock
//! listener on [`PORT`] that lets the host exercise the VM's devices end to end before the
//! container protocol exists. One command line per connection:
//!
//! - `SINK` then data until EOF: replies `<bytes> <fnv1a64 hex>`;
//! - `SOURCE <n> <seed>`: sends n bytes of `PatternStream(seed)`, then closes;
//! - `DIAL <port> <n> <seed>`: connects to the host's `port`, sends the pattern, half-closes,
//!   and replies with the line the host answered;
//! - `REFUSE <port>`: connects to a host port expected to have no listener; replies `refused`
//!   or `connected`;
//! - `MAC`: replies the MAC of the first ethernet interface;
//! - `NETUP <a.b.c.d>/<prefix>`: configures that interface, replies `up`;
//! - `PING <a.b.c.d>`: one ICMP echo, replies `pong` or `timeout`;
//! - `TCPSEND <a.b.c.d> <port> <n> <seed>`: TCP connect, send the pattern, half-close, reply
//!   with the line the peer answered;
//! - `TCPRECV <port>`: listens on TCP `port`, replies `listening`, then takes one connection,
//!   reads it to EOF and replies `<bytes> <fnv1a64 hex>` (and sends the same to the peer);
//! - `POWEROFF`: powers the VM off.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};

use cocoon_agent_protocol::boot_check::{Fnv1a64, PatternStream};

use crate::vsock::{self, HOST_CID};

pub const PORT: u32 = 1025;
const CHUNK: usize = 64 * 1024;

/// Serves until asked to power off.
pub fn serve() {
    let listener = match vsock::Listener::bind(PORT) {
        Ok(l) => l,
        Err(e) => {
            crate::console::line(&format!(
                "cocoon-agent: selftest: cannot listen on vsock port {PORT}: {e}"
            ));
            return;
        }
    };
    crate::console::line(&format!(
        "cocoon-agent: selftest listening on vsock port {PORT}"
    ));
    loop {
        match listener.accept() {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = handle(stream) {
                        crate::console::line(&format!("cocoon-agent: selftest: {e}"));
                    }
                });
            }
            Err(e) => crate::console::line(&format!("cocoon-agent: selftest accept: {e}")),
        }
    }
}

fn handle(stream: File) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.by_ref().take(256).read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> std::io::Result<u64> {
        words
            .get(i)
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad command {line:?}")))
    };
    let mut out = stream;
    match words.first().copied() {
        Some("SINK") => {
            let (bytes, sum) = Fnv1a64::of_reader(&mut reader)?;
            writeln!(out, "{bytes} {sum:016x}")?;
        }
        Some("SOURCE") => {
            send_pattern(&mut out, num(1)? as usize, num(2)?)?;
        }
        Some("DIAL") => {
            let mut host = vsock::connect(HOST_CID, num(1)? as u32)?;
            send_pattern(&mut host, num(2)? as usize, num(3)?)?;
            vsock::shutdown_write(&host);
            let mut reply = String::new();
            BufReader::new(host).take(256).read_line(&mut reply)?;
            write!(out, "{reply}")?;
        }
        Some("REFUSE") => {
            let verdict = if vsock::connect(HOST_CID, num(1)? as u32).is_ok() {
                "connected"
            } else {
                "refused"
            };
            writeln!(out, "{verdict}")?;
        }
        Some("MAC") => {
            let name =
                crate::netif::first_ethernet().ok_or_else(|| std::io::Error::other("no NIC"))?;
            let mac = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))?;
            write!(out, "{mac}")?;
        }
        Some("NETUP") => {
            let (addr, prefix) = words
                .get(1)
                .and_then(|w| w.split_once('/'))
                .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)))
                .ok_or_else(|| std::io::Error::other(format!("bad command {line:?}")))?;
            let name =
                crate::netif::first_ethernet().ok_or_else(|| std::io::Error::other("no NIC"))?;
            crate::netif::configure(&name, addr, prefix)?;
            writeln!(out, "up")?;
        }
        Some("PING") => {
            let target = ip(&words, 1)?;
            let answered = crate::netif::ping(target, std::time::Duration::from_secs(10))?;
            writeln!(out, "{}", if answered { "pong" } else { "timeout" })?;
        }
        Some("TCPSEND") => {
            let peer = std::net::SocketAddr::from((ip(&words, 1)?, num(2)? as u16));
            let mut tcp =
                std::net::TcpStream::connect_timeout(&peer, std::time::Duration::from_secs(30))?;
            send_pattern(&mut tcp, num(3)? as usize, num(4)?)?;
            tcp.shutdown(std::net::Shutdown::Write)?;
            let mut reply = String::new();
            BufReader::new(tcp).take(256).read_line(&mut reply)?;
            write!(out, "{reply}")?;
        }
        Some("TCPRECV") => {
            let listener = std::net::TcpListener::bind(("0.0.0.0", num(1)? as u16))?;
            writeln!(out, "listening")?;
            let (mut tcp, _) = listener.accept()?;
            let (bytes, sum) = Fnv1a64::of_reader(&mut tcp)?;
            let verdict = format!("{bytes} {sum:016x}\n");
            tcp.write_all(verdict.as_bytes())?;
            write!(out, "{verdict}")?;
        }
        Some("POWEROFF") => {
            writeln!(out, "bye")?;
            crate::power::power_off();
        }
        _ => writeln!(out, "unknown command")?,
    }
    Ok(())
}

fn ip(words: &[&str], i: usize) -> std::io::Result<std::net::Ipv4Addr> {
    words
        .get(i)
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad IPv4 address"))
}

fn send_pattern(out: &mut impl Write, len: usize, seed: u64) -> std::io::Result<()> {
    let mut stream = PatternStream::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        stream.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n;
    }
    out.flush()
}
