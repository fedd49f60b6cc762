//! Helpers for cocoon's end-to-end tests: find the built artifacts, decide whether a test that
//! needs KVM can run here, and run the VMM.
//!
//! Tests that need `/dev/kvm` fail when `CI=true` and it is missing; elsewhere they skip with a
//! message. `make test` builds the artifacts and points the tests at them through
//! `COCOON_KERNEL`, `COCOON_INITRD` and `COCOON_VMM`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// Booting a guest takes both cores of our machines for ~30 s: one VM at a time.
pub static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The built kernel, initramfs and VMM binary.
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vmm: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(default))
}

/// Whether the run must fail instead of skipping when something is missing.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Returns the artifacts, or `None` (after saying why) when the test must be skipped. Panics
/// in CI, where a missing `/dev/kvm` or artifact is a failure.
pub fn artifacts_or_skip(test: &str) -> Option<Artifacts> {
    let artifacts = Artifacts {
        kernel: from_env("COCOON_KERNEL", "build/vmlinux"),
        initrd: from_env("COCOON_INITRD", "build/initramfs.cpio"),
        vmm: from_env("COCOON_VMM", "target/release/cocoon-vmm"),
    };
    let problem = if !Path::new("/dev/kvm").exists() {
        Some("/dev/kvm is missing".to_owned())
    } else {
        [&artifacts.kernel, &artifacts.initrd, &artifacts.vmm]
            .iter()
            .find(|p| !p.exists())
            .map(|p| {
                format!(
                    "{} is missing (run `make test`, which builds it)",
                    p.display()
                )
            })
    };
    match problem {
        None => Some(artifacts),
        Some(problem) if in_ci() => {
            panic!("{test}: {problem}, and CI=true requires this test to run")
        }
        Some(problem) => {
            eprintln!("SKIPPED {test}: {problem}");
            None
        }
    }
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cocoon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Artifacts {
    /// Runs the VMM with the kernel and initramfs plus `args`, and waits for it.
    pub fn run_vmm(&self, args: &[&str]) -> Output {
        Command::new(&self.vmm)
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initrd)
            .args(args)
            .output()
            .expect("start cocoon-vmm")
    }
}

/// Deterministic bytes that are not a repeating pattern (xorshift64).
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
