//! The engine's network carried into the VM, end to end through the `cocoon` CLI: a network
//! namespace made here the way a CNI bridge plugin makes one (a veth pair, the container's end
//! with addresses, routes and an MTU of its own), one container in it that fetches a file from
//! a server on the host and serves it back with busybox `httpd`, which the host fetches
//! byte-exact; what `ip` shows inside; bad namespaces refused at `create`; and after the
//! monitor is killed with SIGKILL and the container deleted, no TAP or qdisc left and the
//! engine's interface as it was.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use cocoon_tests::cocoon_cli::{Cocoon, bundle, cocoon_binary};
use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip, pseudo_random_bytes};

const HOST_IP: &str = "10.201.7.1";
const GUEST_IP: &str = "10.201.7.2";
const GUEST_MAC: &str = "52:54:00:c0:c0:07";

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tc(args: &[&str]) -> String {
    let out = Command::new("tc").args(args).output().expect("run tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with a veth to the host, as a CNI bridge plugin leaves one: the
/// container's end is `eth0`, with IPv4 and IPv6 addresses, a default route of each family, one
/// more route, and MTU 1400.
struct TestNetns {
    name: String,
    host_end: String,
}

impl TestNetns {
    /// `tag` tells apart the namespaces of tests that run at once; one at a time gives the
    /// host's end its address.
    fn new(tag: &str, host_address: bool) -> TestNetns {
        let pid = std::process::id();
        let name = format!("cocoon-{tag}-{pid}");
        let host_end = format!("c{tag}{}", pid % 100_000);
        let netns = TestNetns {
            name: name.clone(),
            host_end: host_end.clone(),
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        if host_address {
            ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &host_end]);
        }
        ip(&["link", "set", &host_end, "mtu", "1400", "up"]);
        let n = ["-n", name.as_str()];
        let inside = |args: &[&str]| ip(&[&n[..], args].concat());
        inside(&["link", "set", "eth0", "address", GUEST_MAC, "mtu", "1400"]);
        inside(&["addr", "add", &format!("{GUEST_IP}/24"), "dev", "eth0"]);
        inside(&["addr", "add", "fd00:201:7::2/64", "dev", "eth0", "nodad"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "default", "via", HOST_IP]);
        inside(&[
            "route",
            "add",
            "192.168.201.0/24",
            "via",
            "10.201.7.254",
            "metric",
            "50",
        ]);
        inside(&["-6", "route", "add", "default", "via", "fd00:201:7::1"]);
        netns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        ip(&[&["-n", self.name.as_str()][..], args].concat())
    }

    /// The engine's interface as a user would compare it: link, addresses, routes, qdiscs.
    fn eth0(&self) -> String {
        [
            self.ip(&["-o", "link", "show", "eth0"]),
            self.ip(&["-o", "addr", "show", "eth0"]),
            self.ip(&["route"]),
            self.ip(&["-6", "route"]),
            tc(&["-n", &self.name, "qdisc", "show", "dev", "eth0"]),
        ]
        .join("")
        // The link-local address's duplicate detection may still run when `before` is read.
        .replace(" tentative", "")
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A bundle whose spec joins the network namespace at `netns`.
fn with_netns(bundle: &Path, netns: &str) {
    let path = bundle.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let namespaces = spec["linux"]["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|ns| ns["type"] != "network");
    namespaces.push(serde_json::json!({"type": "network", "path": netns}));
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
}

/// Serves `body` to every request on `listener`, until the test ends.
fn serve(listener: TcpListener, body: Vec<u8>) {
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
}

/// GET `path` from `addr`; the body.
fn get(addr: &str, path: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    if !response.starts_with(b"HTTP/1.0 200") && !response.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&response[..split]).into_owned(),
        ));
    }
    Ok(response[split + 4..].to_vec())
}

