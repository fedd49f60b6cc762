//! cocoon on a loaded host: containers started together all come up (slower, never failed
//! by a wall clock), a start beyond the host's admission limit waits its turn, and a guest
//! that is truly stuck (idle, or spinning) still ends with a clear error and leaves nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cocoon_tests::cocoon_cli::{Cocoon, bundle, busybox_dir, cocoon_binary};
use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip, processes_mentioning};

const ADMISSION_DIR: &str = cocoon_runtime::admission::ADMISSION_DIR;

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Tickets of VM starts left in the host-wide admission directory.
fn admission_tickets() -> Vec<String> {
    std::fs::read_dir(ADMISSION_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ticket"))
        .collect()
}

fn assert_nothing_left(cocoon: &Cocoon, scratch: &Scratch) {
    assert!(cocoon.containers().is_empty(), "{:?}", cocoon.containers());
    let left = processes_mentioning(&scratch.0.to_string_lossy());
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(admission_tickets().is_empty(), "{:?}", admission_tickets());
}

/// Four `cocoon run`s at once, from the template, beside a running container, on a host whose
/// admission lets one vCPU start per core: each prints its own line and exits with its own
/// code, some waited for a turn, and nothing is left after `delete`.
#[test]
fn four_runs_at_once_all_succeed() {
    let Some(_artifacts) = artifacts_or_skip("four runs at once") else {
        return;
    };
    let Some(bin) = cocoon_binary() else {
        return;
    };
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = Scratch::new("load");
    let config = scratch.path("config.toml");
    std::fs::write(&config, "admission_vcpus_per_core = 1\n").unwrap();
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: Some(config),
    };
    let sleeper = bundle(&scratch.path("sleeper"), &["sleep", "600"]);
    cocoon.detached(&[
        "run",
        "--detach",
        "--bundle",
        sleeper.to_str().unwrap(),
        "beside",
    ]);
    let codes = [0, 3, 7, 42];
    let bundles: Vec<PathBuf> = codes
        .iter()
        .map(|code| {
            let script = format!("echo run-{code}; exit {code}");
            bundle(&scratch.path(&format!("b{code}")), &["sh", "-c", &script])
        })
        .collect();
    let logs: Vec<PathBuf> = codes
        .iter()
        .map(|code| scratch.path(&format!("run-{code}.log")))
        .collect();
    let outputs: Vec<Output> = std::thread::scope(|s| {
        let runs: Vec<_> = codes
            .iter()
            .zip(&bundles)
            .zip(&logs)
            .map(|((code, b), log)| {
                let cocoon = &cocoon;
                s.spawn(move || {
                    let id = format!("run-{code}");
                    cocoon.run(&[
                        "--debug",
                        "--log",
                        log.to_str().unwrap(),
                        "run",
                        "--bundle",
                        b.to_str().unwrap(),
                        &id,
                    ])
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for ((code, out), log) in codes.iter().zip(&outputs).zip(&logs) {
        assert_eq!(
            out.status.code(),
            Some(*code),
            "run-{code}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            log_of(log)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("run-{code}\n")
        );
    }
    let waited = logs
        .iter()
        .filter(|log| log_of(log).contains("waiting for a turn"))
        .count();
    // One vCPU may start per core: on a host with fewer cores than runs, some must wait.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < codes.len() {
        assert!(
            waited >= 1,
            "four 1-vCPU starts on a host that admits {cores} at once: some wait"
        );
    }
    for code in codes {
        cocoon.ok(&["delete", &format!("run-{code}")]);
    }
    cocoon.ok(&["delete", "--force", "beside"]);
    assert_nothing_left(&cocoon, &scratch);
}

/// An initramfs whose /init is busybox running `script` instead of the agent.
fn initramfs(dir: &Path, script: &str) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy(busybox_dir().join("bin/busybox"), tree.join("bin/busybox")).unwrap();
    std::fs::write(tree.join("init"), format!("#!/bin/busybox sh\n{script}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cpio = dir.join("initramfs.cpio");
    let made = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            tree.display(),
            cpio.display()
        ))
        .status()
        .unwrap();
    assert!(made.success());
    cpio
}

/// `cocoon run` of a container whose guest never starts its agent: it fails, saying why, and
/// leaves no container, VM or admission ticket behind.
fn run_stuck(cocoon: &Cocoon, scratch: &Scratch, name: &str, script: &str) -> String {
    let initrd = initramfs(&scratch.path(name), script);
    let b = bundle(&scratch.path(&format!("{name}-bundle")), &["true"]);
    let out = cocoon
        .command(&[
            "run",
            "--no-template",
            "--bundle",
            b.to_str().unwrap(),
            name,
        ])
        .env("COCOON_INITRD", &initrd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert_nothing_left(cocoon, scratch);
    stderr
}

/// A guest that halts (its /init sleeps) ends after the idle limit; one that spins (its /init
/// loops) ends at the CPU budget. Neither is judged by the wall clock.
#[test]
fn a_stuck_guest_ends_with_a_clear_error_and_leaves_nothing() {
    let Some(_artifacts) = artifacts_or_skip("stuck guests") else {
        return;
    };
    let Some(bin) = cocoon_binary() else {
        return;
    };
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = Scratch::new("stuck");
    let config = scratch.path("config.toml");
    std::fs::write(
        &config,
        "guest_idle_secs = 10\nguest_cpu_budget_secs = 90\n",
    )
    .unwrap();
    let cocoon = Cocoon {
        bin,
        root: scratch.path("root"),
        config: Some(config),
    };
    let idle = run_stuck(&cocoon, &scratch, "idle", "exec /bin/busybox sleep 100000");
    assert!(
        idle.contains("the guest agent did not answer: the guest did nothing for")
            && idle.contains("guest_idle_secs = 10"),
        "{idle}"
    );
    let spinning = run_stuck(&cocoon, &scratch, "spin", "while :; do :; done");
    assert!(
        spinning.contains("the guest agent did not answer: its vCPUs ran for")
            && spinning.contains("guest_cpu_budget_secs = 90"),
        "{spinning}"
    );
}
