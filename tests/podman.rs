//! Podman 4.3 (Debian's, with conmon) with `--runtime` pointing at the built `cocoon`: the
//! commands a user types, each container in a microVM. Test-local configuration and storage;
//! the image is the busybox OCI archive the project builds (no registry).

use std::process::{Command, Stdio};

use cocoon_tests::{
    ONE_VM_AT_A_TIME, Podman, Scratch, check_published_web_server, engine_inputs_or_skip, http_get,
};

const IMAGE: &str = "localhost/cocoon-busybox:latest";

#[test]
fn podman_runs_containers_in_microvms() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((cocoon, image)) = engine_inputs_or_skip("podman", "/usr/bin/podman") else {
        return;
    };
    let scratch = Scratch::new("podman");
    let podman = Podman::setup(&scratch, &cocoon, "");
    podman.ok(&["load", "-i", image.to_str().unwrap()]);

    // The container's output, from a guest kernel that is not the host's.
    let host_kernel =
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout)
            .into_owned();
    let out = podman.ok(&["run", "--rm", IMAGE, "sh", "-c", "echo hi; uname -r"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hi");
    assert_ne!(lines[1], host_kernel.trim());

    // An exit code propagated, and --memory enforced by the guest's cgroup.
    let out = podman.run(&[
        "run",
        "--rm",
        "--memory",
        "48m",
        IMAGE,
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory.max; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (48u64 << 20).to_string()
    );

    // run -d, exec, logs, stop (SIGTERM first), rm.
    let script = "echo ready; trap 'echo stopping; exit 0' TERM; while true; do sleep 1; done";
    podman.ok(&["run", "-d", "--name", "d1", IMAGE, "sh", "-c", script]);
    let exec = podman.ok(&[
        "exec",
        "d1",
        "sh",
        "-c",
        "echo from-exec; cat /proc/1/cmdline",
    ]);
    assert!(exec.starts_with("from-exec\nsh\0-c\0"), "{exec:?}");
    assert!(podman.ok(&["logs", "d1"]).contains("ready"));
    // exec -it: a terminal for an exec'd process, through the console socket.
    let text = in_terminal(
        &podman,
        "podman exec -it d1 sh -c 'test -t 0 && echo exec-tty'",
    );
    assert!(text.contains("exec-tty"), "{text:?}");
    // pause and unpause: the engine's verbs reach the VM's vCPUs through the runtime.
    let status = |podman: &Podman| {
        podman
            .ok(&["inspect", "--format", "{{.State.Status}}", "d1"])
            .trim()
            .to_owned()
    };
    podman.ok(&["pause", "d1"]);
    assert_eq!(status(&podman), "paused");
    podman.ok(&["unpause", "d1"]);
    assert_eq!(status(&podman), "running");
    assert_eq!(podman.ok(&["exec", "d1", "echo", "after"]).trim(), "after");
    podman.ok(&["stop", "-t", "10", "d1"]);
    assert!(podman.ok(&["logs", "d1"]).contains("stopping"));
    assert_eq!(
        podman
            .ok(&["inspect", "--format", "{{.State.ExitCode}}", "d1"])
            .trim(),
        "0"
    );
    podman.ok(&["rm", "d1"]);
    assert_eq!(podman.ok(&["ps", "-aq"]).trim(), "");

    // run -it: a terminal through conmon's console socket.
    let text = in_terminal(
        &podman,
        &format!("podman run -it --rm {IMAGE} sh -c 'test -t 0 && echo tty-ok'"),
    );
    assert!(text.contains("tty-ok"), "{text:?}");
}

/// Runs `command` on a terminal of its own (script(1)), as a user at a shell would; returns
/// what appeared on it.
fn in_terminal(podman: &Podman, command: &str) -> String {
    let out = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .env("CONTAINERS_CONF", &podman.conf)
        .env("CONTAINERS_STORAGE_CONF", &podman.storage)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command}: {text}");
    text
}

/// Podman's default network, as users run it: the netavark bridge, a published port reached
/// from the host, and one container reaching another over the bridge.
#[test]
fn podman_containers_keep_their_network_and_published_ports() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((cocoon, image)) = engine_inputs_or_skip("podman", "/usr/bin/podman") else {
        return;
    };
    let scratch = Scratch::new("podman-net");
    let podman = Podman::networked(&scratch, &cocoon);
    podman.ok(&["load", "-i", image.to_str().unwrap()]);
    let port = 18000 + (std::process::id() % 1000) as u16;
    check_published_web_server(
        |args| podman.ok(args),
        IMAGE,
        port,
        "10.88.",
        16,
        "10.88.0.1",
    );

    podman.ok(&["rm", "--force", "--time", "0", "web"]);
    assert_eq!(podman.ok(&["ps", "-aq"]).trim(), "");
    assert!(
        http_get("127.0.0.1", port, "/").is_err(),
        "the port still answers"
    );
}
