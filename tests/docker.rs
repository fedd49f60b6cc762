//! Docker 20.10 (Debian's `docker.io`) with `cocoon` as a runtime, the commands a user types,
//! each container in a microVM. The test's own dockerd (data root, socket and config in a
//! scratch directory) with the default exec root, so containers live where Docker always puts
//! them: `/var/run/docker/runtime-runc/moby/<64 hex>/`, a directory too long for a Unix socket
//! path in it. The image is imported from the busybox root filesystem (no registry).
//!
//! Every VM boot costs 20-30 s here, so each container checks several things.

use std::path::Path;
use std::process::{Command, Stdio};

use cocoon_tests::{
    DOCKER_BRIDGE, DOCKER_BRIDGE_ADDRESS, DOCKER_CLIENT, DOCKER_DAEMON, Docker, ONE_VM_AT_A_TIME,
    Scratch, check_published_web_server, engine_inputs_or_skip, from_env, http_get,
    paths_present_or_skip, processes_mentioning,
};

const IMAGE: &str = "cocoon/busybox";
/// Where Docker keeps the runtime's state (`--root`) under the default exec root.
const STATE_ROOTS: &str = "/var/run/docker";
/// The start of every runtime's `--root` there: cocoon's monitors have it on their command
/// line, dockerd's own containerd does not.
const RUNTIME_ROOTS: &str = "/var/run/docker/runtime-";

#[test]
fn docker_runs_containers_in_microvms() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("docker");
    let Some(docker) = docker_or_skip(&scratch, false) else {
        return;
    };

    // The guest's kernel, not the host's; --memory as the guest cgroup's memory.max; the
    // exit code propagated.
    let host_kernel =
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout)
            .trim()
            .to_owned();
    let out = docker.run(&[
        "run",
        "--rm",
        "--runtime",
        "cocoon",
        "--network",
        "none",
        "--memory",
        "48m",
        IMAGE,
        "sh",
        "-c",
        "uname -r; cat /sys/fs/cgroup/memory.max; exit 3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {stdout}, stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout:?}");
    assert_ne!(lines[0], host_kernel, "a guest kernel, not the host's");
    assert_eq!(lines[1], (48u64 << 20).to_string());
    let guest_kernel = lines[0].to_owned();

    // run -it through a pty, with no --runtime: the default runtime is cocoon.
    let text = in_terminal(
        &docker,
        &format!(
            "{DOCKER_CLIENT} run -it --rm --network none {IMAGE} sh -c 'test -t 0 && echo tty-ok; uname -r'"
        ),
    );
    assert!(text.contains("tty-ok"), "{text:?}");
    assert!(text.contains(&guest_kernel), "in a microVM: {text:?}");

    // run -d, exec, logs, stop of a container that traps TERM and exits, rm.
    let script = "echo ready; trap 'echo stopping; exit 0' TERM; while true; do sleep 1; done";
    let d = ["run", "-d", "--runtime", "cocoon", "--network", "none"];
    docker.ok(&[&d[..], &["--name", "d1", IMAGE, "sh", "-c", script]].concat());
    let exec = docker.ok(&[
        "exec",
        "d1",
        "sh",
        "-c",
        "echo from-exec; cat /proc/1/cmdline",
    ]);
    assert!(exec.starts_with("from-exec\nsh\0-c\0"), "{exec:?}");
    assert!(docker.ok(&["logs", "d1"]).contains("ready"));
    // update: containerd's runc shim hands the new limits to `cocoon update -r -`. Docker
    // 20.10 refuses a memory limit above the container's swap limit (unset here: 0) unless
    // the swap limit comes too; the guest has no swap, so cocoon ignores it.
    docker.ok(&["update", "--memory", "64m", "--memory-swap", "128m", "d1"]);
    assert_eq!(
        docker
            .ok(&["exec", "d1", "cat", "/sys/fs/cgroup/memory.max"])
            .trim(),
        (64u64 << 20).to_string()
    );
    // pause and unpause: through containerd's runc shim to the VM's vCPUs.
    let status = |docker: &Docker| {
        docker
            .ok(&["inspect", "--format", "{{.State.Status}}", "d1"])
            .trim()
            .to_owned()
    };
    docker.ok(&["pause", "d1"]);
    assert_eq!(status(&docker), "paused");
    docker.ok(&["unpause", "d1"]);
    assert_eq!(status(&docker), "running");
    assert_eq!(docker.ok(&["exec", "d1", "echo", "after"]).trim(), "after");
    docker.ok(&["stop", "-t", "20", "d1"]);
    assert!(docker.ok(&["logs", "d1"]).contains("stopping"));
    assert_eq!(exit_code(&docker, "d1"), "0");
    docker.ok(&["rm", "d1"]);

    // stop of a container that ignores TERM: KILL once the timeout has passed.
    let script = "trap '' TERM; echo ready; while true; do sleep 1; done";
    docker.ok(&[&d[..], &["--name", "d2", IMAGE, "sh", "-c", script]].concat());
    let started = std::time::Instant::now();
    docker.ok(&["stop", "-t", "3", "d2"]);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "KILL only after the timeout"
    );
    assert_eq!(exit_code(&docker, "d2"), "137");
    docker.ok(&["rm", "d2"]);
    assert_eq!(docker.ok(&["ps", "-aq"]).trim(), "");

    assert_nothing_left();
}

