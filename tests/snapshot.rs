//! VM snapshots end to end: one VM is booted with the agent, checked, paused and saved; then two
//! clones restored from that snapshot by new `cocoon-vmm` processes run side by side, each
//! passing the same container checks as the cold-booted VM, and one of them is given a layer
//! disk in its spare slot. Damaged or mismatched snapshots are refused with one clear error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cocoon_agent_protocol::client::AgentClient;
use serde_json::json;

use cocoon_tests::guest::{Guest, exited, spec};
use cocoon_tests::{
    ONE_VM_AT_A_TIME, RunningVm, Scratch, api_ask, api_connect, artifacts_or_skip,
    pseudo_random_bytes, rootfs_or_skip,
};

/// What every VM in this test must do, whether booted or restored: a container's exit code,
/// stdout and stderr, stdin, and its memory limit as the guest's cgroup has it.
fn container_checks(guest: &Guest, tag: &str) {
    let out = guest.sh(
        &format!("{tag}-limits"),
        "echo out; echo err >&2; cat /sys/fs/cgroup/memory.max; exit 3",
        |s| s["linux"]["resources"]["memory"] = json!({"limit": 48 << 20}),
    );
    assert_eq!(out.status, exited(3), "{tag}: {}", out.stderr);
    assert_eq!(out.stdout, format!("out\n{}\n", 48 << 20), "{tag}");
    assert_eq!(out.stderr, "err\n", "{tag}");
    let out = guest.run(
        &format!("{tag}-stdin"),
        spec(&["cat"]),
        Some(b"through stdin"),
    );
    assert_eq!(out.status, exited(0), "{tag}: {}", out.stderr);
    assert_eq!(out.stdout, "through stdin", "{tag}");
}

fn wait_for_agent(uds: &Path, vm: &mut RunningVm, what: &str) {
    let client = AgentClient::connect_when_ready(uds, Duration::from_secs(180));
    vm.assert_running();
    client
        .unwrap_or_else(|e| panic!("{what}: the agent does not answer: {e}"))
        .hello()
        .unwrap();
}

/// A clone of the snapshot in `dir`, on vsock socket `uds`.
fn restore(vmm: &Path, dir: &Path, uds: &Path, api: &Path, console: &Path) -> RunningVm {
    RunningVm {
        child: std::process::Command::new(vmm)
            .arg("--restore")
            .arg(dir)
            .args(["--vsock", &format!("3,{}", uds.display())])
            .args(["--api-sock", api.to_str().unwrap()])
            .args(["--console", console.to_str().unwrap()])
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cocoon-vmm --restore"),
    }
}

