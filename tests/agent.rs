//! The guest agent end to end: one VM booted with the busybox EROFS image as a disk, driven over
//! vsock with the host's client library the way the runtime drives it. Each check is one
//! container (or a few) with a behaviour a user relies on.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cocoon_agent_protocol::client::{AgentClient, ClientError};
use cocoon_agent_protocol::frame::{read_frame, write_frame};
use cocoon_agent_protocol::message::{
    ContainerStatus, CreateContainer, ErrorKind, ExecProcess, GuestCounters, GuestInterface,
    GuestRoute, GuestSetup, IpPrefix, NetworkSetup, ReplyEnvelope, StdioConfig, StdioStream,
};
use oci_spec::runtime::Process;
use serde_json::{Value, json};

use cocoon_tests::guest::{Guest, Outcome, exited, reader, spec, to_spec};
use cocoon_tests::{ONE_VM_AT_A_TIME, RunningVm, Scratch, artifacts_or_skip, rootfs_or_skip};

/// The MAC the VMM gives the main test's NIC: detached (no host side), it is there for the
/// agent to find and make into the engine's interface.
const NIC_MAC: [u8; 6] = [0x02, 0xc0, 0xc0, 0x00, 0x00, 0x01];

fn boot(scratch: &Scratch, rootfs: &Path, extra: &[&str]) -> (RunningVm, Guest) {
    let artifacts = artifacts_or_skip("agent").expect("checked by the caller");
    let uds = scratch.path("vsock.sock");
    let child = artifacts
        .vmm_command(&[])
        .args(["--console", scratch.path("console.log").to_str().unwrap()])
        .args(["--memory", "256", "--cpus", "2"])
        .args(["--disk", &format!("{},ro", rootfs.display())])
        .args(["--vsock", &format!("3,{}", uds.display())])
        .args(extra)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the VMM");
    let mut vm = RunningVm { child };
    let client = AgentClient::connect_when_ready(&uds, Duration::from_secs(180));
    vm.assert_running();
    let info = client.expect("the agent answers").hello().unwrap();
    assert_eq!(info.cpus, 2);
    (
        vm,
        Guest {
            uds,
            disk: "/dev/vda".into(),
        },
    )
}

