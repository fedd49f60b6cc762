//! virtio-vsock end to end: one VM running the agent's device self-test service, driven through
//! the VMM's Unix socket exactly as a host program would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cocoon_agent_protocol::boot_check::{Fnv1a64, PatternStream};
use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip};

const SELFTEST_PORT: u32 = 1025;
const BIG: usize = 16 << 20;

/// Opens a stream to guest `port`: `Ok(stream)` after `OK <port>`, `Err(reply)` otherwise.
fn connect(uds: &Path, port: u32) -> Result<(UnixStream, BufReader<UnixStream>), String> {
    let mut s = UnixStream::connect(uds).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.starts_with("OK ") {
        Ok((s, reader))
    } else {
        Err(line)
    }
}

fn command(uds: &Path, line: &str) -> (UnixStream, BufReader<UnixStream>) {
    let (mut s, r) = connect(uds, SELFTEST_PORT).expect("selftest service");
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    (s, r)
}

fn send_pattern(out: &mut impl Write, len: usize, seed: u64) {
    let mut stream = PatternStream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        stream.fill(&mut buf[..n]);
        out.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

fn drain(input: &mut impl Read) -> (usize, u64) {
    let mut hash = Fnv1a64::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            return (total, hash.finish());
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// Host to guest: the guest reports what it received.
fn sink(uds: &Path, len: usize, seed: u64) {
    let (mut s, mut r) = command(uds, "SINK");
    send_pattern(&mut s, len, seed);
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    assert_eq!(
        reply.trim(),
        format!("{len} {:016x}", PatternStream::checksum(seed, len))
    );
}

/// Guest to host: we check what we received.
fn source(uds: &Path, len: usize, seed: u64) {
    let (_s, mut r) = command(uds, &format!("SOURCE {len} {seed}"));
    assert_eq!(drain(&mut r), (len, PatternStream::checksum(seed, len)));
}

struct Vm {
    child: Child,
    uds: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn vsock_streams_both_ways_with_flow_control() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("vsock_streams_both_ways_with_flow_control") else {
        return;
    };
    let scratch = Scratch::new("vsock");
    let uds = scratch.path("v.sock");
    let child = artifacts
        .vmm_command(&[])
        .args(["--console", scratch.path("console.log").to_str().unwrap()])
        .args(["--vsock", &format!("3,{}", uds.display())])
        .args(["--cmdline", "cocoon.selftest=1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Vm {
        child,
        uds: uds.clone(),
    };

    // The guest boots; until its listener is up, connects are refused.
    let start = Instant::now();
    loop {
        if connect(&uds, SELFTEST_PORT).is_ok() {
            break;
        }
        if let Ok(Some(status)) = vm.child.try_wait() {
            panic!("VMM exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "agent never listened"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // 16 MiB each way, hashes compared on both ends.
    sink(&uds, BIG, 11);
    source(&uds, BIG, 12);

    // Guest-initiated: the guest's connect to host port 2000 reaches PATH_2000.
    let listener = UnixListener::bind(format!("{}_2000", uds.display())).unwrap();
    let (_ctl, mut ctl_reader) = command(&uds, &format!("DIAL 2000 {BIG} 13"));
    let (mut from_guest, _) = listener.accept().unwrap();
    let (n, sum) = drain(&mut from_guest);
    assert_eq!((n, sum), (BIG, PatternStream::checksum(13, BIG)));
    from_guest
        .write_all(format!("got {n} {sum:016x}\n").as_bytes())
        .unwrap();
    drop(from_guest);
    let mut relayed = String::new();
    ctl_reader.read_line(&mut relayed).unwrap();
    assert_eq!(
        relayed.trim(),
        format!("got {BIG} {sum:016x}"),
        "the guest read our reply"
    );

    // A reader that stops stalls only its own connection: the guest fills that stream's credit
    // and waits, while another stream completes; then the stalled one is read, intact.
    let (_stalled, mut stalled_reader) = command(&uds, &format!("SOURCE {} 31", 4 << 20));
    std::thread::sleep(Duration::from_secs(2));
    sink(&uds, 1 << 20, 32);
    assert_eq!(
        drain(&mut stalled_reader),
        (4 << 20, PatternStream::checksum(31, 4 << 20))
    );

    // Eight connections at once, both directions.
    std::thread::scope(|scope| {
        for i in 0..8u64 {
            let uds = &uds;
            scope.spawn(move || {
                if i % 2 == 0 {
                    sink(uds, 1 << 20, 100 + i)
                } else {
                    source(uds, 1 << 20, 100 + i)
                }
            });
        }
    });

    // Nobody listens: the host side sees the socket close, never OK; and the guest's connect
    // to a host port without a listener is refused.
    assert_eq!(connect(&uds, 4444).err(), Some(String::new()));
    let (_s, mut r) = command(&uds, "REFUSE 4445");
    let mut verdict = String::new();
    r.read_line(&mut verdict).unwrap();
    assert_eq!(verdict.trim(), "refused");

    // Clean power-off; the VMM removes its socket.
    let (_s, mut r) = command(&uds, "POWEROFF");
    let mut bye = String::new();
    r.read_line(&mut bye).unwrap();
    let status = vm.child.wait().unwrap();
    let mut stderr = String::new();
    vm.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "VMM: {status} {stderr}");
    assert!(!vm.uds.exists(), "vsock socket left behind");
}