/// `cocoon-vmm --restore` of something that is not a good snapshot: exit 1 and one line.
fn refused(vmm: &Path, args: &[&str], dir: &Path) -> String {
    let out = std::process::Command::new(vmm)
        .arg("--restore")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    stderr
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["state.bin", "memory.bin"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn a_snapshot_restores_into_clones_that_run_containers() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("snapshot") else {
        return;
    };
    let Some(rootfs) = rootfs_or_skip("snapshot") else {
        return;
    };
    let scratch = Scratch::new("snapshot");
    let snap = scratch.path("snap");
    // The spare slot: an empty disk now, a layer once a clone gets one.
    let spare = scratch.path("spare.img");
    std::fs::write(&spare, b"").unwrap();

    // Cold boot, checks, pause, snapshot.
    let uds = scratch.path("vsock.sock");
    let api = scratch.path("api.sock");
    let mut vm = RunningVm {
        child: artifacts
            .vmm_command(&[])
            .args(["--console", scratch.path("console.log").to_str().unwrap()])
            .args(["--memory", "128"])
            .args(["--disk", &format!("{},ro", rootfs.display())])
            .args(["--disk", &format!("{},ro", spare.display())])
            .args(["--vsock", &format!("3,{}", uds.display())])
            .args(["--api-sock", api.to_str().unwrap()])
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the VMM"),
    };
    wait_for_agent(&uds, &mut vm, "cold boot");
    let cold = Guest {
        uds: uds.clone(),
        disk: "/dev/vda".into(),
    };
    container_checks(&cold, "cold");
    let mut control = api_connect(&api, &mut vm);
    let refused_running = api_ask(
        &mut control,
        &json!({"action": "snapshot", "path": snap}).to_string(),
    );
    assert_eq!(refused_running["ok"], false, "{refused_running}");
    assert!(
        refused_running["error"]
            .as_str()
            .unwrap()
            .contains("must be paused"),
        "{refused_running}"
    );
    assert_eq!(api_ask(&mut control, r#"{"action":"pause"}"#)["ok"], true);
    let saved = api_ask(
        &mut control,
        &json!({"action": "snapshot", "path": snap}).to_string(),
    );
    assert_eq!(saved, json!({"ok": true, "state": "paused"}));
    drop(vm);
    let ram = std::fs::metadata(snap.join("memory.bin")).unwrap();
    assert_eq!(ram.len(), 128 << 20);
    {
        use std::os::unix::fs::MetadataExt;
        assert!(
            ram.blocks() * 512 < 128 << 20,
            "untouched guest RAM is not written ({} bytes on disk)",
            ram.blocks() * 512
        );
    }

    // Two clones at once, each on its own socket, each running containers.
    let clones: Vec<(RunningVm, Guest, PathBuf)> = ["a", "b"]
        .iter()
        .map(|name| {
            let uds = scratch.path(&format!("clone-{name}.sock"));
            let api = scratch.path(&format!("clone-{name}-api.sock"));
            let console = scratch.path(&format!("clone-{name}.log"));
            let vm = restore(&artifacts.vmm, &snap, &uds, &api, &console);
            let guest = Guest {
                uds,
                disk: "/dev/vda".into(),
            };
            (vm, guest, api)
        })
        .collect();
    let mut clones = clones;
    for (vm, guest, _) in &mut clones {
        wait_for_agent(&guest.uds, vm, "restored clone");
    }
    std::thread::scope(|s| {
        for (i, (_, guest, _)) in clones.iter().enumerate() {
            s.spawn(move || container_checks(guest, &format!("clone{i}")));
        }
    });

    // A layer swapped into clone a's spare slot reads back byte-exact.
    let layer = scratch.path("layer.img");
    let bytes = pseudo_random_bytes(1 << 20, 11);
    std::fs::write(&layer, &bytes).unwrap();
    let (vm_a, guest_a, api_a) = &mut clones[0];
    let mut control = api_connect(api_a, vm_a);
    let swapped = api_ask(
        &mut control,
        &json!({"action": "swap_disk", "id": "block1", "path": layer, "read_only": true})
            .to_string(),
    );
    assert_eq!(swapped["ok"], true, "{swapped}");
    let want = String::from_utf8_lossy(
        &std::process::Command::new("md5sum")
            .arg(&layer)
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .next()
    .unwrap()
    .to_owned();
    // The guest learns the new capacity from the config-change interrupt; give it a moment.
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do \
                  [ \"$(cat /sys/block/vdb/size)\" = 2048 ] && break; sleep 1; done; \
                  cat /sys/block/vdb/size; \
                  mknod /dev/vdb b $(tr : ' ' < /sys/block/vdb/dev) && md5sum /dev/vdb";
    let read = guest_a.sh("swapped", script, |s| {
        for set in ["bounding", "effective", "permitted"] {
            s["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push(json!("CAP_MKNOD"));
        }
    });
    assert_eq!(read.status, exited(0), "{}", read.stderr);
    let lines: Vec<&str> = read.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"2048"), "{}", read.stdout);
    assert!(
        lines.get(1).is_some_and(|l| l.starts_with(&want)),
        "{} (want {want})",
        read.stdout
    );
    drop(clones);

    // Damaged or mismatched snapshots: refused before any guest runs.
    let vmm = &artifacts.vmm;
    let bad = scratch.path("bad");
    copy_snapshot(&snap, &bad);
    let state = bad.join("state.bin");
    let good_state = std::fs::read(&state).unwrap();
    let mut flipped = good_state.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(&state, &flipped).unwrap();
    assert!(refused(vmm, &[], &bad).contains("corrupted (checksum mismatch)"));
    std::fs::write(&state, &good_state[..good_state.len() / 2]).unwrap();
    assert!(refused(vmm, &[], &bad).contains("truncated"));
    let mut other_version = good_state.clone();
    other_version[8] = 0x7f;
    std::fs::write(&state, &other_version).unwrap();
    assert!(refused(vmm, &[], &bad).contains("format version 127"));
    std::fs::write(&state, &good_state).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("memory.bin"))
        .unwrap();
    memory.set_len(1 << 20).unwrap();
    assert!(refused(vmm, &[], &bad).contains("memory file"));
    let other_kernel = scratch.path("other-vmlinux");
    std::fs::write(&other_kernel, b"not the kernel").unwrap();
    let err = refused(vmm, &["--kernel", other_kernel.to_str().unwrap()], &snap);
    assert!(err.contains("snapshot was taken with kernel"), "{err}");
    assert!(refused(vmm, &[], &scratch.path("nothing")).contains("state.bin"));
}