#[test]
fn containers_run_in_the_guest_like_runc_runs_them() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if artifacts_or_skip("agent").is_none() {
        return;
    }
    let Some(rootfs) = rootfs_or_skip("agent") else {
        return;
    };
    let scratch = Scratch::new("agent");
    let (_vm, guest) = boot(&scratch, &rootfs, &["--net", "none,02:c0:c0:00:00:01"]);

    let hello = guest.run("echo", spec(&["echo", "hello from the guest"]), None);
    assert_eq!(hello.stdout, "hello from the guest\n");
    assert_eq!(hello.status, exited(0));

    for code in [0, 1, 3] {
        let out = guest.sh(&format!("exit{code}"), &format!("exit {code}"), |_| {});
        assert_eq!(out.status, exited(code));
    }

    // Not PID 1 of a namespace of its own, which would be immune to its own SIGKILL (as under runc).
    let killed = guest.sh("sigkill", "kill -9 $$", |s| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|ns| ns["type"] != "pid");
    });
    assert_eq!(killed.status.signal, Some(9));
    assert_eq!(killed.status.shell_code(), 137);

    let apart = guest.sh("streams", "echo to-out; echo to-err >&2", |_| {});
    assert_eq!(
        (apart.stdout.as_str(), apart.stderr.as_str()),
        ("to-out\n", "to-err\n")
    );

    let piped = guest.run(
        "stdin",
        spec(&["tr", "a-z", "A-Z"]),
        Some(b"piped through\n"),
    );
    assert_eq!(piped.stdout, "PIPED THROUGH\n");

    // Four processes doing glibc string work side by side: each must print exactly what the same
    // script prints on the host. On PVM hosts, guest processes overwrite each other's AVX
    // registers unless glibc is kept off AVX (see agent/src/cpu.rs).
    let script = "for n in 1 2 3 4; do (i=0; while [ $i -lt 400 ]; do printf '%s-%d|%x\\n' \
        line $i $i; i=$((i+1)); done | md5sum) & done; wait";
    let host = std::process::Command::new("busybox")
        .args(["sh", "-c", script])
        .output()
        .expect("run busybox on the host");
    let parallel = guest.sh("parallel-strings", script, |_| {});
    assert_eq!(
        parallel.stdout,
        String::from_utf8_lossy(&host.stdout),
        "{}",
        parallel.stderr
    );

    let identity = guest.sh("identity", "hostname; echo $FOO; pwd; ulimit -n", |s| {
        s["hostname"] = json!("box1");
        s["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("FOO=bar"));
        s["process"]["cwd"] = json!("/tmp");
        s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 456, "soft": 123}]);
    });
    assert_eq!(
        identity.stdout, "box1\nbar\n/tmp\n123\n",
        "stderr: {}",
        identity.stderr
    );

    let read_only = guest.sh("readonly", "touch /x", |s| {
        s["root"]["readonly"] = json!(true)
    });
    assert_eq!(read_only.status, exited(1));
    assert!(
        read_only.stderr.contains("Read-only file system"),
        "{}",
        read_only.stderr
    );
    let writable = guest.sh("writable", "touch /x && echo ok", |_| {});
    assert_eq!(writable.stdout, "ok\n", "{}", writable.stderr);

    let chown = "touch /tmp/f && chown 65534 /tmp/f && echo chowned";
    let with_cap = guest.sh("chown-allowed", chown, |_| {});
    assert_eq!(with_cap.stdout, "chowned\n", "{}", with_cap.stderr);
    let without_cap = guest.sh("chown-denied", chown, |s| {
        for set in ["bounding", "effective", "permitted"] {
            s["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .retain(|c| c != "CAP_CHOWN");
        }
    });
    assert_eq!(without_cap.status, exited(1));
    assert!(
        without_cap.stderr.contains("Operation not permitted"),
        "{}",
        without_cap.stderr
    );

    let seccomp = guest.sh("seccomp", "mkdir /tmp/d", |s| {
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        });
    });
    assert_eq!(seccomp.status, exited(1));
    assert!(
        seccomp.stderr.contains("Operation not permitted"),
        "{}",
        seccomp.stderr
    );

    let oom = guest.sh("oom", "dd if=/dev/zero of=/dev/null bs=64M count=1", |s| {
        s["linux"]["resources"]["memory"] = json!({"limit": 32 << 20});
    });
    assert_eq!(oom.status.signal, Some(9), "{}", oom.stderr);
    assert!(oom.status.oom_killed, "an OOM kill is reported as such");

    let pids = guest.sh(
        "pids",
        "sleep 2 & sleep 2 & sleep 2 & sleep 2 & wait",
        |s| {
            s["linux"]["resources"]["pids"] = json!({"limit": 3});
        },
    );
    assert!(pids.stderr.contains("can't fork"), "{}", pids.stderr);

    // The guest's identity from the host, seen by a container sharing the guest's uts namespace.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    guest
        .client()
        .setup_guest(GuestSetup {
            hostname: Some("guest-from-host".into()),
            realtime_ns: Some(now.as_nanos() as u64),
            entropy: vec![7; 64],
            boot_id: Some(BOOT_ID.into()),
            network: NetworkSetup::default(),
        })
        .unwrap();
    // The host's boot id in a container that masks and write-protects /proc/sys as runc's
    // spec does; a malformed one is refused.
    let boot_id = guest.sh(
        "boot-id",
        "cat /proc/sys/kernel/random/boot_id; echo x > /proc/sys/kernel/random/boot_id",
        |_| {},
    );
    assert_eq!(boot_id.stdout, format!("{BOOT_ID}\n"), "{}", boot_id.stderr);
    assert!(
        boot_id.stderr.contains("Read-only file system"),
        "{}",
        boot_id.stderr
    );
    let refused = guest.client().setup_guest(GuestSetup {
        hostname: None,
        realtime_ns: None,
        entropy: Vec::new(),
        boot_id: Some(BOOT_ID.to_uppercase()),
        network: NetworkSetup::default(),
    });
    assert!(
        matches!(&refused, Err(ClientError::Agent(e)) if e.kind == ErrorKind::InvalidArgument),
        "{refused:?}"
    );
    let identity = guest.sh("guest-identity", "hostname; date +%s", |s| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|ns| ns["type"] != "uts");
    });
    let mut lines = identity.stdout.lines();
    assert_eq!(lines.next(), Some("guest-from-host"));
    let guest_time: u64 = lines.next().and_then(|l| l.parse().ok()).expect("date +%s");
    // Set to the host's `now`, and running since: between then and the host's clock after the
    // container ran (containers take many seconds here), with a little slack for rounding.
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now.as_secs().saturating_sub(2)..=after + 2).contains(&guest_time),
        "guest clock {guest_time}, host {} to {after}",
        now.as_secs()
    );

    // A user namespace: root inside is uid 1000 of the guest.
    let userns = guest.sh(
        "userns",
        "id -u; cat /proc/self/uid_map; touch /tmp/x && echo wrote; \
         cat /proc/sys/kernel/random/boot_id",
        |s| {
            let namespaces = s["linux"]["namespaces"].as_array_mut().unwrap();
            namespaces.extend([json!({"type": "user"}), json!({"type": "network"})]);
            s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 65536}]);
            s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 65536}]);
        },
    );
    let fields: Vec<Vec<&str>> = userns
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        fields,
        [
            vec!["0"],
            vec!["0", "1000", "65536"],
            vec!["wrote"],
            vec![BOOT_ID]
        ],
        "{}",
        userns.stderr
    );

    check_users(&guest);
    check_loopback_and_devices(&guest);
    check_exec(&guest);
    check_terminal(&guest);
    check_errors(&guest);
    check_guest_network(&guest);
    check_nothing_left_behind(&guest);
}