/// The host side alone (no VM): what is read from the namespace, what is made in it, and that
/// releasing it leaves the engine's interface as it was.
#[test]
fn carrying_a_namespace_mirrors_it_and_releasing_restores_it() {
    use cocoon_runtime::network;
    let netns = TestNetns::new("h", false);
    let before = netns.eth0();
    let spec_path = std::env::temp_dir().join(format!("cocoon-net-spec-{}", std::process::id()));
    std::fs::create_dir_all(&spec_path).unwrap();
    let mut spec = oci_spec::runtime::Spec::default();
    let namespaces = vec![
        oci_spec::runtime::LinuxNamespaceBuilder::default()
            .typ(oci_spec::runtime::LinuxNamespaceType::Network)
            .path(netns.path())
            .build()
            .unwrap(),
    ];
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    let _ = std::fs::remove_dir_all(&spec_path);
    // The kernel's fallback tunnels (made in every namespace when their modules are loaded on
    // the host), down: not the engine's, left alone. A veth pair by two of their names stands
    // in when the host has neither.
    let links = netns.ip(&["-o", "link"]);
    if !links.contains(" tunl0") && !links.contains(" sit0") {
        netns.ip(&[
            "link", "add", "tunl0", "type", "veth", "peer", "name", "sit0",
        ]);
    }

    let carried = network::carry(&spec).expect("carry");
    assert_eq!(carried.taps.len(), 1);
    let interface = &carried.setup.interfaces[0];
    assert_eq!(interface.name, "eth0");
    assert_eq!(interface.mtu, 1400);
    assert_eq!(interface.mac, [0x52, 0x54, 0x00, 0xc0, 0xc0, 0x07]);
    assert_eq!(interface.device_mac, network::nic_mac(0));
    let addresses: Vec<String> = interface
        .addresses
        .iter()
        .map(|a| format!("{}/{}", a.addr, a.prefix))
        .collect();
    assert_eq!(
        addresses,
        [format!("{GUEST_IP}/24"), "fd00:201:7::2/64".to_owned()]
    );
    let routes = format!("{:?}", carried.setup.routes);
    for expected in [
        "10.201.7.1",
        "192.168.201.0",
        "10.201.7.254",
        "Some(50)",
        "fd00:201:7::1",
    ] {
        assert!(routes.contains(expected), "{expected} not in {routes}");
    }
    assert!(
        !routes.contains("fe80"),
        "kernel routes are the guest's own: {routes}"
    );
    let links = netns.ip(&["-o", "link"]);
    assert!(
        links.contains("tap0_cocoon") && links.contains("mtu 1400"),
        "{links}"
    );
    // Each side's ingress redirects to the other.
    for (from, to) in [("eth0", "tap0_cocoon"), ("tap0_cocoon", "eth0")] {
        let filters = tc(&["-n", &netns.name, "filter", "show", "dev", from, "ingress"]);
        assert!(
            filters.contains(&format!("Egress Redirect to device {to}")),
            "{from}: {filters}"
        );
    }
    // A second carry of the same namespace (two VMs cannot share one veth) is refused by name.
    let err = network::carry(&spec).unwrap_err().to_string();
    assert!(
        err.contains("tap0_cocoon") && err.contains("another cocoon microVM"),
        "{err}"
    );

    network::release(&carried.record).expect("release");
    drop(carried);
    let links = netns.ip(&["-o", "link"]);
    assert!(!links.contains("tap0_cocoon"), "{links}");
    assert_eq!(netns.eth0(), before);
    // Released twice, or after the namespace went: nothing to do.
    let record = network::NetworkRecord {
        netns: netns.path().into(),
        interfaces: vec![network::MirroredInterface {
            name: "eth0".into(),
            index: 2,
            tap: "tap0_cocoon".into(),
        }],
    };
    network::release(&record).expect("release again");
    let gone = network::NetworkRecord {
        netns: "/run/netns/cocoon-no-such-netns".into(),
        ..record
    };
    network::release(&gone).expect("release of a namespace that is gone");
}

