//! The `cocoon` CLI as the tests drive it: the binary, bundles of the busybox test image, and
//! verbs run the way an engine runs runc.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::in_ci;

pub fn cocoon_binary() -> Option<PathBuf> {
    let path = std::env::var_os("COCOON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/cocoon"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        !in_ci(),
        "{} is missing and CI=true requires the CLI tests",
        path.display()
    );
    eprintln!("SKIPPED: {} is missing (run `make test`)", path.display());
    None
}

pub fn busybox_dir() -> PathBuf {
    std::env::var_os("COCOON_BUSYBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/busybox-rootfs"))
}

pub struct Cocoon {
    pub bin: PathBuf,
    pub root: PathBuf,
    /// `COCOON_CONFIG` for every verb (None: the default configuration).
    pub config: Option<PathBuf>,
}

impl Cocoon {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root").arg(&self.root).args(args);
        if let Some(config) = &self.config {
            cmd.env("COCOON_CONFIG", config);
        }
        cmd
    }

    /// Runs a verb whose process may outlive it (`--detach`), with no stdio: the container
    /// inherits ours, as under runc, and reading our output to the end would wait for it.
    pub fn detached(&self, args: &[&str]) {
        let status = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run cocoon");
        assert!(status.success(), "cocoon {args:?} failed");
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run cocoon")
    }

    /// Runs a verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cocoon {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a verb that must fail with status 1; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "cocoon {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state is JSON")
    }

    pub fn containers(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A test that fails half-way must not leave its containers' VMs running: every container
/// still under the root is deleted with --force.
impl Drop for Cocoon {
    fn drop(&mut self) {
        for id in self.containers() {
            let _ = self
                .command(&["delete", "--force", &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A bundle running `args` in the busybox root filesystem.
pub fn bundle(dir: &Path, args: &[&str]) -> PathBuf {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/make-bundle.sh");
    let bin = cocoon_binary().unwrap();
    let status = Command::new(spec)
        .arg(&bin)
        .arg(dir)
        .arg(busybox_dir())
        .args(args)
        .status()
        .expect("make a bundle");
    assert!(status.success());
    dir.to_owned()
}