/// A boot id as the host would make one for a restored VM.
const BOOT_ID: &str = "5b0c3c1e-7d2a-4f4e-9a61-0c8d2f3e4b5a";

/// The ids, groups, umask and capability sets a process runs with, as `/proc/self/status` and
/// `id` show them.
const SHOW_CREDENTIALS: &str = "id -u; id -g; id -G; umask; \
    grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status";

/// What [`SHOW_CREDENTIALS`] prints for the given ids and capability masks.
fn credentials(ids: (u32, u32, &str), umask: &str, caps: [u64; 5], no_new_privs: bool) -> String {
    let (uid, gid, groups) = ids;
    let [inh, prm, eff, bnd, amb] = caps;
    format!(
        "{uid}\n{gid}\n{groups}\n{umask}\nCapInh:\t{inh:016x}\nCapPrm:\t{prm:016x}\n\
         CapEff:\t{eff:016x}\nCapBnd:\t{bnd:016x}\nCapAmb:\t{amb:016x}\nNoNewPrivs:\t{}\n",
        u8::from(no_new_privs)
    )
}

/// The mask of runc's default capabilities ([`DEFAULT_CAPS`]).
const DEFAULT_CAP_MASK: u64 = 1 << 29 | 1 << 5 | 1 << 10 | 1 | 1 << 1 | 1 << 3 | 1 << 7 | 1 << 6;

