//! Podman 4.3 (Debian's, with conmon) with `--runtime` pointing at the built `cocoon`: the
//! commands a user types, each container in a microVM. Test-local configuration and storage;
//! the image is the busybox OCI archive the project builds (no registry).

use std::fs::Permissions;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_tests::{
    ONE_VM_AT_A_TIME, Podman, Scratch, check_published_web_server, engine_inputs_or_skip, http_get,
    processes_mentioning, pseudo_random_bytes,
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

/// `podman run -v`: host directories shared with the microVM over virtio-fs, both ways and
/// live, as under runc: big and many files, `:ro`, a non-root user's files, every way out of
/// the share tried from inside, and nothing left once the containers are gone.
#[test]
fn podman_volumes_are_shared_both_ways() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((cocoon, image)) = engine_inputs_or_skip("podman", "/usr/bin/podman") else {
        return;
    };
    let scratch = Scratch::new("podman-volumes");
    let podman = Podman::setup(&scratch, &cocoon, "");
    podman.ok(&["load", "-i", image.to_str().unwrap()]);
    let vol = scratch.path("vol");
    std::fs::create_dir_all(vol.join("open")).unwrap();
    std::fs::set_permissions(vol.join("open"), Permissions::from_mode(0o777)).unwrap();
    // Made on the host: the guest's own random source is slow here.
    let big = pseudo_random_bytes(64 << 20, 17);
    std::fs::write(vol.join("big"), &big).unwrap();
    std::fs::write(vol.join("rootfile"), "root's\n").unwrap();
    // Ways out, planted on the host: links pointing outside the share.
    let secret = scratch.path("secret");
    std::fs::write(&secret, "HOST-SECRET\n").unwrap();
    std::os::unix::fs::symlink("../secret", vol.join("rel-out")).unwrap();
    std::os::unix::fs::symlink(&secret, vol.join("abs-out")).unwrap();
    let volume = format!("{}:/data", vol.display());

    // `T <uptime> <step>` lines time the steps in the guest (shown, not asserted).
    let script = r#"
t() { echo "T $(cut -d' ' -f1 /proc/uptime) $1"; }
t start
dd if=/data/big of=/data/copy bs=1M 2>/dev/null
t copy-64MiB
echo hello > /data/from-guest
mkdir /data/many
i=0; while [ $i -lt 1000 ]; do echo $i > /data/many/f$i; i=$((i+1)); done
t 1000-files
for f in /data/rel-out /data/abs-out /data/../secret /data/../../secret; do
    cat $f 2>/dev/null
done
mknod /data/null c 1 3 2>/dev/null || echo mknod-refused
cp /bin/busybox /data/suid && chmod 4755 /data/suid
ln /data/from-guest /data/hard
mkfifo /data/fifo
t escapes
echo done
"#;
    let started = Instant::now();
    // CAP_MKNOD, so that the guest kernel lets mknod through and the file server refuses it.
    let out = podman.ok(&[
        "run",
        "--rm",
        "--cap-add",
        "MKNOD",
        "-v",
        &volume,
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    eprintln!("podman run -v: {:.1} s", started.elapsed().as_secs_f64());
    let (steps, out): (Vec<&str>, Vec<&str>) = out.lines().partition(|l| l.starts_with("T "));
    eprintln!("{}", steps.join("\n"));
    let out = out.join("\n");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.last().copied(), Some("done"), "{out}");
    assert!(
        !out.contains("HOST-SECRET"),
        "a link led out of the share: {out}"
    );
    assert!(out.contains("mknod-refused"), "{out}");
    assert!(!vol.join("null").exists());
    // Read in the guest and written back: the round trip is byte-exact.
    assert_eq!(md5(&vol.join("copy")), md5(&vol.join("big")), "64 MiB back");
    assert_eq!(
        std::fs::read_to_string(vol.join("from-guest")).unwrap(),
        "hello\n"
    );
    let many = std::fs::read_dir(vol.join("many")).unwrap().count();
    assert_eq!(many, 1000);
    assert_eq!(
        std::fs::read_to_string(vol.join("many/f999")).unwrap(),
        "999\n"
    );
    let meta = |name: &str| std::fs::symlink_metadata(vol.join(name)).unwrap();
    assert_eq!(
        meta("suid").mode() & 0o7777,
        0o755,
        "no set-user-ID reaches the host"
    );
    assert_eq!(meta("from-guest").nlink(), 2);
    assert_eq!((meta("from-guest").uid(), meta("from-guest").gid()), (0, 0));
    assert!(meta("fifo").file_type().is_fifo());

    // A non-root user: its files are its own on the host; root's are not its to write.
    let out = podman.run(&[
        "run",
        "--rm",
        "--user",
        "1000:1000",
        "-v",
        &volume,
        IMAGE,
        "sh",
        "-c",
        "echo mine > /data/open/mine && echo x >> /data/rootfile",
    ]);
    assert!(!out.status.success(), "a uid 1000 wrote root's file");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mine = meta("open/mine");
    assert_eq!((mine.uid(), mine.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read_to_string(vol.join("rootfile")).unwrap(),
        "root's\n"
    );

    // :ro reads, and refuses writes.
    let out = podman.run(&[
        "run",
        "--rm",
        "-v",
        &format!("{volume}:ro"),
        IMAGE,
        "sh",
        "-c",
        "cat /data/from-guest && echo x > /data/nope",
    ]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!vol.join("nope").exists());

    // Live: what the host writes while the container runs, the container sees.
    let watcher = "while [ ! -s /data/go ]; do sleep 0.2; done; cat /data/go > /data/seen; \
                   exec sleep 1000";
    podman.ok(&[
        "run", "-d", "--name", "live", "-v", &volume, IMAGE, "sh", "-c", watcher,
    ]);
    let id = podman
        .ok(&["inspect", "--format", "{{.Id}}", "live"])
        .trim()
        .to_owned();
    let state = Path::new("/run/cocoon").join(&id);
    assert!(state.exists(), "no runtime state at {}", state.display());
    std::fs::write(vol.join("go"), "from-host\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(vol.join("seen")).unwrap_or_default() != "from-host\n" {
        assert!(
            Instant::now() < deadline,
            "the container never saw the host's write"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    podman.ok(&["rm", "--force", "--time", "0", "live"]);
    assert_eq!(podman.ok(&["ps", "-aq"]).trim(), "");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !processes_mentioning(&id).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", processes_mentioning(&id));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!state.exists(), "{} left behind", state.display());
}

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}
