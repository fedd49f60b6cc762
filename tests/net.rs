//! virtio-net end to end: a TAP in a network namespace the test creates (and removes), opened
//! there by the test and handed to a VMM outside the namespace as a file descriptor (`--net
//! fd=N`, as the runtime does), with a second, detached NIC (`--net none`); the guest configured
//! over vsock, then ping and TCP transfers both ways whose content is verified.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_agent_protocol::boot_check::{Fnv1a64, PatternStream};
use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip, in_ci};

const MAC: &str = "02:00:00:c0:c0:05";
const HOST_IP: &str = "10.213.0.1";
const GUEST_IP: &str = "10.213.0.2";
const TCP_BYTES: usize = 256 * 1024;

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace with a TAP in it, removed (with the TAP) when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("cocoon-test-{}", std::process::id());
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns(name);
        let ok = ip(&["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"])
            && ip(&[
                "-n",
                &ns.0,
                "addr",
                "add",
                &format!("{HOST_IP}/24"),
                "dev",
                "tap0",
            ])
            && ip(&["-n", &ns.0, "link", "set", "tap0", "up"])
            && ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(uds: &Path, line: &str) -> Option<String> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    s.write_all(b"CONNECT 1025\n").ok()?;
    let mut reader = BufReader::new(s.try_clone().ok()?);
    let mut ok = String::new();
    reader.read_line(&mut ok).ok()?;
    if !ok.starts_with("OK ") {
        return None;
    }
    s.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut reply = String::new();
    reader.read_line(&mut reply).ok()?;
    Some(reply.trim().to_owned())
}

/// Moves the calling thread into the namespace (sockets it makes afterwards live there).
fn in_netns(ns: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    // SAFETY: setns on this thread only, with an fd we hold open.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns");
}

/// Opens the namespace's tap0 from a thread that joins it, as the runtime opens a sandbox's
/// TAP: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
fn open_tap_in(ns: &str) -> File {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        in_netns(&ns);
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        // SAFETY: ifreq is plain data; zero is valid, and we fill the name and flags.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"tap0") {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | 0x4000) as libc::c_short;
        // SAFETY: TUNSETIFF (0x400454ca) reads and writes the ifreq we own.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, &mut ifr) };
        assert_eq!(rc, 0, "TUNSETIFF tap0: {}", std::io::Error::last_os_error());
        tun
    })
    .join()
    .unwrap()
}

/// Binds a TCP listener inside the namespace, from a thread that joins it.
fn listen_in(ns: &str) -> TcpListener {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        in_netns(&ns);
        TcpListener::bind((HOST_IP, 0)).expect("bind in netns")
    })
    .join()
    .unwrap()
}

#[test]
fn guest_nic_pings_and_moves_tcp_through_a_tap() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("guest_nic_pings_and_moves_tcp_through_a_tap") else {
        return;
    };
    let Some(ns) = Netns::create() else {
        assert!(
            !in_ci(),
            "cannot create a network namespace with a TAP, and CI=true requires this test"
        );
        eprintln!(
            "SKIPPED guest_nic_pings_and_moves_tcp_through_a_tap: needs root for ip netns and TAP"
        );
        return;
    };
    let scratch = Scratch::new("net");
    let uds = scratch.path("v.sock");
    // The test keeps its own fd (the VMM duplicates it); the child inherits it across exec.
    let tap = open_tap_in(&ns.0);
    let tap_fd = tap.as_raw_fd();
    let mut vmm = artifacts.vmm_command(&[]);
    vmm.args([
        "--console",
        "off",
        "--vsock",
        &format!("3,{}", uds.display()),
    ])
    .args([
        "--net",
        &format!("fd={tap_fd},{MAC}"),
        "--net",
        "none,02:00:00:c0:c0:06",
        "--cmdline",
        "cocoon.selftest=1",
    ])
    .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls fcntl, which is async-signal-safe,
    // to clear close-on-exec on the TAP fd the child must inherit.
    unsafe {
        vmm.pre_exec(move || {
            if libc::fcntl(tap_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = vmm.spawn().unwrap();
    let mut vm = Vm(child);
    let start = Instant::now();
    let mac = loop {
        if let Some(mac) = command(&uds, "MAC") {
            break mac;
        }
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!("VMM exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "agent never came up"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(mac, MAC, "the guest sees the MAC it was given");
    assert_eq!(
        command(&uds, &format!("NETUP {GUEST_IP}/24")).as_deref(),
        Some("up")
    );
    assert_eq!(
        command(&uds, &format!("PING {HOST_IP}")).as_deref(),
        Some("pong")
    );

    let listener = listen_in(&ns.0);
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let (n, sum) = Fnv1a64::of_reader(&mut conn).unwrap();
        conn.write_all(format!("host {n} {sum:016x}\n").as_bytes())
            .unwrap();
        (n, sum)
    });
    let relayed = command(&uds, &format!("TCPSEND {HOST_IP} {port} {TCP_BYTES} 21")).unwrap();
    let (n, sum) = server.join().unwrap();
    assert_eq!(
        (n as usize, sum),
        (TCP_BYTES, PatternStream::checksum(21, TCP_BYTES))
    );
    assert_eq!(
        relayed,
        format!("host {n} {sum:016x}"),
        "the guest read the host's reply"
    );

    // And the other way: the host connects to a guest listener.
    let mut control = UnixStream::connect(&uds).unwrap();
    control
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    control.write_all(b"CONNECT 1025\nTCPRECV 7000\n").unwrap();
    let mut control_reader = BufReader::new(control.try_clone().unwrap());
    let mut line = String::new();
    control_reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line}");
    line.clear();
    control_reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let to_guest = std::thread::spawn({
        let ns = ns.0.clone();
        move || {
            in_netns(&ns);
            let mut tcp = std::net::TcpStream::connect((GUEST_IP, 7000)).unwrap();
            let mut pattern = vec![0u8; TCP_BYTES];
            PatternStream::new(22).fill(&mut pattern);
            tcp.write_all(&pattern).unwrap();
            tcp.shutdown(std::net::Shutdown::Write).unwrap();
            let mut verdict = String::new();
            BufReader::new(tcp).read_line(&mut verdict).unwrap();
            verdict
        }
    });
    let expected = format!(
        "{TCP_BYTES} {:016x}",
        PatternStream::checksum(22, TCP_BYTES)
    );
    assert_eq!(
        to_guest.join().unwrap().trim(),
        expected,
        "the guest's verdict, over TCP"
    );
    line.clear();
    control_reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), expected, "the guest's verdict, over vsock");

    assert_eq!(command(&uds, "POWEROFF").as_deref(), Some("bye"));
    let status = vm.0.wait().unwrap();
    let mut stderr = String::new();
    vm.0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "VMM: {status} {stderr}");
    drop(tap);
    drop(ns);
    assert!(
        !Path::new(&format!(
            "/var/run/netns/cocoon-test-{}",
            std::process::id()
        ))
        .exists()
    );
}