/// Non-root users (the ones images name with `USER`) and root, with default, empty and extra
/// capability sets, with and without `noNewPrivileges`: each starts with exactly what runc
/// would give it.
fn check_users(guest: &Guest) {
    let user = |uid: u32, gid: u32, groups: &[u32]| {
        let groups = groups.to_vec();
        move |s: &mut Value| {
            s["process"]["user"] =
                json!({"uid": uid, "gid": gid, "additionalGids": groups, "umask": 0o027});
        }
    };
    // A non-root user keeps nothing across exec without ambient capabilities (no file caps in
    // busybox), but the bounding set is the spec's.
    let plain = guest.sh(
        "user-default-caps",
        SHOW_CREDENTIALS,
        user(1000, 1000, &[10, 20]),
    );
    assert_eq!(
        plain.stdout,
        credentials(
            (1000, 1000, "1000 10 20"),
            "0027",
            [0, 0, 0, DEFAULT_CAP_MASK, 0],
            true
        ),
        "{}",
        plain.stderr
    );
    let none = guest.sh("user-no-caps", SHOW_CREDENTIALS, |s| {
        user(1000, 100, &[])(s);
        s["process"]["capabilities"] = json!({});
        s["process"]["noNewPrivileges"] = json!(false);
    });
    assert_eq!(
        none.stdout,
        credentials((1000, 100, "100"), "0027", [0; 5], false),
        "{}",
        none.stderr
    );
    // Ambient capabilities survive the exec of an unprivileged program.
    let bind = 1u64 << 10;
    let ambient = guest.sh("user-ambient", SHOW_CREDENTIALS, |s| {
        user(33, 33, &[])(s);
        for set in ["inheritable", "ambient"] {
            s["process"]["capabilities"][set] = json!(["CAP_NET_BIND_SERVICE"]);
        }
        s["process"]["noNewPrivileges"] = json!(false);
    });
    assert_eq!(
        ambient.stdout,
        credentials(
            (33, 33, "33"),
            "0027",
            [bind, bind, bind, DEFAULT_CAP_MASK, bind],
            false
        ),
        "{}",
        ambient.stderr
    );
    // Root with an extra capability and a seccomp filter loaded before the privilege drop.
    let admin = 1u64 << 21;
    let root = guest.sh("root-extra-caps", SHOW_CREDENTIALS, |s| {
        for set in ["bounding", "effective", "permitted"] {
            s["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push(json!("CAP_SYS_ADMIN"));
        }
        s["process"]["noNewPrivileges"] = json!(false);
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["reboot"], "action": "SCMP_ACT_ERRNO"}]
        });
    });
    let all = DEFAULT_CAP_MASK | admin;
    assert_eq!(
        root.stdout,
        credentials((0, 0, "0"), "0022", [0, all, all, all, 0], false),
        "{}",
        root.stderr
    );
}

/// Loopback is up with 127.0.0.1 and ::1 in a container's own network namespace and in the
/// guest's, so a server on localhost answers over IPv4 and IPv6; spec devices get the mode
/// and owner the spec gives, whatever the agent's umask (022) would leave of them.
fn check_loopback_and_devices(guest: &Guest) {
    let serve_and_fetch = "mkdir -p /tmp/www && echo served > /tmp/www/index.html && \
        httpd -p [::]:8080 -h /tmp/www && wget -qO- http://127.0.0.1:8080/ && \
        wget -qO- 'http://[::1]:8080/' && ip -o addr show lo | awk '{print $3, $4}'";
    let own_netns = guest.sh("loopback-netns", serve_and_fetch, |s| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "network"}));
    });
    let expected = "served\nserved\ninet 127.0.0.1/8\ninet6 ::1/128\n";
    assert_eq!(own_netns.stdout, expected, "{}", own_netns.stderr);
    let guest_netns = guest.sh("loopback-guest", serve_and_fetch, |_| {});
    assert_eq!(guest_netns.stdout, expected, "{}", guest_netns.stderr);

    let devices = guest.sh(
        "devices",
        "stat -c '%n %F %a %u %g %t:%T' /dev/fuse /dev/custom",
        |s| {
            s["linux"]["devices"] = json!([
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666},
                {"path": "/dev/custom", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640,
                 "uid": 5, "gid": 6}
            ]);
        },
    );
    assert_eq!(
        devices.stdout,
        "/dev/fuse character special file 666 0 0 a:e5\n\
         /dev/custom character special file 640 5 6 1:3\n",
        "{}",
        devices.stderr
    );
}

/// `sh -c SCRIPT` in a container owning the guest, as the runtime creates it, with the engine's
/// network namespace in its spec (a path, as Podman and containerd give it).
fn run_owning(guest: &Guest, id: &str, script: &str, guest_network: bool) -> Outcome {
    let mut spec = spec(&["sh", "-c", script]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "network", "path": "/var/run/netns/cni-test"}));
    let stdout = reader(guest.attach(id, None, StdioStream::Stdout));
    let stderr = reader(guest.attach(id, None, StdioStream::Stderr));
    let mut client = guest.client();
    client
        .create_container(CreateContainer {
            container_id: id.into(),
            spec: to_spec(spec),
            layers: vec![guest.disk.clone()],
            shares: false,
            stdio: StdioConfig {
                stdout: true,
                stderr: true,
                ..StdioConfig::default()
            },
            owns_guest: true,
            guest_network,
        })
        .expect("create");
    client.start_container(id).expect("start");
    let status = guest.client().wait(id, None).expect("wait");
    client.remove_container(id).expect("remove");
    Outcome {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The engine's network carried into the guest: the NIC (found by the VMM's MAC) becomes the
