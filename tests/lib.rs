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

/// The path in environment variable `var`, or `default` under the workspace.
pub fn from_env(var: &str, default: &str) -> PathBuf {
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
    /// The VMM command with the kernel and initramfs, run through `wrapper` (e.g. `ip netns
    /// exec NS`) when it is not empty.
    pub fn vmm_command(&self, wrapper: &[&str]) -> Command {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.vmm);
                cmd
            }
            None => Command::new(&self.vmm),
        };
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initrd);
        cmd
    }

    /// Runs the VMM with the kernel and initramfs plus `args`, and waits for it.
    pub fn run_vmm(&self, args: &[&str]) -> Output {
        self.vmm_command(&[])
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

/// Where [`pvh_elf`] loads its code and enters it.
pub const TINY_GUEST_ENTRY: u64 = 0x10_0000;

/// A minimal ELF "kernel" with a PVH entry note whose entry point runs `code` in 32-bit protected
/// mode at [`TINY_GUEST_ENTRY`]: for tests of how the VMM treats a guest that misbehaves at its
/// first instruction, in milliseconds instead of a whole kernel boot.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const NOTE_OFF: usize = EHDR + 2 * PHDR;
    const CODE_OFF: usize = 0x1000;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(TINY_GUEST_ENTRY as u32).to_le_bytes());

    let mut elf = vec![0u8; CODE_OFF + code.len()];
    elf[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut put = |off: usize, bytes: &[u8]| elf[off..off + bytes.len()].copy_from_slice(bytes);
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &0x3eu16.to_le_bytes()); // x86_64
    put(20, &1u32.to_le_bytes());
    put(24, &TINY_GUEST_ENTRY.to_le_bytes());
    put(32, &(EHDR as u64).to_le_bytes()); // e_phoff
    put(52, &(EHDR as u16).to_le_bytes());
    put(54, &(PHDR as u16).to_le_bytes());
    put(56, &2u16.to_le_bytes()); // e_phnum
    put(58, &64u16.to_le_bytes());
    // PT_LOAD of the code.
    let load = EHDR;
    put(load, &1u32.to_le_bytes());
    put(load + 4, &5u32.to_le_bytes());
    put(load + 8, &(CODE_OFF as u64).to_le_bytes());
    put(load + 16, &TINY_GUEST_ENTRY.to_le_bytes());
    put(load + 24, &TINY_GUEST_ENTRY.to_le_bytes());
    put(load + 32, &(code.len() as u64).to_le_bytes());
    put(load + 40, &(code.len() as u64).to_le_bytes());
    put(load + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE with the PVH entry.
    let pnote = EHDR + PHDR;
    put(pnote, &4u32.to_le_bytes());
    put(pnote + 4, &4u32.to_le_bytes());
    put(pnote + 8, &(NOTE_OFF as u64).to_le_bytes());
    put(pnote + 32, &(note.len() as u64).to_le_bytes());
    put(pnote + 40, &(note.len() as u64).to_le_bytes());
    put(pnote + 48, &4u64.to_le_bytes());
    put(NOTE_OFF, &note);
    put(CODE_OFF, code);
    elf
}

/// Runs `vmm` with `args`, with its output captured.
pub fn run(vmm: &Path, args: &[&str]) -> Output {
    Command::new(vmm)
        .args(args)
        .output()
        .expect("start cocoon-vmm")
}

/// The path of the built VMM binary, or `None` (after saying why) outside CI when it is missing.
pub fn vmm_or_skip(test: &str) -> Option<PathBuf> {
    let vmm = from_env("COCOON_VMM", "target/release/cocoon-vmm");
    if vmm.exists() {
        return Some(vmm);
    }
    let problem = format!(
        "{} is missing (run `make test`, which builds it)",
        vmm.display()
    );
    if in_ci() {
        panic!("{test}: {problem}");
    }
    eprintln!("SKIPPED {test}: {problem}");
    None
}

/// The test root filesystem image (`make rootfs`), or `None` after saying why the test skips.
pub fn rootfs_or_skip(test: &str) -> Option<PathBuf> {
    let image = from_env("COCOON_ROOTFS", "build/busybox.erofs");
    if image.exists() {
        return Some(image);
    }
    let problem = format!(
        "{} is missing (run `make test`, which builds it)",
        image.display()
    );
    if in_ci() {
        panic!("{test}: {problem}, and CI=true requires this test to run");
    }
    eprintln!("SKIPPED {test}: {problem}");
    None
}

/// A VMM process, killed and reaped when dropped.
pub struct RunningVm {
    pub child: std::process::Child,
}

impl RunningVm {
    /// Fails the test if the VMM has already exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the VMM exited early: {status}");
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the engine tests need: the built `cocoon` and the busybox OCI image archive, plus the
/// engine's own `binary`. Returns the first two, or `None` (after saying why) when something is
/// missing outside CI; in CI a missing one is a failure.
pub fn engine_inputs_or_skip(test: &str, binary: &str) -> Option<(PathBuf, PathBuf)> {
    artifacts_or_skip(test)?;
    let cocoon = from_env("COCOON_BIN", "target/release/cocoon");
    let image = from_env("COCOON_OCI_IMAGE", "build/busybox-oci.tar");
    let missing: Vec<String> = [cocoon.as_path(), image.as_path(), Path::new(binary)]
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some((cocoon, image));
    }
    assert!(
        !in_ci(),
        "{test}: missing {missing:?}, and CI=true requires this test"
    );
    eprintln!("SKIPPED {test}: missing {missing:?} (run `make test`)");
    None
}