/// Docker's default network, as users run it: the container on `docker0` with the address
/// Docker gave it (its prestart hook moves the veth in after `create`), a published port
/// reached from the host, and one container reaching another over the bridge.
#[test]
fn docker_containers_get_their_network_and_published_ports() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("docker-net");
    let Some(docker) = docker_or_skip(&scratch, true) else {
        return;
    };
    let port = 18500 + (std::process::id() % 400) as u16;
    let subnet = DOCKER_BRIDGE_ADDRESS.trim_end_matches("1/24");
    let gateway = DOCKER_BRIDGE_ADDRESS.trim_end_matches("/24");
    check_published_web_server(|args| docker.ok(args), IMAGE, port, subnet, 24, gateway);

    docker.ok(&["rm", "--force", "web"]);
    assert!(
        http_get("127.0.0.1", port, "/").is_err(),
        "the port still answers"
    );
    // The veths Docker made are gone with the containers: nothing hangs on the bridge.
    let ports = Command::new("ip")
        .args(["-o", "link", "show", "master", DOCKER_BRIDGE])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ports.stdout).trim(), "");
    assert_nothing_left();
}

/// No monitors (their command line has Docker's state root) or shims, no state directories
/// (and with them no sockets). Shims exit just after `rm` returns.
fn assert_nothing_left() {
    let leftovers = || {
        [
            processes_mentioning(RUNTIME_ROOTS),
            processes_mentioning("-namespace moby"),
        ]
        .concat()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !leftovers().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(leftovers(), Vec::<String>::new());
    assert_eq!(container_dirs(), Vec::<String>::new());
}

/// The test's dockerd (with Docker's default networking when `networked`) and the image in it;
/// `None` when this machine cannot run the test (skipped, with a message).
fn docker_or_skip(scratch: &Scratch, networked: bool) -> Option<Docker> {
    let (cocoon, _) = engine_inputs_or_skip("docker", DOCKER_DAEMON)?;
    let rootfs = from_env("COCOON_BUSYBOX_DIR", "build/busybox-rootfs");
    if !paths_present_or_skip("docker", &[&rootfs, Path::new(DOCKER_CLIENT)], "test") {
        return None;
    }
    // The exec root is the default one: a second dockerd would share it.
    let others = processes_mentioning("dockerd");
    assert!(
        others.is_empty(),
        "another dockerd runs and would share /var/run/docker: {others:?}"
    );
    let docker = if networked {
        Docker::networked(scratch, &cocoon)
    } else {
        Docker::start(scratch, &cocoon)
    };
    import_image(&docker, &rootfs);
    Some(docker)
}

/// `tar -C ROOTFS -c . | docker import - IMAGE`.
fn import_image(docker: &Docker, rootfs: &Path) {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tar");
    let out = docker
        .command(&["import", "-", IMAGE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("run docker import");
    assert!(tar.wait().unwrap().success());
    assert!(
        out.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn exit_code(docker: &Docker, name: &str) -> String {
    docker
        .ok(&["inspect", "--format", "{{.State.ExitCode}}", name])
        .trim()
        .to_owned()
}

/// Container directories (64 hex characters) under every runtime's state root,
/// `/var/run/docker/runtime-*/moby/`.
fn container_dirs() -> Vec<String> {
    let Ok(runtimes) = std::fs::read_dir(STATE_ROOTS) else {
        return Vec::new();
    };
    runtimes
        .flatten()
        .filter(|r| r.file_name().to_string_lossy().starts_with("runtime-"))
        .filter_map(|r| std::fs::read_dir(r.path().join("moby")).ok())
        .flat_map(|dir| dir.flatten())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.len() == 64 && n.to_string_lossy().bytes().all(|b| b.is_ascii_hexdigit())
            })
        })
        .map(|p| p.display().to_string())
        .collect()
}

/// Runs `command` on a terminal of its own (script(1)), as a user at a shell would; returns
/// what appeared on it.
fn in_terminal(docker: &Docker, command: &str) -> String {
    let out = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .env("DOCKER_HOST", &docker.host)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command}: {text}");
    text
}
