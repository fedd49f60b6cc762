use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

const DEVICE_MAC: [u8; 6] = [0x02, 0xc0, 0xc0, 0, 0, 1];
const ENGINE_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn prefix(addr: &str, prefix: u8) -> IpPrefix {
    IpPrefix {
        addr: addr.parse().unwrap(),
        prefix,
    }
}

fn gateway(addr: &str) -> Option<IpAddr> {
    Some(addr.parse().unwrap())
}

/// What Podman's default network gives a container, plus an extra route with a metric.
fn engine_network(device_mac: [u8; 6]) -> NetworkSetup {
    NetworkSetup {
        interfaces: vec![GuestInterface {
            device_mac,
            name: "eth0".into(),
            mac: ENGINE_MAC,
            mtu: 1400,
            addresses: vec![prefix("10.88.0.5", 16), prefix("fd00:88::5", 64)],
        }],
        routes: vec![
            GuestRoute {
                gateway: gateway("10.88.0.1"),
                device: Some("eth0".into()),
                ..GuestRoute::default()
            },
            GuestRoute {
                gateway: gateway("fd00:88::1"),
                device: Some("eth0".into()),
                ..GuestRoute::default()
            },
            GuestRoute {
                destination: Some(prefix("192.168.77.0", 24)),
                gateway: gateway("10.88.0.254"),
                metric: Some(50),
                ..GuestRoute::default()
            },
            // The connected route, as a host that reads every route of the main table passes it.
            GuestRoute {
                destination: Some(prefix("10.88.0.0", 16)),
                device: Some("eth0".into()),
                source: gateway("10.88.0.5"),
                ..GuestRoute::default()
            },
        ],
    }
}

