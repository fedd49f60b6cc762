//! containerd 1.6 (Debian's) with its runc shim driving the built `cocoon` as its runc binary
//! (`ctr run --runc-binary`): run, `task exec`, `task kill`. A containerd of the test's own, on a
//! socket and state directories in a scratch directory.

use std::time::{Duration, Instant};

use cocoon_tests::{Containerd, ONE_VM_AT_A_TIME, Scratch, engine_inputs_or_skip};

const IMAGE: &str = "cocoon/busybox:latest";

#[test]
fn containerd_runs_tasks_through_its_runc_shim() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("containerd");
    let Some((containerd, cocoon)) = containerd_or_skip(&scratch) else {
        return;
    };
    let runc_binary = cocoon.to_str().unwrap().to_owned();

    // ctr run: output and exit status through the runc shim, and a bind mount in the spec
    // shared with the microVM both ways.
    let vol = scratch.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("in"), "from-host\n").unwrap();
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        &runc_binary,
        "--mount",
        &mount,
        IMAGE,
        "c1",
        "sh",
        "-c",
        "cat /data/in; echo from-ctr > /data/out; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-host\n");
    assert_eq!(
        std::fs::read_to_string(vol.join("out")).unwrap(),
        "from-ctr\n"
    );

    // run -d, task exec, task kill (SIGTERM), delete.
    let script = "trap 'exit 0' TERM; while true; do sleep 1; done";
    containerd.ok(&[
        "run",
        "-d",
        "--runc-binary",
        &runc_binary,
        IMAGE,
        "c2",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(containerd.task_status("c2"), "RUNNING");
    let out = containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "c2",
        "sh",
        "-c",
        "echo from-exec; exit 5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-exec\n");
    containerd.ok(&["task", "kill", "c2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while containerd.task_status("c2") != "STOPPED" {
        assert!(
            Instant::now() < deadline,
            "the task did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    containerd.ok(&["task", "delete", "c2"]);
    containerd.ok(&["container", "delete", "c2"]);
    assert_eq!(containerd.ok(&["container", "ls", "-q"]).trim(), "");
    // The shim's runc root holds nothing of ours any more.
    let leftovers: Vec<_> = std::fs::read_dir("/run/containerd/runc/default")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `ctr run --cni`, as a containerd user networks a container: ctr makes the task (the runc
/// shim runs `cocoon create`), has the CNI plugins fill `/proc/PID/ns/net` of its process, then
/// starts it. The container sees the address and route the bridge plugin gave it and fetches a
/// page from the host byte-exact.
#[test]
fn containerd_containers_get_a_cni_network() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("containerd-cni");
    let Some((containerd, cocoon)) = containerd_or_skip(&scratch) else {
        return;
    };
    let _cni = CniConfig::install(&scratch);
    let page: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    let (port, server) = serve_once(page.clone());
    let script =
        format!("ip addr show eth0; ip route; echo ---; wget -q -O - http://{CNI_GATEWAY}:{port}/");
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--cni",
        "--runc-binary",
        cocoon.to_str().unwrap(),
        IMAGE,
        "cni1",
        "sh",
        "-c",
        &script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (net, fetched) = stdout.split_once("---\n").expect("the script's marker");
    assert!(net.contains(&format!("inet {CNI_SUBNET}")), "{net}");
    assert!(
        net.contains(&format!("default via {CNI_GATEWAY} dev eth0")),
        "{net}"
    );
    assert!(fetched == page, "the page came back changed: {fetched:?}");
    server.join().unwrap();
    // ctr's --rm removed the network: nothing hangs on the bridge.
    let ports = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", CNI_BRIDGE])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ports.stdout).trim(), "");
    assert_eq!(containerd.ok(&["container", "ls", "-q"]).trim(), "");
}

/// The test's containerd with the test image imported, and the `cocoon` to drive; `None`
/// when this machine cannot run the test (skipped, with a message).
fn containerd_or_skip(scratch: &Scratch) -> Option<(Containerd, std::path::PathBuf)> {
    let (cocoon, image) = engine_inputs_or_skip("containerd", "/usr/bin/containerd")?;
    let containerd = Containerd::start(scratch);
    containerd.ok(&[
        "image",
        "import",
        "--index-name",
        IMAGE,
        image.to_str().unwrap(),
    ]);
    Some((containerd, cocoon))
}

const CNI_BRIDGE: &str = "cocoon-ctr0";
const CNI_GATEWAY: &str = "10.215.0.1";
/// The addresses' common start (the bridge plugin gives a /24 from 10.215.0.2 up).
const CNI_SUBNET: &str = "10.215.0.";
/// Where gocni (and so `ctr run --cni`) looks: the first file, by name, of its config directory.
const CNI_CONF: &str = "/etc/cni/net.d/10-cocoon-test.conflist";
/// gocni's plugin directory; Debian's plugins are in /usr/lib/cni.
const CNI_BIN: &str = "/opt/cni/bin";

/// The test's CNI network, installed where ctr looks, and removed (with the bridge, and the
/// plugin directory link when the test made it) when dropped.
struct CniConfig {
    linked_bin: bool,
}

impl CniConfig {
    fn install(scratch: &Scratch) -> CniConfig {
        let linked_bin = !std::path::Path::new(CNI_BIN).exists();
        if linked_bin {
            std::fs::create_dir_all("/opt/cni").unwrap();
            std::os::unix::fs::symlink("/usr/lib/cni", CNI_BIN).unwrap();
        }
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "cocoon-test",
            "plugins": [{
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{CNI_SUBNET}0/24"), "gateway": CNI_GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": scratch.path("cni-ipam"),
                },
            }],
        });
        std::fs::write(CNI_CONF, conf.to_string()).unwrap();
        CniConfig { linked_bin }
    }
}

impl Drop for CniConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(CNI_CONF);
        if self.linked_bin {
            let _ = std::fs::remove_file(CNI_BIN);
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", CNI_BRIDGE])
            .status();
    }
}

/// A one-request HTTP server on every host address, giving `body`: its port and thread.
fn serve_once(body: String) -> (u16, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
    });
    (port, server)
}
