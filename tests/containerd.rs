//! containerd 1.6 (Debian's) with its runc shim driving the built `cocoon` as its runc binary
//! (`ctr run --runc-binary`): run, `task exec`, `task kill`. A containerd of the test's own, on a
//! socket and state directories in a scratch directory.

use std::time::{Duration, Instant};

use cocoon_tests::{Containerd, ONE_VM_AT_A_TIME, Scratch, engine_inputs_or_skip};

const IMAGE: &str = "cocoon/busybox:latest";

#[test]
fn containerd_runs_tasks_through_its_runc_shim() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((cocoon, image)) = engine_inputs_or_skip("containerd", "/usr/bin/containerd") else {
        return;
    };
    let scratch = Scratch::new("containerd");
    let containerd = Containerd::start(&scratch);
    containerd.ok(&[
        "image",
        "import",
        "--index-name",
        IMAGE,
        image.to_str().unwrap(),
    ]);
    let runc_binary = cocoon.to_str().unwrap().to_owned();

    // ctr run: output and exit status through the runc shim.
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        &runc_binary,
        IMAGE,
        "c1",
        "sh",
        "-c",
        "echo hi; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

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