/// engine's eth0 with its MAC, MTU, addresses and routes, which a container with the guest's
/// network sees as it would under runc; a container without it sees loopback only.
fn check_guest_network(guest: &Guest) {
    let addr = |a: &str, prefix| IpPrefix {
        addr: a.parse().unwrap(),
        prefix,
    };
    let via = |gateway: &str| GuestRoute {
        gateway: Some(gateway.parse().unwrap()),
        device: Some("eth0".into()),
        ..GuestRoute::default()
    };
    let network = NetworkSetup {
        interfaces: vec![GuestInterface {
            device_mac: NIC_MAC,
            name: "eth0".into(),
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1400,
            addresses: vec![addr("10.88.0.5", 16), addr("fd00:88::5", 64)],
        }],
        routes: vec![
            via("10.88.0.1"),
            via("fd00:88::1"),
            GuestRoute {
                destination: Some(addr("192.168.77.0", 24)),
                gateway: Some("10.88.0.254".parse().unwrap()),
                metric: Some(50),
                ..GuestRoute::default()
            },
        ],
    };
    let setup = |network: NetworkSetup| GuestSetup {
        hostname: None,
        realtime_ns: None,
        entropy: Vec::new(),
        boot_id: None,
        network,
    };
    // A bad network is refused before anything changes.
    let mut bad = network.clone();
    bad.routes[2].device = Some("eth9".into());
    let refused = guest.client().setup_guest(setup(bad));
    assert!(
        matches!(&refused, Err(ClientError::Agent(e))
            if e.kind == ErrorKind::InvalidArgument && e.message.contains("eth9")),
        "{refused:?}"
    );
    let mut client = guest.client();
    let started = std::time::Instant::now();
    client.setup_guest(setup(network.clone())).unwrap();
    eprintln!("setup_guest with the network: {:?}", started.elapsed());
    // Once per VM, but a repeat does no harm.
    client.setup_guest(setup(network)).unwrap();

    let started = std::time::Instant::now();
    let shown = run_owning(
        guest,
        "net-guest",
        "ip addr; ip route; ip -6 route; cat /sys/class/net/eth0/mtu",
        true,
    );
    eprintln!(
        "a container in the guest's network: {:?}",
        started.elapsed()
    );
    assert_eq!(shown.status, exited(0), "{}", shown.stderr);
    // busybox's ip pads with blanks here and there: compare words.
    let lines: Vec<String> = shown
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" eth0: <") && l.contains(",UP") && l.contains(" mtu 1400 ")),
        "{}",
        shown.stdout
    );
    for expected in [
        "link/ether 52:54:00:12:34:56 brd ff:ff:ff:ff:ff:ff",
        "inet 10.88.0.5/16 brd 10.88.255.255 scope global eth0",
        "inet6 fd00:88::5/64 scope global",
        "default via 10.88.0.1 dev eth0",
        "10.88.0.0/16 dev eth0 scope link src 10.88.0.5",
        "192.168.77.0/24 via 10.88.0.254 dev eth0 metric 50",
        "fd00:88::/64 dev eth0 metric 256",
        "default via fd00:88::1 dev eth0 metric 1024",
        "1400",
    ] {
        assert!(has(expected), "no {expected:?} in\n{}", shown.stdout);
    }
    assert!(!shown.stdout.contains("02:c0:c0"), "{}", shown.stdout);

    let started = std::time::Instant::now();
    let alone = run_owning(
        guest,
        "net-none",
        "ls /sys/class/net; ip route | wc -l; ip addr | grep -c inet",
        false,
    );
    eprintln!(
        "a container in a network namespace of its own: {:?}",
        started.elapsed()
    );
    assert_eq!(alone.stdout, "lo\n0\n2\n", "{}", alone.stderr);
}

