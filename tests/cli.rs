//! `cocoon`, the runc-compatible CLI, used the way an engine uses runc: bundles in, a process
//! with an exit status out. The bad-input checks need no VM; the lifecycle checks boot three,
//! with OCI hooks recording what they are told, and a failing hook one more.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use cocoon_tests::cocoon_cli::{Cocoon, bundle, cocoon_binary};
use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip};

/// Whether `pid` runs. A zombie does not: whoever inherited it reaps it in its own time.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// A host-side hook: appends `STAGE STATE-JSON` to `$HOOK_LOG` and exits with EXIT (0).
fn hook_script(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("hook.sh");
    std::fs::write(
        &path,
        "#!/bin/sh\n# hook.sh STAGE [EXIT]\nIFS= read -r state || true\n\
         printf '%s %s\\n' \"$1\" \"$state\" >> \"$HOOK_LOG\"\nexit \"${2:-0}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A hook entry for config.json that runs `script` for `stage`, logging to `log`.
fn hook(script: &Path, log: &Path, stage: &str, exit: u8) -> Value {
    serde_json::json!({
        "path": script,
        "args": ["hook.sh", stage, exit.to_string()],
        "env": [format!("HOOK_LOG={}", log.display())],
        "timeout": 30,
    })
}

/// Adds `hooks` to the bundle's config.json.
fn add_hooks(bundle: &Path, hooks: Value) {
    let path = bundle.join("config.json");
    let mut spec: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    spec["hooks"] = hooks;
    std::fs::write(&path, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
}

/// The four usual hooks (prestart, createRuntime, poststart, poststop), each logging to `log`.
fn lifecycle_hooks(bundle: &Path, script: &Path, log: &Path) {
    let h = |stage| serde_json::json!([hook(script, log, stage, 0)]);
    add_hooks(
        bundle,
        serde_json::json!({
            "prestart": h("prestart"),
            "createRuntime": h("createRuntime"),
            "poststart": h("poststart"),
            "poststop": h("poststop"),
        }),
    );
}

/// What the hooks logged so far: (stage, status, pid, id) per run, in order.
fn hook_log(log: &Path) -> Vec<(String, String, Option<i64>, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let (stage, state) = line.split_once(' ').expect("STAGE STATE");
            let state: Value = serde_json::from_str(state).expect("the state is JSON");
            assert_eq!(state["ociVersion"], "1.0.2", "{line}");
            (
                stage.to_owned(),
                state["status"].as_str().unwrap_or_default().to_owned(),
                state["pid"].as_i64(),
                state["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn logged(
    entries: &[(&str, &str, Option<i32>, &str)],
) -> Vec<(String, String, Option<i64>, String)> {
    entries
        .iter()
        .map(|(stage, status, pid, id)| {
            (
                stage.to_string(),
                status.to_string(),
                pid.map(i64::from),
                id.to_string(),
            )
        })
        .collect()
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let Some(bin) = cocoon_binary() else { return };
    let scratch = Scratch::new("cli-bad");
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: None,
    };
    let good = scratch.path("good");
    std::fs::create_dir_all(good.join("rootfs")).unwrap();
    let spec = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"cwd":"/","user":{"uid":0,"gid":0},"args":["true"]}}"#;
    std::fs::write(good.join("config.json"), spec).unwrap();
    let long = "a".repeat(1025);
    for id in ["..", "a/b", "../../etc", &long] {
        let err = cocoon.fails(&["create", "--bundle", good.to_str().unwrap(), id]);
        assert!(err.contains("invalid container id"), "{err}");
    }

    let bad = |name: &str, config: Option<&str>| {
        let dir = scratch.path(name);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        if let Some(config) = config {
            std::fs::write(dir.join("config.json"), config).unwrap();
        }
        cocoon.fails(&["create", "--bundle", dir.to_str().unwrap(), name])
    };
    assert!(bad("noconfig", None).contains("config.json"));
    assert!(bad("badjson", Some("{\"ociVersion\": ")).contains("invalid"));
    assert!(bad("v2", Some(&spec.replace("1.0.2", "2.0.0"))).contains("unsupported ociVersion"));
    assert!(
        bad(
            "noprocess",
            Some(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#)
        )
        .contains("no process")
    );
    // Hooks meant for the container's namespaces would have to run in the guest.
    let err = bad(
        "guesthook",
        Some(&spec.replace(
            r#""process""#,
            r#""hooks":{"createContainer":[{"path":"/bin/true"}]},"process""#,
        )),
    );
    assert!(
        err.contains("createContainer hooks are not supported") && err.contains("inside the guest"),
        "{err}"
    );
    let err = cocoon.fails(&["create", "--bundle", "/nonexistent/bundle", "x"]);
    assert!(err.contains("/nonexistent/bundle"), "{err}");
    assert!(
        cocoon.containers().is_empty(),
        "left behind: {:?}",
        cocoon.containers()
    );

    for verb in ["start", "state", "delete"] {
        let err = cocoon.fails(&[verb, "ghost"]);
        assert!(
            err.contains("container ghost does not exist"),
            "{verb}: {err}"
        );
    }
    assert!(
        cocoon
            .fails(&["kill", "ghost", "NOTASIGNAL"])
            .contains("invalid signal")
    );
    cocoon.ok(&["delete", "--force", "ghost"]);

    let features: Value = serde_json::from_str(&cocoon.ok(&["features"])).unwrap();
    assert_eq!(features["linux"]["cgroup"]["v2"], true);
    let spec_dir = scratch.path("spec");
    std::fs::create_dir_all(&spec_dir).unwrap();
    cocoon.ok(&["spec", "--bundle", spec_dir.to_str().unwrap()]);
    assert!(
        cocoon
            .fails(&["spec", "--bundle", spec_dir.to_str().unwrap()])
            .contains("exists")
    );
    assert_eq!(cocoon.ok(&["list", "-q"]), "");
}

#[test]
fn containers_live_and_die_like_runc_containers() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if artifacts_or_skip("cli").is_none() {
        return;
    }
    let Some(bin) = cocoon_binary() else { return };
    let scratch = Scratch::new("cli");
    // A --root of 200+ bytes: every socket in a container's directory is past the 108 bytes
    // of a sockaddr_un (Docker's state directories are already), and must work all the same.
    let root = scratch
        .path("root")
        .join("r".repeat(120))
        .join("s".repeat(80));
    assert!(root.as_os_str().len() >= 200);
    let cocoon = Cocoon {
        bin,
        root,
        config: None,
    };

    let script = hook_script(&scratch.0);

    // run: the container's output on our stdout and stderr, its exit status ours; the hooks
    // create, start and delete would run, with `run` itself as the container's process.
    let b = bundle(
        &scratch.path("run"),
        &["sh", "-c", "echo out; echo err >&2; uname -r; exit 7"],
    );
    let r1_log = scratch.path("r1-hooks.log");
    lifecycle_hooks(&b, &script, &r1_log);
    let child = cocoon
        .command(&["run", "--bundle", b.to_str().unwrap(), "r1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cocoon");
    let run_pid = child.id() as i32;
    let out = child.wait_with_output().expect("wait for cocoon run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "out");
    assert_ne!(
        lines[1],
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout).trim()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));
    assert_eq!(cocoon.state("r1")["status"], "stopped");
    let ran = [
        ("prestart", "creating", Some(run_pid), "r1"),
        ("createRuntime", "creating", Some(run_pid), "r1"),
        ("poststart", "running", Some(run_pid), "r1"),
    ];
    assert_eq!(hook_log(&r1_log), logged(&ran));
    cocoon.ok(&["delete", "r1"]);
    assert!(cocoon.containers().is_empty());
    let mut ran = ran.to_vec();
    ran.push(("poststop", "stopped", None, "r1"));
    assert_eq!(hook_log(&r1_log), logged(&ran));

    // create, start, kill, delete: what containerd and Podman do.
    let script = "echo started; trap 'echo got TERM; exit 3' TERM; while true; do sleep 1; done";
    let b = bundle(&scratch.path("life"), &["sh", "-c", script]);
    let c1_log = scratch.path("c1-hooks.log");
    lifecycle_hooks(&b, &hook_script(&scratch.0), &c1_log);
    let pid_file = scratch.path("c1.pid");
    let output = std::fs::File::create(scratch.path("c1.out")).unwrap();
    let status = cocoon
        .command(&[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
        ])
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .status()
        .unwrap();
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let state = cocoon.state("c1");
    assert_eq!(
        (state["status"].as_str(), state["pid"].as_i64()),
        (Some("created"), Some(pid as i64))
    );
    assert_eq!(state["bundle"], b.to_str().unwrap());
    // The monitor runs the VM: its VMM threads are jailed, the monitor's own are not.
    cocoon_tests::assert_vmm_jailed(pid as u32, 256);
    // createRuntime (after the deprecated prestart) ran before create returned, told the
    // monitor's pid, as `state` reports it.
    let mut ran = vec![
        ("prestart", "creating", Some(pid), "c1"),
        ("createRuntime", "creating", Some(pid), "c1"),
    ];
    assert_eq!(hook_log(&c1_log), logged(&ran));
    let err = cocoon.fails(&["create", "--bundle", b.to_str().unwrap(), "c1"]);
    assert!(err.contains("container with id exists: c1"), "{err}");
    assert_eq!(
        hook_log(&c1_log),
        logged(&ran),
        "a refused create runs no hooks"
    );
    cocoon.ok(&["start", "c1"]);
    ran.push(("poststart", "running", Some(pid), "c1"));
    assert_eq!(hook_log(&c1_log), logged(&ran));
    assert_eq!(cocoon.state("c1")["status"], "running");
    assert!(cocoon.fails(&["start", "c1"]).contains("running"));
    assert!(cocoon.fails(&["delete", "c1"]).contains("not stopped"));
    assert!(cocoon.ok(&["list"]).contains("c1"));
    let ps: Vec<i32> = serde_json::from_str(&cocoon.ok(&["ps", "--format", "json", "c1"])).unwrap();
    assert!(!ps.is_empty());
    // update: new limits in the guest's cgroup, seen by the container at /sys/fs/cgroup (its
    // cgroup namespace's root); events --stats: runc's stats event from that cgroup.
    let cgroup_file = |file: &str| {
        cocoon
            .ok(&["exec", "c1", "cat", &format!("/sys/fs/cgroup/{file}")])
            .trim()
            .to_owned()
    };
    cocoon.ok(&["update", "--memory", "64m", "c1"]);
    assert_eq!(cgroup_file("memory.max"), (64u64 << 20).to_string());
    cocoon.ok(&["update", "--pids-limit", "50", "c1"]);
    assert_eq!(cgroup_file("pids.max"), "50");
    let mut update = cocoon
        .command(&["update", "--resources", "-", "c1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut update.stdin.take().unwrap(),
        br#"{"memory":{"limit":100663296},"cpu":{"quota":200000,"period":100000,"shares":0},"pids":{"limit":0}}"#,
    )
    .unwrap();
    let out = update.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cgroup_file("memory.max"), (96u64 << 20).to_string());
    // Two CPUs' worth: the VM has one, so the counter below is not throttled.
    assert_eq!(cgroup_file("cpu.max"), "200000 100000");
    assert_eq!(
        cgroup_file("pids.max"),
        "50",
        "a zero pids limit changes nothing"
    );
    let err = cocoon.fails(&["update", "--memory", "lots", "c1"]);
    assert!(err.contains("invalid resources: --memory"), "{err}");
    let event: Value = serde_json::from_str(&cocoon.ok(&["events", "--stats", "c1"])).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["id"].as_str()),
        (Some("stats"), Some("c1"))
    );
    let memory = &event["data"]["memory"]["usage"];
    assert!(memory["usage"].as_u64().unwrap() > 0, "{event}");
    assert_eq!(memory["limit"].as_u64(), Some(96 << 20), "{event}");
    assert_eq!(event["data"]["pids"]["limit"].as_u64(), Some(50), "{event}");
    assert!(
        event["data"]["cpu"]["usage"]["total"].as_u64().unwrap() > 0,
        "{event}"
    );
    // exec: a further process in the container, its output and status ours.
    let out = cocoon.run(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "echo in-exec; cat /proc/1/cmdline; exit 4",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("in-exec\nsh\0-c\0"), "{stdout:?}");
    // An exec that cannot run says why, as runc's does: not found on the PATH, and an execve
    // that fails (a script whose interpreter is missing), attached and detached.
    // (The log line quotes the message, as runc's logrus does: its quotes come escaped.)
    let err = cocoon.fails(&["exec", "c1", "nosuch"]);
    assert!(
        err.contains(r#"exec: \"nosuch\": executable file not found in $PATH"#),
        "{err}"
    );
    cocoon.ok(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "printf '#!/nonexistent\\n' > /tmp/bad && chmod +x /tmp/bad",
    ]);
    for detach in [&[][..], &["--detach"]] {
        let args: Vec<&str> = ["exec"]
            .iter()
            .chain(detach)
            .chain(&["c1", "/tmp/bad"])
            .copied()
            .collect();
        let err = cocoon.fails(&args);
        assert!(
            err.contains("exec /tmp/bad: no such file or directory"),
            "{args:?}: {err}"
        );
    }
    // exec --process --detach --pid-file: what containerd's shim and Podman issue.
    let process = scratch.path("process.json");
    std::fs::write(
        &process,
        r#"{"args":["sleep","600"],"cwd":"/","user":{"uid":0,"gid":0}}"#,
    )
    .unwrap();
    let exec_pid_file = scratch.path("exec.pid");
    cocoon.detached(&[
        "exec",
        "--process",
        process.to_str().unwrap(),
        "--detach",
        "--pid-file",
        exec_pid_file.to_str().unwrap(),
        "c1",
    ]);
    let exec_pid: i32 = std::fs::read_to_string(&exec_pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(exec_pid));
    // A detached exec whose pid file cannot be written fails, and its process, already
    // running in the guest, goes: nobody would ever wait for it.
    // (Counted by command line: the container's init keeps starting short-lived children.)
    let sleepers = || {
        cocoon
            .ok(&["exec", "c1", "ps", "-o", "args"])
            .lines()
            .filter(|l| l.trim() == "sleep 600")
            .count()
    };
    let before = sleepers();
    let err = cocoon.fails(&[
        "exec",
        "--process",
        process.to_str().unwrap(),
        "--detach",
        "--pid-file",
        "/nonexistent/exec.pid",
        "c1",
    ]);
    assert!(err.contains("/nonexistent/"), "{err}");
    assert!(
        within(30, || sleepers() == before),
        "the abandoned exec still runs: {} sleepers, {before} before",
        sleepers()
    );

    // pause and resume: the vCPUs stop, so a counter in the guest stands still, then goes on.
    let counter = scratch.path("counter.json");
    std::fs::write(
        &counter,
        r#"{"args":["sh","-c","i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; usleep 100000; done"],"cwd":"/","user":{"uid":0,"gid":0}}"#,
    )
    .unwrap();
    cocoon.detached(&[
        "exec",
        "--process",
        counter.to_str().unwrap(),
        "--detach",
        "c1",
    ]);
    let count = || -> i64 {
        let out = cocoon.ok(&["exec", "c1", "cat", "/tmp/n"]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("counter {out:?}"))
    };
    // Each read is an exec (about 7 s here, with the counter running meanwhile at about one
    // tick per 2 s of emulated fork and exec): the windows must be long against that for
    // "stood still" to show, since the pause window also holds a pause and a resume.
    let window = std::time::Duration::from_secs(20);
    let before = count();
    std::thread::sleep(window);
    let running = count() - before;
    assert!(
        running >= 4,
        "the counter barely moves while running: {running}"
    );
    let before = count();
    cocoon.ok(&["pause", "c1"]);
    assert_eq!(cocoon.state("c1")["status"], "paused");
    let err = cocoon.fails(&["exec", "c1", "true"]);
    assert!(err.contains("paused"), "{err}");
    assert!(cocoon.fails(&["pause", "c1"]).contains("paused"));
    assert!(cocoon.fails(&["delete", "c1"]).contains("not stopped"));
    for verb in [
        &["update", "--pids-limit", "60", "c1"][..],
        &["events", "--stats", "c1"],
    ] {
        let err = cocoon.fails(verb);
        assert!(err.contains("container c1 is paused"), "{verb:?}: {err}");
    }
    std::thread::sleep(window);
    cocoon.ok(&["resume", "c1"]);
    assert_eq!(cocoon.state("c1")["status"], "running");
    let paused = count() - before;
    assert!(
        paused * 2 < running,
        "the counter went on while paused: {paused} (running: {running} in the same time)"
    );
    let err = cocoon.fails(&["resume", "c1"]);
    assert!(err.contains("container c1 is not paused"), "{err}");

    // events without --stats: a stats event a tick until the container stops, then exit 0.
    let events = cocoon
        .command(&["events", "--interval", "300ms", "c1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    // A signal to a paused container waits for the resume, as with a frozen cgroup.
    cocoon.ok(&["pause", "c1"]);
    cocoon.ok(&["kill", "c1", "TERM"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(cocoon.state("c1")["status"], "paused");
    assert!(alive(pid));
    cocoon.ok(&["resume", "c1"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(cocoon.state("c1")["status"], "stopped");
    let events = events.wait_with_output().unwrap();
    assert!(
        events.status.success(),
        "{}",
        String::from_utf8_lossy(&events.stderr)
    );
    let stream = String::from_utf8_lossy(&events.stdout);
    assert!(stream.lines().count() >= 2, "{stream}");
    for line in stream.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["type"], "stats", "{line}");
    }
    let err = cocoon.fails(&["update", "--memory", "32m", "c1"]);
    assert!(err.contains("container not running"), "{err}");
    let err = cocoon.fails(&["events", "--stats", "c1"]);
    assert!(err.contains("container not running"), "{err}");
    // The exec'd process died with the container's pid namespace, and its monitor with it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(exec_pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!alive(exec_pid));
    assert_eq!(
        std::fs::read_to_string(scratch.path("c1.out")).unwrap(),
        "started\ngot TERM\n"
    );
    assert_eq!(hook_log(&c1_log), logged(&ran), "poststop waits for delete");
    cocoon.ok(&["delete", "c1"]);
    assert!(!alive(pid));
    assert!(cocoon.containers().is_empty());
    ran.push(("poststop", "stopped", None, "c1"));
    assert_eq!(hook_log(&c1_log), logged(&ran));

    // delete --force of a running container: its VM goes, and everything with it.
    let b = bundle(&scratch.path("force"), &["sleep", "600"]);
    cocoon.detached(&["run", "--detach", "--bundle", b.to_str().unwrap(), "c2"]);
    let pid = cocoon.state("c2")["pid"].as_i64().unwrap() as i32;
    assert!(alive(pid));
    cocoon.ok(&["delete", "--force", "c2"]);
    assert!(!alive(pid), "the VMM process is gone");
    assert!(
        cocoon.containers().is_empty(),
        "no state or images: {:?}",
        cocoon.containers()
    );
}

#[test]
fn a_failing_prestart_hook_fails_create_and_leaves_nothing() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if artifacts_or_skip("cli-hook-fails").is_none() {
        return;
    }
    let Some(bin) = cocoon_binary() else { return };
    let scratch = Scratch::new("cli-hook-fails");
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: None,
    };
    let b = bundle(&scratch.path("bundle"), &["sleep", "600"]);
    let script = hook_script(&scratch.0);
    let log = scratch.path("hooks.log");
    add_hooks(
        &b,
        serde_json::json!({
            "prestart": [hook(&script, &log, "prestart", 0), hook(&script, &log, "failing", 5)],
            "createRuntime": [hook(&script, &log, "createRuntime", 0)],
            "poststop": [hook(&script, &log, "poststop", 0)],
        }),
    );
    let pid_file = scratch.path("h1.pid");
    let out = cocoon
        .command(&[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "h1",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run cocoon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "create should fail: {stderr}");
    assert!(
        stderr.contains(&format!(
            "error running prestart hook #1 ({}): exit status 5",
            script.display()
        )),
        "{stderr}"
    );
    // The hooks after the failing one never ran; the container was stopped and removed, then
    // the poststop hooks ran, as the spec's lifecycle has it.
    let entries = hook_log(&log);
    let stages: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(stages, ["prestart", "failing", "poststop"]);
    let monitor = entries[0]
        .2
        .expect("the creating state has the monitor's pid") as i32;
    assert_eq!(entries[2].1, "stopped");
    assert!(!alive(monitor), "the monitor (the VM) {monitor} is gone");
    assert!(
        !pid_file.exists(),
        "no pid file for a container that does not exist"
    );
    assert!(
        cocoon.containers().is_empty(),
        "left behind: {:?}",
        cocoon.containers()
    );
    assert!(
        cocoon
            .fails(&["state", "h1"])
            .contains("container h1 does not exist")
    );
}

/// The children of `pid` (from /proc/*/stat's ppid field).
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let ppid = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?;
                    ppid.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Polls `done` every 100 ms for up to `secs`.
fn within(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    done()
}

/// An engine may kill `create` at any point (a timeout, a cancelled pod). Until `create` has
/// recorded its monitor nobody else knows of that VM, so it must go with `create`: killed
/// while the VM boots, and killed later, while a prestart hook runs (the monitor has reported
/// the container created but was not yet confirmed). Either way `state` and `delete --force`
/// then work and leave nothing.
#[test]
fn a_create_killed_at_any_point_leaves_no_vm_behind() {
    use std::os::unix::fs::PermissionsExt;
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if artifacts_or_skip("cli-create-killed").is_none() {
        return;
    }
    let Some(bin) = cocoon_binary() else { return };
    let scratch = Scratch::new("cli-create-killed");
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: None,
    };
    let b = bundle(&scratch.path("bundle"), &["sleep", "600"]);
    let kill = |pid: i32| {
        // SAFETY: kill(2) on a process this test started or found as that one's child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    };

    // Mid-boot: the monitor exists, has not reported yet.
    let mut create = cocoon
        .command(&["create", "--bundle", b.to_str().unwrap(), "boot"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cocoon create");
    let create_pid = create.id() as i32;
    let mut monitor = None;
    assert!(
        within(30, || {
            monitor = children(create_pid).first().copied();
            monitor.is_some()
        }),
        "create started no monitor"
    );
    let monitor = monitor.unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(alive(monitor), "the monitor is still booting");
    kill(create_pid);
    create.wait().unwrap();
    assert!(
        within(10, || !alive(monitor)),
        "the monitor {monitor} (and its VM) outlived the killed create"
    );
    cocoon.ok(&["delete", "--force", "boot"]);
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());

    // Reported, not confirmed: a prestart hook holds `create`.
    let hook_pid = scratch.path("hook.pid");
    let log = scratch.path("hook.log");
    let hang = scratch.path("hang.sh");
    std::fs::write(
        &hang,
        format!(
            "#!/bin/sh\nIFS= read -r state || true\necho $$ > {}\nprintf 'prestart %s\\n' \"$state\" > {}\nexec sleep 600\n",
            hook_pid.display(),
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    add_hooks(
        &b,
        serde_json::json!({ "prestart": [{ "path": hang, "args": ["hang.sh"] }] }),
    );
    let mut create = cocoon
        .command(&["create", "--bundle", b.to_str().unwrap(), "hooked"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cocoon create");
    assert!(
        within(300, || !hook_log(&log).is_empty()),
        "the prestart hook never ran"
    );
    let monitor = hook_log(&log)[0]
        .2
        .expect("the hook is told the monitor's pid") as i32;
    assert!(alive(monitor));
    kill(create.id() as i32);
    create.wait().unwrap();
    let hook: i32 = std::fs::read_to_string(&hook_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(hook);
    assert!(
        within(10, || !alive(monitor)),
        "the unconfirmed monitor {monitor} (and its VM) outlived the killed create"
    );
    assert_eq!(cocoon.state("hooked")["status"], "stopped");
    cocoon.ok(&["delete", "--force", "hooked"]);
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());
}

/// How the fake agent of `host_verbs_survive_a_hostile_agent` answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hostile {
    /// A frame whose body is not JSON.
    Garbage,
    /// A length header far over the frame limit, then nothing.
    Huge,
    /// A well-formed reply to a request that was not asked.
    WrongId,
    /// A well-formed reply with numbers no guest can report.
    BadNumbers,
    /// Takes the request and never answers.
    Silent,
}

/// Serves `socket` as a guest agent behind the VMM's vsock socket would (`CONNECT port` →
/// `OK port`), then answers every request as `mode` says.
fn hostile_agent(socket: &Path, mode: Arc<Mutex<Hostile>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mode = *mode.lock().unwrap();
            std::thread::spawn(move || {
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    return;
                }
                let _ = stream.write_all(b"OK 1\n");
                let mut header = [0u8; 4];
                if stream.read_exact(&mut header).is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
                let _ = stream.read_exact(&mut body);
                let frame = |json: &str| {
                    let mut f = (json.len() as u32).to_be_bytes().to_vec();
                    f.extend_from_slice(json.as_bytes());
                    f
                };
                let reply = match mode {
                    Hostile::Garbage => frame("{this is not json"),
                    Hostile::Huge => 0xffff_fff0u32.to_be_bytes().to_vec(),
                    Hostile::WrongId => frame(r#"{"id":999,"result":{"Ok":{"kind":"done"}}}"#),
                    Hostile::BadNumbers => frame(
                        r#"{"id":1,"result":{"Ok":{"kind":"processes","value":[-5,99999999]}}}"#,
                    ),
                    Hostile::Silent => {
                        std::thread::sleep(std::time::Duration::from_secs(600));
                        return;
                    }
                };
                let _ = stream.write_all(&reply);
                std::thread::sleep(std::time::Duration::from_secs(1));
            });
        }
    });
}

/// Whatever the guest's agent answers (garbage, a huge frame, a reply to another request,
/// impossible numbers, or nothing), every host verb fails with an error that says so, in
/// bounded time, and leaves the container's monitor as it was; one that waits on a silent
/// agent does not hold the container's lock, and `kill KILL` and `delete --force` still end
/// the container. The agent is played by this test at the VMM's vsock socket: to the host,
/// that is all a hostile guest agent can be.
#[test]
fn host_verbs_survive_a_hostile_agent() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if artifacts_or_skip("cli-hostile-agent").is_none() {
        return;
    }
    let Some(bin) = cocoon_binary() else { return };
    let scratch = Scratch::new("cli-hostile-agent");
    let cocoon = Cocoon {
        bin: bin.clone(),
        root: scratch.path("root"),
        config: None,
    };
    let b = bundle(&scratch.path("bundle"), &["sleep", "600"]);
    cocoon.detached(&["run", "--detach", "--bundle", b.to_str().unwrap(), "h1"]);
    let monitor = cocoon.state("h1")["pid"].as_i64().unwrap() as i32;
    // The real socket is moved aside (the VMM keeps serving it there) and the fake takes its
    // place. A verb judges a silent agent by the VM's progress; the fake has no vCPUs, so it
    // looks idle from the start: a short idle limit keeps the test quick.
    let socket = scratch.path("root").join("h1").join("vsock.sock");
    let real = scratch.path("real-vsock.sock");
    std::fs::rename(&socket, &real).unwrap();
    let config = scratch.path("config.toml");
    std::fs::write(&config, "guest_idle_secs = 3\n").unwrap();
    let hostile = Cocoon {
        bin,
        root: scratch.path("root"),
        config: Some(config),
    };
    let mode = Arc::new(Mutex::new(Hostile::Garbage));
    hostile_agent(&socket, mode.clone());
    let process = scratch.path("true.json");
    std::fs::write(
        &process,
        r#"{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}"#,
    )
    .unwrap();
    let verbs: [&[&str]; 6] = [
        &["ps", "h1"],
        &["kill", "h1", "TERM"],
        &["update", "--pids-limit", "100", "h1"],
        &["events", "--stats", "h1"],
        &["exec", "h1", "true"],
        &[
            "exec",
            "--detach",
            "--process",
            process.to_str().unwrap(),
            "h1",
        ],
    ];
    for m in [
        Hostile::Garbage,
        Hostile::Huge,
        Hostile::WrongId,
        Hostile::BadNumbers,
    ] {
        *mode.lock().unwrap() = m;
        for verb in verbs {
            let out = hostile.run(verb);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{m:?} {verb:?}: {err}");
            assert!(err.contains("agent"), "{m:?} {verb:?}: {err}");
            assert!(alive(monitor), "{m:?} {verb:?} took the monitor down");
            assert_eq!(hostile.state("h1")["status"], "running", "{m:?} {verb:?}");
        }
    }
    // Silent: `ps` waits, but not holding the lock: `state` answers meanwhile, and `kill
    // KILL` ends the container from the host side.
    *mode.lock().unwrap() = Hostile::Silent;
    let mut ps = hostile
        .command(&["ps", "h1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(hostile.state("h1")["status"], "running");
    assert!(ps.try_wait().unwrap().is_none(), "ps should still wait");
    let out = ps.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("did not answer"), "{err}");
    hostile.ok(&["kill", "h1", "KILL"]);
    assert!(!alive(monitor), "kill KILL returns with the monitor gone");
    assert_eq!(hostile.state("h1")["status"], "stopped");
    hostile.ok(&["delete", "h1"]);
    assert!(
        hostile.containers().is_empty(),
        "{:?}",
        hostile.containers()
    );
    let _ = std::fs::remove_file(&real);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// A layer cache on a full filesystem (a 256 KiB tmpfs; the busybox image needs more) fails
/// `create` before any VM, with the system's reason, and keeps no half-built image that a
/// later `create` could take for a good one.
#[test]
fn a_full_layer_cache_fails_create_and_keeps_no_half_image() {
    let Some(bin) = cocoon_binary() else { return };
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true requires this test to run (as root: it mounts a tmpfs)"
        );
        eprintln!("SKIPPED a_full_layer_cache_fails_create_and_keeps_no_half_image: not root");
        return;
    }
    let scratch = Scratch::new("cli-cache-full");
    let cache = scratch.path("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "cocoon-test-cache"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&cache);
    let config = scratch.path("config.toml");
    std::fs::write(
        &config,
        format!("layer_cache = {:?}\n", cache.join("layers")),
    )
    .unwrap();
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: Some(config),
    };
    // The cache holds the layers of an overlay root, as engines give it.
    let b = bundle(&scratch.path("bundle"), &["true"]);
    let lower = scratch.path("lower");
    std::fs::rename(b.join("rootfs"), &lower).unwrap();
    for dir in ["rootfs", "upper", "work"] {
        std::fs::create_dir_all(scratch.path("bundle").join(dir)).unwrap();
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        b.join("upper").display(),
        b.join("work").display()
    );
    let root = b.join("rootfs");
    let mounted = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &options])
        .arg(&root)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount an overlay root");
    let _unmount_root = Unmount(&root);
    // Stdio to a file: were create to succeed, its monitor would hold a pipe open for ever.
    let log = scratch.path("create.err");
    let status = cocoon
        .command(&["create", "--bundle", b.to_str().unwrap(), "full"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "create should fail: {err}");
    assert!(
        err.to_lowercase().contains("no space left on device"),
        "the reason is the system's: {err}"
    );
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());
    assert_eq!(
        files_under(&cache),
        Vec::<PathBuf>::new(),
        "a half image stayed"
    );
}

#[test]
fn checkpoint_and_restore_keep_a_running_process_going() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if artifacts_or_skip("checkpoint").is_none() {
        return;
    }
    let Some(bin) = cocoon_binary() else { return };
    let scratch = Scratch::new("checkpoint");
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: None,
    };
    let b = bundle(
        &scratch.path("bundle"),
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; usleep 100000; done",
        ],
    );
    cocoon.detached(&["run", "--detach", "--bundle", b.to_str().unwrap(), "k1"]);
    let count = || -> i64 {
        let out = cocoon.ok(&["exec", "k1", "cat", "/tmp/n"]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("counter {out:?}"))
    };
    // The shell writes its first count a moment after `run` returns.
    let counted = || {
        let out = cocoon.run(&["exec", "k1", "cat", "/tmp/n"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse::<i64>().unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while counted() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the counter does not count"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let before = count();
    let pid = cocoon.state("k1")["pid"].as_i64().unwrap() as i32;
    let image = scratch.path("ckpt");
    cocoon.ok(&["checkpoint", "--image-path", image.to_str().unwrap(), "k1"]);
    // As after a runc checkpoint: the container is stopped, its process gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!alive(pid));
    assert_eq!(cocoon.state("k1")["status"], "stopped");
    cocoon.ok(&["delete", "k1"]);

    // A checkpoint that is not there: refused, nothing made.
    let err = cocoon.fails(&[
        "restore",
        "--detach",
        "--image-path",
        scratch.path("nothing").to_str().unwrap(),
        "--bundle",
        b.to_str().unwrap(),
        "k2",
    ]);
    assert!(err.contains("checkpoint.json"), "{err}");
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());

    // Restored: no boot, the same shell goes on counting from where it was.
    cocoon.detached(&[
        "restore",
        "--detach",
        "--image-path",
        image.to_str().unwrap(),
        "--bundle",
        b.to_str().unwrap(),
        "k1",
    ]);
    assert_eq!(cocoon.state("k1")["status"], "running");
    let after = count();
    assert!(after >= before, "the counter restarted: {after} < {before}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let later = count();
    assert!(later > after, "the restored process does not run: {later}");
    let ps: Vec<i32> = serde_json::from_str(&cocoon.ok(&["ps", "--format", "json", "k1"])).unwrap();
    assert!(!ps.is_empty(), "{ps:?}");
    // kill KILL returns with the process the engine waits on gone (Podman's `rm --force
    // --time 0` gives it 5 s more, then fails), however slowly the guest reports the exit.
    let pid = cocoon.state("k1")["pid"].as_i64().unwrap() as i32;
    cocoon.ok(&["kill", "k1", "KILL"]);
    assert!(!alive(pid), "the monitor outlived kill KILL");
    assert_eq!(cocoon.state("k1")["status"], "stopped");
    cocoon.ok(&["delete", "k1"]);
    assert!(cocoon.containers().is_empty());

    // A container with a host directory shared into its VM: refused at once, left running.
    let vol = scratch.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let shared = bundle(&scratch.path("shared"), &["sleep", "1000"]);
    let config = shared.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]
        }));
    std::fs::write(&config, serde_json::to_vec(&spec).unwrap()).unwrap();
    cocoon.detached(&[
        "run",
        "--detach",
        "--bundle",
        shared.to_str().unwrap(),
        "k3",
    ]);
    let err = cocoon.fails(&[
        "checkpoint",
        "--image-path",
        scratch.path("ckpt3").to_str().unwrap(),
        "k3",
    ]);
    assert!(err.contains("a checkpoint cannot carry"), "{err}");
    assert!(
        !scratch.path("ckpt3").exists(),
        "a refused checkpoint made its directory"
    );
    assert_eq!(cocoon.state("k3")["status"], "running");
    cocoon.ok(&["delete", "--force", "k3"]);
    assert!(cocoon.containers().is_empty());
}
