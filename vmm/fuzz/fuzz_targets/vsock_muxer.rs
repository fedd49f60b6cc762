//! The vsock muxer as a whole, driven by sequences of guest packets (any op, flags, ports,
//! credit numbers and payload) interleaved with real host clients on its Unix socket (CONNECT
//! lines, garbage, data, half and full closes) and a host listener guest connects reach.
//! It must never panic, never hand the guest more payload than the RX buffer's room, and never
//! hold more connections than its limit.
#![no_main]

mod input;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use cocoon_vmm::devices::virtio::vsock::muxer::{MAX_CONNECTIONS, Muxer};
use cocoon_vmm::devices::virtio::vsock::packet::{HOST_CID, Header, MAX_PAYLOAD, TYPE_STREAM};
use input::Input;
use libfuzzer_sys::fuzz_target;

const GUEST_CID: u64 = 3;
/// The host port a guest connect reaches (a listener at `PATH_5000` exists); 5001 has none.
const LISTENED_PORT: u32 = 5000;
/// The muxer's first port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const MAX_OPS: usize = 96;
const MAX_STREAMS: usize = 16;

struct Sockets {
    uds: PathBuf,
    listener: UnixListener,
}

fn sockets() -> &'static Sockets {
    static SOCKETS: OnceLock<Sockets> = OnceLock::new();
    SOCKETS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cocoon-fuzz-muxer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let listened = dir.join(format!("v.sock_{LISTENED_PORT}"));
        let _ = std::fs::remove_file(&listened);
        let listener = UnixListener::bind(&listened).unwrap();
        listener.set_nonblocking(true).unwrap();
        Sockets { uds, listener }
    })
}

fn port(choice: u8) -> u32 {
    match choice % 6 {
        0 => LISTENED_PORT,
        1 => LISTENED_PORT + 1,
        n => FIRST_LOCAL_PORT + u32::from(n - 2),
    }
}

fn guest_packet(input: &mut Input) -> (Header, Vec<u8>) {
    let sel = input.u8().unwrap_or(0);
    let ports = input.u8().unwrap_or(0);
    let op = u16::from(input.u8().unwrap_or(0) % 9);
    let flags = u32::from(input.u8().unwrap_or(0) % 4);
    let buf_alloc = input.u32();
    let fwd_cnt = input.u32();
    let len = usize::from(input.u8().unwrap_or(0)) * 4;
    let payload = input.bytes(len).to_vec();
    let header = Header {
        // Mostly well addressed, sometimes not: wrong CIDs and types must be dropped or reset.
        src_cid: if sel & 0x80 != 0 {
            u64::from(sel)
        } else {
            GUEST_CID
        },
        dst_cid: if sel & 0x40 != 0 { 7 } else { HOST_CID },
        src_port: 1024 + u32::from(ports & 0x3),
        dst_port: port(ports >> 2),
        len: payload.len() as u32,
        type_: if sel & 0x20 != 0 { 2 } else { TYPE_STREAM },
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    };
    (header, payload)
}

fuzz_target!(|data: &[u8]| {
    let sockets = sockets();
    let mut muxer = Muxer::new(GUEST_CID, &sockets.uds).unwrap();
    let mut streams: Vec<UnixStream> = Vec::new();
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        match op % 9 {
            0 | 1 => {
                let (header, payload) = guest_packet(&mut input);
                muxer.handle_guest_packet(header, &payload);
            }
            2 => {
                let room = (input.u32() as usize) % (MAX_PAYLOAD + 2);
                if let Some((_, payload)) = muxer.next_rx(room) {
                    assert!(
                        payload.len() <= room,
                        "{} bytes for {room} of room",
                        payload.len()
                    );
                }
            }
            3 => muxer.handle_host_events(),
            4 if streams.len() < MAX_STREAMS => {
                if let Ok(mut s) = UnixStream::connect(&sockets.uds) {
                    s.set_nonblocking(true).unwrap();
                    let line: &[u8] = match input.u8().unwrap_or(0) % 4 {
                        0 => b"CONNECT 1024\n",
                        1 => b"CONNECT 1025\n",
                        2 => b"CONNECT x\n",
                        _ => input.bytes(40),
                    };
                    let _ = s.write(line);
                    streams.push(s);
                }
            }
            5 => {
                // Guest connects that reached the host listener.
                while streams.len() < MAX_STREAMS {
                    let Ok((s, _)) = sockets.listener.accept() else {
                        break;
                    };
                    s.set_nonblocking(true).unwrap();
                    streams.push(s);
                }
            }
            6 if !streams.is_empty() => {
                let i = usize::from(input.u8().unwrap_or(0)) % streams.len();
                let len = usize::from(input.u8().unwrap_or(0)) * 16;
                let _ = streams[i].write(input.bytes(len));
            }
            7 if !streams.is_empty() => {
                let i = usize::from(input.u8().unwrap_or(0)) % streams.len();
                let mut buf = [0u8; 4096];
                let _ = streams[i].read(&mut buf);
            }
            8 if !streams.is_empty() => {
                let choice = input.u8().unwrap_or(0);
                let i = usize::from(choice >> 2) % streams.len();
                match choice % 3 {
                    0 => drop(streams.swap_remove(i)),
                    1 => {
                        let _ = streams[i].shutdown(Shutdown::Write);
                    }
                    _ => {
                        let _ = streams[i].shutdown(Shutdown::Read);
                    }
                }
            }
            _ => {}
        }
        assert!(muxer.connection_count() <= MAX_CONNECTIONS);
    }
    // Whatever is left drains without panicking.
    muxer.handle_host_events();
    while muxer.next_rx(MAX_PAYLOAD).is_some() {}
    // Connections accepted but never taken by this input must not leak into the next.
    while sockets.listener.accept().is_ok() {}
});