/// A long-running container, a process exec'd into it, signals, stats and the process list.
fn check_exec(guest: &Guest) {
    let id = "long";
    let out = reader(guest.attach(id, None, StdioStream::Stdout));
    let stdio = StdioConfig {
        stdout: true,
        ..StdioConfig::default()
    };
    guest
        .create(
            id,
            spec(&["sh", "-c", "echo state > /tmp/shared; exec sleep 600"]),
            stdio,
        )
        .unwrap();
    let mut client = guest.client();
    assert_eq!(client.state(id).unwrap().status, ContainerStatus::Created);
    client.start_container(id).unwrap();
    assert_eq!(client.state(id).unwrap().status, ContainerStatus::Running);

    let exec_out = reader(guest.attach(id, Some("e1"), StdioStream::Stdout));
    let process: Process = serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "sleep 1; cat /tmp/shared; hostname; echo $$; exit 5"],
        "env": ["PATH=/bin"],
        "cwd": "/"
    }))
    .unwrap();
    client
        .exec_process(ExecProcess {
            container_id: id.into(),
            exec_id: "e1".into(),
            process: Box::new(process),
            stdio,
        })
        .unwrap();
    assert_eq!(guest.client().wait(id, Some("e1")).unwrap(), exited(5));
    let lines: Vec<String> = exec_out.join().unwrap().lines().map(String::from).collect();
    assert_eq!(
        lines[..2],
        ["state", "cocoon"],
        "the exec sees the container's files and hostname"
    );
    let pid: i32 = lines[2].parse().expect("a pid");
    assert!(
        pid > 1,
        "the exec is in the container's pid namespace, not its init"
    );

    let processes = client.list_processes(id).unwrap();
    assert_eq!(processes.len(), 1, "{processes:?}");
    let stats = client.stats(id).unwrap();
    assert!(
        stats.memory_current > 0 && stats.pids_current == 1,
        "{stats:?}"
    );

    // A signal to one exec'd process, then to every process of the container.
    let sleeper: Process = serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0}, "args": ["sleep", "600"], "cwd": "/"
    }))
    .unwrap();
    client
        .exec_process(ExecProcess {
            container_id: id.into(),
            exec_id: "e2".into(),
            process: Box::new(sleeper),
            stdio: StdioConfig::default(),
        })
        .unwrap();
    assert_eq!(client.list_processes(id).unwrap().len(), 2);
    client.signal(id, Some("e2"), libc::SIGTERM, false).unwrap();
    assert_eq!(
        guest.client().wait(id, Some("e2")).unwrap().shell_code(),
        128 + libc::SIGTERM
    );
    client.signal(id, None, libc::SIGKILL, true).unwrap();
    assert_eq!(guest.client().wait(id, None).unwrap().shell_code(), 137);
    assert_eq!(out.join().unwrap(), "");
    client.remove_container(id).unwrap();
}

/// A terminal: one stream both ways, a size set before start seen by `stty size`.
fn check_terminal(guest: &Guest) {
    let id = "tty";
    let mut tty = guest.attach(id, None, StdioStream::Terminal);
    let mut spec = spec(&[
        "sh",
        "-c",
        "stty size; test -t 0 && echo is-a-tty; read line; echo got $line",
    ]);
    spec["process"]["terminal"] = json!(true);
    let stdio = StdioConfig {
        terminal: true,
        ..StdioConfig::default()
    };
    guest.create(id, spec, stdio).unwrap();
    let mut client = guest.client();
    client.resize_terminal(id, None, 40, 100).unwrap();
    client.start_container(id).unwrap();
    tty.write_all(b"typed\n").unwrap();
    let status = guest.client().wait(id, None).unwrap();
    let mut screen = String::new();
    tty.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = tty.read_to_string(&mut screen);
    assert_eq!(status, exited(0), "{screen}");
    assert!(screen.contains("40 100"), "{screen:?}");
    assert!(screen.contains("is-a-tty"), "{screen:?}");
    assert!(screen.contains("got typed"), "{screen:?}");
    client.remove_container(id).unwrap();
}