fn invalid_message(net: &NetworkSetup) -> String {
    match validate(net) {
        Err(NetworkError::Invalid(message)) => message,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn an_engine_network_is_valid_and_the_protocol_field_defaults() {
    validate(&engine_network(DEVICE_MAC)).unwrap();
    validate(&NetworkSetup::default()).unwrap();
    let old: cocoon_agent_protocol::message::GuestSetup =
        serde_json::from_str(r#"{"hostname":null,"realtime_ns":null}"#).unwrap();
    assert_eq!(old.network, NetworkSetup::default());
    let json = serde_json::to_value(engine_network(DEVICE_MAC)).unwrap();
    assert_eq!(json["interfaces"][0]["addresses"][0]["addr"], "10.88.0.5");
    assert_eq!(json["interfaces"][0]["device_mac"][0], 2);
}

#[test]
fn bad_networks_are_refused_saying_what_is_wrong() {
    type Edit = fn(&mut NetworkSetup);
    let cases: [(Edit, &str); 17] = [
        (
            |n| n.interfaces[0].name = "a-name-of-16-byte".into(),
            "interface name",
        ),
        (|n| n.interfaces[0].name = String::new(), "interface name"),
        (|n| n.interfaces[0].name = "eth/0".into(), "\"eth/0\""),
        (|n| n.interfaces[0].name = "eth 0".into(), "\"eth 0\""),
        (|n| n.interfaces[0].name = "lo".into(), "\"lo\""),
        (
            |n| n.interfaces[0].mac = [1, 0, 0x5e, 0, 0, 1],
            "MAC 01:00:5e:00:00:01",
        ),
        (
            |n| n.interfaces[0].device_mac = [0; 6],
            "device MAC 00:00:00:00:00:00",
        ),
        (|n| n.interfaces[0].mtu = 67, "MTU 67"),
        (|n| n.interfaces[0].mtu = 65536, "MTU 65536"),
        (|n| n.interfaces[0].mtu = 1000, "IPv6 needs 1280"),
        (|n| n.interfaces[0].addresses[0].prefix = 33, "10.88.0.5/33"),
        (
            |n| n.interfaces[0].addresses[1].prefix = 129,
            "fd00:88::5/129",
        ),
        (
            |n| {
                let copy = n.interfaces[0].clone();
                n.interfaces.push(copy);
            },
            "interface eth0 is given twice",
        ),
        (
            |n| n.routes[0].device = Some("eth1".into()),
            "eth1 is not one of",
        ),
        (
            |n| n.routes[1].destination = Some(prefix("10.0.0.0", 8)),
            "mixes IPv4 and IPv6",
        ),
        (
            |n| n.routes[2].destination = Some(prefix("192.168.77.1", 24)),
            "bits set past its prefix",
        ),
        (
            |n| {
                n.routes[3].device = None;
            },
            "neither a gateway nor a device",
        ),
    ];
    for (edit, expected) in cases {
        let mut net = engine_network(DEVICE_MAC);
        edit(&mut net);
        let message = invalid_message(&net);
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    let error = AgentError::from(
        validate(&{
            let mut n = engine_network(DEVICE_MAC);
            n.interfaces[0].mtu = 1;
            n
        })
        .unwrap_err(),
    );
    assert_eq!(error.kind, ErrorKind::InvalidArgument);
    assert!(error.message.starts_with("network: "), "{}", error.message);
}

#[test]
fn messages_for_addresses_and_routes_carry_what_ip_would_send() {
    let mut v4 = address_message(3, &prefix("10.88.0.5", 16));
    let bytes = v4.bytes(1).to_vec();
    // header 16 + ifaddrmsg 8 + local, address, broadcast (8 each)
    assert_eq!(bytes.len(), 48);
    assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 48);
    let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
    assert_eq!(
        flags,
        netlink::NLM_F_REQUEST | netlink::NLM_F_CREATE | netlink::NLM_F_EXCL
    );
    assert_eq!(&bytes[16..24], &[libc::AF_INET as u8, 16, 0, 0, 3, 0, 0, 0]);
    let attrs: Vec<(u16, Vec<u8>)> = netlink::attrs(&bytes[24..])
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    assert_eq!(
        attrs,
        [
            (netlink::IFA_LOCAL, vec![10, 88, 0, 5]),
            (netlink::IFA_ADDRESS, vec![10, 88, 0, 5]),
            (netlink::IFA_BROADCAST, vec![10, 88, 255, 255]),
        ]
    );
    assert_eq!(
        address_message(3, &prefix("10.0.0.1", 32)).bytes(1).len(),
        40
    );

    let mut v6 = address_message(3, &prefix("fd00:88::5", 64));
    let bytes = v6.bytes(2).to_vec();
    assert_eq!(bytes.len(), 16 + 8 + 20 + 20);
    assert_eq!(
        &bytes[16..20],
        &[libc::AF_INET6 as u8, 64, netlink::IFA_F_NODAD, 0]
    );
    let local = "fd00:88::5".parse::<Ipv6Addr>().unwrap().octets();
    assert_eq!(&bytes[24..28], &[20, 0, netlink::IFA_LOCAL as u8, 0]);
    assert_eq!(&bytes[28..44], &local);

    let net = engine_network(DEVICE_MAC);
    let mut extra = route_message(&net.routes[2], None);
    let bytes = extra.bytes(3).to_vec();
    // header 16 + rtmsg 12 + dst, gateway, priority (8 each)
    assert_eq!(bytes.len(), 52);
    assert_eq!(
        &bytes[16..28],
        &[
            libc::AF_INET as u8,
            24,
            0,
            0,
            netlink::RT_TABLE_MAIN,
            netlink::RTPROT_BOOT,
            netlink::RT_SCOPE_UNIVERSE,
            netlink::RTN_UNICAST,
            0,
            0,
            0,
            0
        ]
    );
    let attrs: Vec<(u16, Vec<u8>)> = netlink::attrs(&bytes[28..])
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    assert_eq!(
        attrs,
        [
            (netlink::RTA_DST, vec![192, 168, 77, 0]),
            (netlink::RTA_GATEWAY, vec![10, 88, 0, 254]),
            (netlink::RTA_PRIORITY, 50u32.to_ne_bytes().to_vec()),
        ]
    );
    // A default route has no destination attribute; a device-only route is scope link.
    let mut default6 = route_message(&net.routes[1], Some(4));
    let bytes = default6.bytes(4).to_vec();
    assert_eq!((bytes[16], bytes[17]), (libc::AF_INET6 as u8, 0));
    assert_eq!(bytes.len(), 16 + 12 + 20 + 8);
    let mut connected = route_message(&net.routes[3], Some(4));
    let bytes = connected.bytes(5).to_vec();
    assert_eq!(bytes[22], netlink::RT_SCOPE_LINK);
    let kinds: Vec<u16> = netlink::attrs(&bytes[28..]).map(|(k, _)| k).collect();
    assert_eq!(
        kinds,
        [netlink::RTA_DST, netlink::RTA_OIF, netlink::RTA_PREFSRC]
    );
}

#[test]
fn has_host_bits_looks_past_the_prefix_only() {
    assert!(!has_host_bits(&prefix("0.0.0.0", 0)));
    assert!(has_host_bits(&prefix("10.0.0.1", 0)));
    assert!(!has_host_bits(&prefix("10.88.0.0", 16)));
    assert!(!has_host_bits(&prefix("10.88.0.1", 32)));
    assert!(has_host_bits(&prefix("fd00:88::1", 64)));
    assert!(!has_host_bits(&prefix("fd00:88::", 64)));
    assert!(!has_host_bits(&IpPrefix {
        addr: IpAddr::V4(Ipv4Addr::BROADCAST),
        prefix: 32
    }));
}

/// A TAP named `name` in the calling thread's network namespace, there as long as the fd is
/// open (so its carrier is on, as a virtio-net NIC's is).
fn tap(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The real thing without a VM: two TAPs in a network namespace of the test thread's own, one
/// of them named eth0 already, become the engine's eth0 (and eth1), twice over. Needs root,
/// /dev/net/tun and iproute2, as the project's machines have; skipped elsewhere.
#[test]
fn an_engine_network_is_applied_to_devices_found_by_mac() {
    in_own_namespace(|parking| {
        let apply = |net: &NetworkSetup| apply_with(net, parking);
        let _first = tap("tap0");
        let _second = tap("eth0");
        let links = Netlink::open().unwrap().links().unwrap();
        let mac_of = |name: &str| links.iter().find(|l| l.name == name).unwrap().mac.unwrap();
        let mut net = engine_network(mac_of("tap0"));
        net.interfaces.push(GuestInterface {
            device_mac: mac_of("eth0"),
            name: "eth1".into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
            mtu: 9000,
            addresses: vec![prefix("192.168.1.2", 24)],
        });
        validate(&net).unwrap();
        apply(&net).unwrap();
        // Again, as a second GuestSetup would: the devices are found by the MAC they came with.
        apply(&net).unwrap();

        let link = ip(&["-o", "link", "show", "eth0"]);
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains("link/ether 52:54:00:12:34:56"), "{link}");
        assert!(link.contains("UP"), "{link}");
        let link = ip(&["-o", "link", "show", "eth1"]);
        assert!(link.contains("mtu 9000"), "{link}");
        assert!(link.contains("link/ether 52:54:00:12:34:57"), "{link}");
        let addrs = ip(&["-o", "addr", "show", "eth0"]);
        assert!(
            addrs.contains("inet 10.88.0.5/16 brd 10.88.255.255 scope global eth0"),
            "{addrs}"
        );
        assert!(
            addrs.contains("inet6 fd00:88::5/64 scope global"),
            "{addrs}"
        );
        assert!(
            !addrs.contains("fd00:88::5/64 scope global tentative"),
            "{addrs}"
        );
        // Line by line, without the trailing blanks some iproute2 versions print.
        let lines = |args: &[&str]| -> Vec<String> {
            ip(args).lines().map(|l| l.trim_end().to_owned()).collect()
        };
        let routes = lines(&["route"]);
        for expected in [
            "default via 10.88.0.1 dev eth0",
            "10.88.0.0/16 dev eth0 proto kernel scope link src 10.88.0.5",
            "192.168.77.0/24 via 10.88.0.254 dev eth0 metric 50",
            "192.168.1.0/24 dev eth1 proto kernel scope link src 192.168.1.2",
        ] {
            assert!(
                routes.iter().any(|r| r == expected),
                "{routes:?} lacks {expected:?}"
            );
        }
        assert_eq!(routes.len(), 4, "{routes:?}");
        let routes = lines(&["-6", "route"]);
        for expected in [
            "fd00:88::/64 dev eth0 proto kernel metric 256 pref medium",
            "default via fd00:88::1 dev eth0 metric 1024 pref medium",
        ] {
            assert!(
                routes.iter().any(|r| r == expected),
                "{routes:?} lacks {expected:?}"
            );
        }

        // A device that is not there, and a route the kernel refuses, are named.
        let mut missing = engine_network([0x02, 0, 0, 0, 0, 9]);
        missing.interfaces[0].name = "eth2".into();
        missing.routes.clear();
        let e = apply(&missing).unwrap_err().to_string();
        assert!(e.contains("02:00:00:00:00:09") && e.contains("eth2"), "{e}");
        let unreachable = NetworkSetup {
            interfaces: Vec::new(),
            routes: vec![GuestRoute {
                gateway: gateway("172.31.0.1"),
                ..GuestRoute::default()
            }],
        };
        let e = apply(&unreachable).unwrap_err().to_string();
        assert!(e.contains("route default via 172.31.0.1"), "{e}");
    });
}

/// A thread in a network namespace of its own (so that nothing touches the machine's network)
/// runs `body`, given a parking for that namespace. Needs root, /dev/net/tun and iproute2;
/// skipped elsewhere.
fn in_own_namespace(body: impl FnOnce(&Parking) + Send + 'static) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: needs root and /dev/net/tun");
        return;
    }
    std::thread::spawn(|| {
        use std::os::unix::fs::MetadataExt;
        let before = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        // SAFETY: unshare only moves this thread into a new network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let after = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert_ne!(before, after, "the thread is in a namespace of its own");
        body(&Parking::open("/proc/thread-self/ns/net").unwrap());
    })
    .join()
    .unwrap();
}

fn link_names() -> Vec<String> {
    let mut names: Vec<String> = Netlink::open()
        .unwrap()
        .links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    names.sort();
    names
}

/// Two spare NICs (TAPs, down as a template's NICs are) go out of sight, and come back, one of
/// them under a name of its own first, when a network names them: their kernel names are the
/// other's engine names, as when the engine's eth0 is the guest's second NIC.
#[test]
fn spare_devices_are_parked_and_come_back_when_a_network_names_them() {
    in_own_namespace(|parking| {
        let _first = tap("eth0");
        let _second = tap("eth1");
        let links = Netlink::open().unwrap().links().unwrap();
        let mac_of = |name: &str| links.iter().find(|l| l.name == name).unwrap().mac.unwrap();
        let (first, second) = (mac_of("eth0"), mac_of("eth1"));
        assert!(
            links
                .iter()
                .any(|l| l.link_type == netlink::ARPHRD_LOOPBACK)
        );
        assert!(links.iter().any(|l| l.link_type == netlink::ARPHRD_ETHER));

        // What a container owning the guest is created after.
        let left = crate::nic_park::park_spare_with(parking).unwrap();
        assert!(crate::nic_park::only_loopback(&left), "{left:?}");
        assert_eq!(link_names(), ["lo"]);
        // An empty network (a template's) with nothing left to park changes nothing.
        apply_with(&NetworkSetup::default(), parking).unwrap();
        assert_eq!(link_names(), ["lo"]);

        let interface = |device_mac, name: &str, last| GuestInterface {
            device_mac,
            name: name.into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, last],
            mtu: 1500,
            addresses: vec![prefix(&format!("10.88.0.{last}"), 16)],
        };
        // A late network, as after a create: the first NIC becomes eth1, so the second comes
        // back with eth1 taken.
        let net = NetworkSetup {
            interfaces: vec![interface(first, "eth1", 5), interface(second, "eth0", 6)],
            routes: vec![GuestRoute {
                gateway: gateway("10.88.0.1"),
                device: Some("eth1".into()),
                ..GuestRoute::default()
            }],
        };
        validate(&net).unwrap();
        apply_with(&net, parking).unwrap();
        apply_with(&net, parking).unwrap();
        assert_eq!(link_names(), ["eth0", "eth1", "lo"]);
        let link = ip(&["-o", "link", "show", "eth1"]);
        assert!(link.contains("link/ether 52:54:00:12:34:05"), "{link}");
        assert!(link.contains("UP"), "{link}");
        let addrs = ip(&["-o", "addr", "show", "eth0"]);
        assert!(addrs.contains("inet 10.88.0.6/16"), "{addrs}");
        let routes = ip(&["route"]);
        assert!(
            routes.contains("default via 10.88.0.1 dev eth1"),
            "{routes}"
        );

        // A configured device taken down (by the container) stays where it is.
        ip(&["link", "set", "eth0", "down"]);
        let left = crate::nic_park::park_spare_with(parking).unwrap();
        assert!(!crate::nic_park::only_loopback(&left));
        assert_eq!(link_names(), ["eth0", "eth1", "lo"]);

        // A device found nowhere is still named so.
        let missing = NetworkSetup {
            interfaces: vec![interface([0x02, 0, 0, 0, 0, 9], "eth2", 7)],
            routes: Vec::new(),
        };
        let e = apply_with(&missing, parking).unwrap_err();
        assert!(matches!(e, NetworkError::NoDevice { .. }), "{e}");
    });
}