#[test]
fn a_container_keeps_the_engines_network_and_leaves_it_as_it_was() {
    let Some(_artifacts) = artifacts_or_skip("network") else {
        return;
    };
    let Some(bin) = cocoon_binary() else {
        return;
    };
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = Scratch::new("network");
    // The default configuration: the usual template, which the other suites share.
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: None,
    };
    let netns = TestNetns::new("v", true);
    let before = netns.eth0();

    // Bad namespaces are refused at create, and nothing is left.
    let b = bundle(&scratch.path("bundle"), &["true"]);
    let b_arg = b.to_str().unwrap();
    for (path, says) in [
        ("/nonexistent/netns", "No such file"),
        ("/etc/hostname", "not a network namespace"),
    ] {
        with_netns(&b, path);
        let err = cocoon.fails(&["create", "--bundle", b_arg, "bad"]);
        assert!(err.contains(path) && err.contains(says), "{err}");
        assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());
    }
    // An interface a TAP cannot stand in for is named, and the others are left alone.
    netns.ip(&["link", "add", "br9", "type", "bridge"]);
    with_netns(&b, &netns.path());
    let err = cocoon.fails(&["create", "--bundle", b_arg, "bridged"]);
    assert!(err.contains("br9 (bridge)"), "{err}");
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());
    netns.ip(&["link", "del", "br9"]);
    assert_eq!(netns.eth0(), before);

    // The host's server, which the container fetches a file from.
    let listener = TcpListener::bind(format!("{HOST_IP}:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = pseudo_random_bytes(300 * 1024, u64::from(std::process::id()));
    serve(listener, body.clone());
    let script = format!(
        "ip addr show eth0; ip route; ip -6 route; cat /sys/class/net/eth0/mtu; \
         mkdir -p /tmp/www && wget -q -O /tmp/www/f http://{HOST_IP}:{port}/f && \
         echo fetched $(wc -c < /tmp/www/f) && exec httpd -f -p 8080 -h /tmp/www"
    );
    let b = bundle(&scratch.path("served"), &["sh", "-c", &script]);
    with_netns(&b, &netns.path());
    let out_path = scratch.path("out");
    let log = scratch.path("log");
    // As an engine runs it: the container inherits create's stdio (files here; a pipe
    // would stay open as long as the container runs).
    let err_path = scratch.path("err");
    let created = cocoon
        .command(&[
            "--log",
            log.to_str().unwrap(),
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "web",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .status()
        .unwrap();
    assert!(
        created.success(),
        "create: {}\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let during = netns.ip(&["-o", "link"]);
    assert!(during.contains("tap0_cocoon"), "{during}");
    cocoon.ok(&["start", "web"]);

    // The container serves back what it fetched; the host reads it byte-exact.
    let started = Instant::now();
    let served = loop {
        match get(&format!("{GUEST_IP}:8080"), "/f") {
            Ok(got) => break got,
            Err(e) if started.elapsed() < Duration::from_secs(180) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!(
                "the container's httpd did not answer: {e}\noutput:\n{}\nlog:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    };
    assert!(
        served == body,
        "{} bytes served, not the {} fetched",
        served.len(),
        body.len()
    );

    // Inside, the interface and routes are the engine's.
    let inside = std::fs::read_to_string(&out_path).unwrap();
    for expected in [
        format!("link/ether {GUEST_MAC}"),
        format!("inet {GUEST_IP}/24"),
        "inet6 fd00:201:7::2/64".to_owned(),
        "mtu 1400".to_owned(),
        format!("default via {HOST_IP} dev eth0"),
        "192.168.201.0/24 via 10.201.7.254 dev eth0".to_owned(),
        "default via fd00:201:7::1 dev eth0".to_owned(),
        format!("fetched {}", body.len()),
    ] {
        assert!(inside.contains(&expected), "no {expected:?} in:\n{inside}");
    }
    assert!(!inside.contains("tap0_cocoon"), "{inside}");

    // The monitor killed outright, then delete: no TAP, no qdisc, the veth as it was.
    let pid = cocoon.state("web")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the monitor's pid the state just reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while cocoon.state("web")["status"] != "stopped" {
        assert!(
            Instant::now() < deadline,
            "the killed container is not stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cocoon.ok(&["delete", "web"]);
    let links = netns.ip(&["-o", "link"]);
    assert!(!links.contains("tap0_cocoon"), "{links}");
    assert_eq!(netns.eth0(), before, "the engine's interface changed");
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());
}