/// Bad requests get errors that say what is wrong, and change nothing.
fn check_errors(guest: &Guest) {
    let mut client = guest.client();
    let kind = |r: Result<i32, ClientError>| match r {
        Err(ClientError::Agent(e)) => (e.kind, e.message),
        other => panic!("expected an agent error, got {other:?}"),
    };
    let (k, m) = kind(guest.create("../escape", spec(&["true"]), StdioConfig::default()));
    assert_eq!(k, ErrorKind::InvalidArgument, "{m}");
    let (k, m) = kind(guest.create("nobin", spec(&["no-such-program"]), StdioConfig::default()));
    assert_eq!(k, ErrorKind::Failed);
    assert!(m.contains("executable file not found"), "{m}");
    let (k, _) = kind(client.start_container("nobin").map(|_| 0));
    assert_eq!(k, ErrorKind::NotFound);

    guest
        .create("dup", spec(&["true"]), StdioConfig::default())
        .unwrap();
    let (k, _) = kind(guest.create("dup", spec(&["true"]), StdioConfig::default()));
    assert_eq!(k, ErrorKind::AlreadyExists);
    client.remove_container("dup").unwrap();

    let (k, m) = kind(guest.create(
        "nostream",
        spec(&["true"]),
        StdioConfig {
            stdout: true,
            ..StdioConfig::default()
        },
    ));
    assert_eq!(k, ErrorKind::InvalidArgument);
    assert!(m.contains("not attached"), "{m}");

    // Malformed JSON in a well-formed frame: an error reply, and the connection still works.
    let stream = client.stream();
    stream.write_all(&5u32.to_be_bytes()).unwrap();
    stream.write_all(b"{nope").unwrap();
    let reply: ReplyEnvelope = read_frame(stream).unwrap();
    assert_eq!(reply.result.unwrap_err().kind, ErrorKind::BadRequest);
    write_frame(
        stream,
        &json!({"version": 99, "id": 4, "request": {"method": "hello"}}),
    )
    .unwrap();
    let reply: ReplyEnvelope = read_frame(stream).unwrap();
    assert_eq!(
        (reply.id, reply.result.unwrap_err().kind),
        (4, ErrorKind::Version)
    );
    client.hello().unwrap();

    // An oversized frame: refused before reading it, and the connection closed.
    let mut raw = guest.client();
    let stream = raw.stream();
    stream.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
    let reply: ReplyEnvelope = read_frame(stream).unwrap();
    assert_eq!(reply.result.unwrap_err().kind, ErrorKind::BadRequest);
    assert!(
        read_frame::<_, ReplyEnvelope>(stream).is_err(),
        "the connection is closed"
    );
    guest.client().hello().unwrap();
}

/// What the guest holds besides the given container: container mounts, cgroups and processes,
/// seen through the guest's own /proc and cgroup tree bind-mounted into an inspector.
fn leftovers(guest: &Guest, inspector: &str) -> String {
    // Builtins only in the loop, so the listing holds no process of the inspector but its shell.
    let script = format!(
        "grep -o ' /run/cocoon/containers/[^/ ]*' /guest/proc/1/mounts | sort -u | grep -v '/{inspector}$'; \
         ls -d /guest/cgroup/containers/*/ | grep -v '/{inspector}/$'; \
         for p in /guest/proc/[0-9]*; do [ -s $p/cmdline ] && read c < $p/comm && echo $c; done > /tmp/procs; \
         sort /tmp/procs | uniq -c"
    );
    let mut spec = spec(&["sh", "-c", &script]);
    spec["mounts"].as_array_mut().unwrap().extend([
        json!({"destination": "/guest/proc", "type": "bind", "source": "/proc", "options": ["rbind"]}),
        json!({"destination": "/guest/cgroup", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind"]}),
    ]);
    let out = guest.run(inspector, spec, None);
    out.stdout
}

fn check_nothing_left_behind(guest: &Guest) {
    let before = leftovers(guest, "inspect1");
    for i in 0..10 {
        let out = guest.sh(&format!("seq{i}"), "echo $$", |_| {});
        assert_eq!(
            out.stdout, "1\n",
            "each container is PID 1 of its own namespace"
        );
    }
    // Two at once: both running, then both gone.
    let ids = ["both1", "both2"];
    for id in ids {
        guest
            .create(id, spec(&["sleep", "600"]), StdioConfig::default())
            .unwrap();
        guest.client().start_container(id).unwrap();
    }
    for id in ids {
        assert_eq!(
            guest.client().state(id).unwrap().status,
            ContainerStatus::Running
        );
    }
    for id in ids {
        guest.client().remove_container(id).unwrap();
        assert!(matches!(
            guest.client().state(id),
            Err(ClientError::Agent(e)) if e.kind == ErrorKind::NotFound
        ));
    }
    let after = leftovers(guest, "inspect2");
    eprintln!("the guest before and after 12 containers:\n{after}");
    assert_eq!(
        before, after,
        "the guest holds something it did not hold before"
    );
    assert!(
        !before.contains("seq") && !before.contains("both"),
        "{before}"
    );
}

/// The agent's cost counters: creating a container costs at least one fork (its init), the
/// counters never go backwards, and they add up to what the guest spent. The per-phase deltas
/// of a `true` container are printed: what the guest side of `run` costs.
#[test]
fn counters_show_what_the_container_path_costs_the_guest() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if artifacts_or_skip("agent").is_none() {
        return;
    }
    let Some(rootfs) = rootfs_or_skip("agent") else {
        return;
    };
    let scratch = Scratch::new("agent-counters");
    let (_vm, guest) = boot(&scratch, &rootfs, &[]);
    // One connection for everything: each new one costs the agent a thread, which `forks` counts.
    let mut client = guest.client();
    let first = client.counters().unwrap();
    assert!(first.forks > 0 && first.minor_faults > 0, "{first:?}");
    assert!(first.guest_cpu_us > 0, "booting took CPU time: {first:?}");

    const PHASES: [&str; 4] = ["create", "start", "exit", "remove"];
    const RUNS: usize = 5;
    // The namespaces `cocoon spec`, Podman and Docker ask for.
    let mut with_network = spec(&["true"]);
    with_network["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "network"}));
    // Each way a container can be made: in namespaces of its own, and owning the guest's (what
    // the runtime asks for, one VM per container).
    for owns_guest in [false, true] {
        let mut sums = [[0u64; 8]; 4];
        // Run 0 warms up what is done once per guest; it is not counted.
        for run in 0..=RUNS {
            let id = format!("count{run}-{owns_guest}");
            let mut readings = vec![client.counters().unwrap()];
            client
                .create_container(CreateContainer {
                    container_id: id.clone(),
                    spec: to_spec(with_network.clone()),
                    layers: vec![guest.disk.clone()],
                    shares: false,
                    stdio: StdioConfig::default(),
                    owns_guest,
                    // The guest's network, as the runtime asks when the engine gave one.
                    guest_network: owns_guest,
                })
                .unwrap();
            readings.push(client.counters().unwrap());
            client.start_container(&id).unwrap();
            readings.push(client.counters().unwrap());
            assert_eq!(client.wait(&id, None).unwrap(), exited(0));
            readings.push(client.counters().unwrap());
            client.remove_container(&id).unwrap();
            readings.push(client.counters().unwrap());
            for (phase, pair) in readings.windows(2).enumerate() {
                let (a, b) = (fields(&pair[0]), fields(&pair[1]));
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    assert!(b >= *a, "{} went backwards: {:?}", PHASES[phase], pair);
                    if run > 0 {
                        sums[phase][i] += b - a;
                    }
                }
                if phase == 0 {
                    assert!(b[0] > a[0], "a container's init is a new process: {pair:?}");
                }
            }
        }
        eprintln!(
            "guest cost per `true` container (owns_guest {owns_guest}), mean of {RUNS}:\n\
             phase    forks  minflt  majflt  ctxsw  cpu_us  guest_cpu_us  syscr  syscw"
        );
        for (phase, sum) in PHASES.iter().zip(sums) {
            let m = sum.map(|s| s as f64 / RUNS as f64);
            eprintln!(
                "{phase:<7} {:>6.1} {:>7.1} {:>7.1} {:>6.1} {:>7.0} {:>13.0} {:>6.1} {:>6.1}",
                m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]
            );
        }
    }
    let last = client.counters().unwrap();
    assert!(last.cpu_us > first.cpu_us, "{first:?} {last:?}");
}

fn fields(c: &GuestCounters) -> [u64; 8] {
    [
        c.forks,
        c.minor_faults,
        c.major_faults,
        c.context_switches,
        c.cpu_us,
        c.guest_cpu_us,
        c.read_syscalls,
        c.write_syscalls,
    ]
}
