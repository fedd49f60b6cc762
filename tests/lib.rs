//! Helpers for cocoon's end-to-end tests: find the built artifacts, decide whether a test that
//! needs KVM can run here, and run the VMM.
//!
//! Tests that need `/dev/kvm` fail when `CI=true` and it is missing; elsewhere they skip with a
//! message. `make test` builds the artifacts and points the tests at them through
//! `COCOON_KERNEL`, `COCOON_INITRD` and `COCOON_VMM`.

pub mod cocoon_cli;
pub mod guest;

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
        // COCOON_KEEP_SCRATCH=1 keeps console logs and sockets of a failed run for a look.
        if std::env::var_os("COCOON_KEEP_SCRATCH").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
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

/// Sends one request line to a `cocoon-vmm --api-sock` socket and returns its JSON reply.
pub fn api_ask(stream: &mut std::os::unix::net::UnixStream, request: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    writeln!(stream, "{request}").unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut reply)
        .unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} to {request}: {e}"))
}

/// Connects to a VMM's API socket once it exists (the VMM binds it before the guest runs).
pub fn api_connect(path: &Path, vm: &mut RunningVm) -> std::os::unix::net::UnixStream {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
            return stream;
        }
        vm.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "no API socket at {}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
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

/// Whether every one of `paths` exists; if not, says which are missing and that `make
/// make_target` builds them, and returns false outside CI, where the test skips, or panics in
/// CI, where that is a failure.
pub fn paths_present_or_skip(test: &str, paths: &[&Path], make_target: &str) -> bool {
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: missing {missing:?}, and CI=true requires this test"
    );
    eprintln!("SKIPPED {test}: missing {missing:?} (run `make {make_target}`, which builds it)");
    false
}

/// The built `cocoon`, the Debian test image archive (`make debian-image`) and the root
/// filesystem it was made from.
pub struct DebianInputs {
    pub cocoon: PathBuf,
    pub image: PathBuf,
    pub rootfs: PathBuf,
}

/// [`DebianInputs`] for a test that drives the engine binary `engine`, or `None` (after saying
/// why) when something is missing outside CI; in CI a missing one is a failure.
pub fn debian_inputs_or_skip(test: &str, engine: &str) -> Option<DebianInputs> {
    artifacts_or_skip(test)?;
    let inputs = DebianInputs {
        cocoon: from_env("COCOON_BIN", "target/release/cocoon"),
        image: from_env("COCOON_DEBIAN_OCI_IMAGE", "build/debian-oci.tar"),
        rootfs: from_env("COCOON_DEBIAN_ROOTFS", "build/debian/rootfs"),
    };
    let paths = [
        inputs.cocoon.as_path(),
        &inputs.image,
        &inputs.rootfs,
        Path::new(engine),
    ];
    paths_present_or_skip(test, &paths, "test").then_some(inputs)
}

/// Podman (Debian's 4.3, with conmon) with configuration and storage of its own under a
/// scratch directory and `runtime` as its default OCI runtime, named `cocoon`. Only what these
/// machines need differs from Podman's defaults (docs/podman.md), plus `netns = "none"` for the
/// suites that need no network (see [`Podman::networked`]), plus `containers_extra` lines in
/// `[containers]`. Dropping it removes its containers and storage.
pub struct Podman {
    pub conf: PathBuf,
    pub storage: PathBuf,
}

impl Podman {
    pub fn setup(scratch: &Scratch, runtime: &Path, containers_extra: &str) -> Podman {
        Podman::with_containers(
            scratch,
            runtime,
            &format!("netns = \"none\"\n{containers_extra}"),
        )
    }

    /// Podman with its default network (netavark's `podman` bridge, 10.88.0.0/16).
    pub fn networked(scratch: &Scratch, runtime: &Path) -> Podman {
        Podman::with_containers(scratch, runtime, "")
    }

    fn with_containers(scratch: &Scratch, runtime: &Path, containers: &str) -> Podman {
        let dir = &scratch.0;
        let conf = scratch.path("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\n{containers}\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{dir}/events.log\"\nruntime = \"cocoon\"\ntmp_dir = \"{dir}/tmp\"\n\
                 [engine.runtimes]\ncocoon = [\"{runtime}\"]\n",
                dir = dir.display(),
                runtime = runtime.display()
            ),
        )
        .unwrap();
        let storage = scratch.path("storage.conf");
        std::fs::write(
            &storage,
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{dir}/storage\"\nrunroot = \"{dir}/run\"\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        Podman { conf, storage }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &self.conf)
            .env("CONTAINERS_STORAGE_CONF", &self.storage)
            .args(args)
            .stdin(std::process::Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run podman")
    }

    /// Runs podman, fails the test unless it succeeds, and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Stop anything a failed assertion left running, then unmount podman's storage.
        let _ = self
            .command(&["rm", "--all", "--force", "--time", "0"])
            .output();
        let _ = self.command(&["system", "reset", "--force"]).output();
    }
}

/// A containerd (Debian's 1.6) of the test's own: root, state and socket in a scratch
/// directory, `ctr` pointed at it. Dropping it removes its tasks and containers and stops it.
pub struct Containerd {
    daemon: Option<std::process::Child>,
    pub address: PathBuf,
}

impl Containerd {
    pub fn start(scratch: &Scratch) -> Containerd {
        let dir = &scratch.0;
        let config = scratch.path("config.toml");
        let address = scratch.path("containerd.sock");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{dir}/root\"\nstate = \"{dir}/state\"\n[grpc]\n  address = \"{sock}\"\n",
                dir = dir.display(),
                sock = address.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(scratch.path("containerd.log")).unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let containerd = Containerd {
            daemon: Some(daemon),
            address,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        containerd
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.env("CONTAINERD_ADDRESS", &self.address)
            .args(args)
            .stdin(std::process::Stdio::null());
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run ctr")
    }

    /// Runs ctr, fails the test unless it succeeds, and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The status column of `ctr task ls` for `id` (empty when there is no such task).
    pub fn task_status(&self, id: &str) -> String {
        self.ok(&["task", "ls"])
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
            .unwrap_or_default()
    }

    /// Kills and deletes every task and container, then stops containerd and waits for it.
    pub fn shut_down(&mut self) {
        let Some(mut daemon) = self.daemon.take() else {
            return;
        };
        let ids = |what: &str| -> Vec<String> {
            self.ctr(&[what, "ls", "-q"])
                .stdout
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect()
        };
        for id in ids("task") {
            let _ = self.ctr(&["task", "kill", "-s", "KILL", &id]);
            let _ = self.ctr(&["task", "delete", "--force", &id]);
        }
        for id in ids("container") {
            let _ = self.ctr(&["container", "delete", &id]);
        }
        // SAFETY: SIGTERM to the containerd we started.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
        let _ = daemon.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Processes other than this one whose command line contains `needle`, as "PID: ARGS".
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let own = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == own {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            text.contains(needle)
                .then(|| format!("{pid}: {}", text.trim_end()))
        })
        .collect()
}

/// Debian's `docker` client, not whatever `docker` comes first on `PATH`: it matches the
/// daemon.
pub const DOCKER_CLIENT: &str = "/usr/bin/docker";
/// Debian's dockerd.
pub const DOCKER_DAEMON: &str = "/usr/sbin/dockerd";

/// A Docker daemon (Debian's 20.10) of the test's own: `data-root`, pid file, socket and
/// `daemon.json` in a scratch directory, the default exec root (so containers' state
/// directories are Docker's usual `/var/run/docker/runtime-runc/moby/<64 hex>/`), cgroupfs and
/// overlay2 (what works on these machines, docs/docker.md), no bridge or iptables (containers
/// run with `--network none`), and `cocoon` registered as runtime `cocoon` and made the
/// default. Dropping it removes its containers, stops it and unmounts what it left mounted.
pub struct Docker {
    daemon: Option<std::process::Child>,
    pub host: String,
    data_root: PathBuf,
    /// The bridge dockerd made (and leaves behind when it stops), for `networked`.
    bridge: Option<&'static str>,
}

/// The bridge of [`Docker::networked`]: Docker's default one, on a subnet of its own.
pub const DOCKER_BRIDGE: &str = "docker0";
pub const DOCKER_BRIDGE_ADDRESS: &str = "10.213.0.1/24";

impl Docker {
    pub fn start(scratch: &Scratch, cocoon: &Path) -> Docker {
        Docker::with_network(scratch, cocoon, false)
    }

    /// With Docker's default networking: the `docker0` bridge (on [`DOCKER_BRIDGE_ADDRESS`]),
    /// iptables rules and the userland proxy for `-p`, as a user's dockerd has them. Dropping
    /// it removes the bridge too.
    pub fn networked(scratch: &Scratch, cocoon: &Path) -> Docker {
        Docker::with_network(scratch, cocoon, true)
    }

    fn with_network(scratch: &Scratch, cocoon: &Path, network: bool) -> Docker {
        let data_root = scratch.path("data-root");
        let config = scratch.path("daemon.json");
        let mut daemon_json = serde_json::json!({
            "data-root": data_root,
            "pidfile": scratch.path("docker.pid"),
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "storage-driver": "overlay2",
            "bridge": "none",
            "iptables": false,
            "runtimes": {"cocoon": {"path": cocoon}},
            "default-runtime": "cocoon",
        });
        if network {
            let options = daemon_json.as_object_mut().unwrap();
            options.remove("bridge");
            options.remove("iptables");
            options.insert("bip".into(), DOCKER_BRIDGE_ADDRESS.into());
        }
        std::fs::write(&config, daemon_json.to_string()).unwrap();
        let host = format!("unix://{}", scratch.path("docker.sock").display());
        let log = std::fs::File::create(scratch.path("dockerd.log")).unwrap();
        let daemon = Command::new(DOCKER_DAEMON)
            .arg("--config-file")
            .arg(&config)
            .args(["-H", &host])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let mut docker = Docker {
            daemon: Some(daemon),
            host,
            data_root,
            bridge: network.then_some(DOCKER_BRIDGE),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !docker.run(&["version"]).status.success() {
            if let Some(daemon) = docker.daemon.as_mut()
                && let Ok(Some(status)) = daemon.try_wait()
            {
                panic!(
                    "dockerd exited ({status}): {}",
                    std::fs::read_to_string(scratch.path("dockerd.log")).unwrap_or_default()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dockerd did not come up: {}",
                std::fs::read_to_string(scratch.path("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        docker
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER_CLIENT);
        cmd.env("DOCKER_HOST", &self.host)
            .args(args)
            .stdin(std::process::Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run docker")
    }

    /// Runs docker, fails the test unless it succeeds, and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Removes every container, stops dockerd (it unmounts its layers on the way out), waits
    /// for it and unmounts whatever is still mounted under its data root.
    pub fn shut_down(&mut self) {
        let Some(mut daemon) = self.daemon.take() else {
            return;
        };
        let ids = String::from_utf8_lossy(&self.run(&["ps", "-aq"]).stdout).into_owned();
        for id in ids.split_whitespace() {
            let _ = self.run(&["rm", "--force", id]);
        }
        // SAFETY: SIGTERM to the dockerd we started.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while matches!(daemon.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = daemon.kill();
        let _ = daemon.wait();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(&self.data_root))
            .collect();
        // Deepest first.
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in under {
            let _ = Command::new("umount").args(["-l", mount]).status();
        }
        if let Some(bridge) = self.bridge.take() {
            let _ = Command::new("ip").args(["link", "del", bridge]).status();
        }
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Fetches `url` from the host (HTTP/1.0, any status line); the body, or why not.
pub fn http_get(host: &str, port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = format!("{host}:{port}");
    let mut stream = std::net::TcpStream::connect_timeout(
        &addr.parse().map_err(|e| format!("{addr}: {e}"))?,
        std::time::Duration::from_secs(5),
    )
    .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.contains(" 200 ") => Ok(body.to_owned()),
        _ => Err(response),
    }
}

/// [`http_get`] until it gives the page or `secs` have passed (a server still starting).
pub fn http_get_within(host: &str, port: u16, path: &str, secs: u64) -> Result<String, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match http_get(host, port, path) {
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

/// What an engine's network gives a container, checked as a user would: a busybox `httpd` in
/// container `web` (of `image`, run by `engine`, which gets docker/podman arguments and returns
/// stdout) with port `port` published to its 80. Its address must start with `subnet`; the
/// page is fetched from the host through the published port; inside, the address with
/// `/prefix`, the default route via `gateway` and a resolver; and a second container fetches
/// the page over the bridge. Leaves `web` running; returns its address.
pub fn check_published_web_server(
    engine: impl Fn(&[&str]) -> String,
    image: &str,
    port: u16,
    subnet: &str,
    prefix: u8,
    gateway: &str,
) -> String {
    let script = "mkdir -p /www && echo hello-from-cocoon > /www/index.html && \
                  { ip addr show eth0; ip route; cat /etc/resolv.conf; } > /www/net.txt && \
                  exec httpd -f -p 80 -h /www";
    let published = format!("{port}:80");
    engine(&[
        "run", "-d", "--name", "web", "-p", &published, image, "sh", "-c", script,
    ]);
    let address = engine(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}}",
        "web",
    ])
    .trim()
    .to_owned();
    assert!(address.starts_with(subnet), "{address:?}");

    // The published port, from the host.
    let page = http_get_within("127.0.0.1", port, "/", 120).unwrap_or_else(|e| {
        panic!(
            "port {port} did not answer: {e}\nlogs: {}",
            engine(&["logs", "web"])
        )
    });
    assert_eq!(page, "hello-from-cocoon\n");
    // Inside, the address, route and DNS the engine gave it.
    let net = http_get("127.0.0.1", port, "/net.txt").unwrap();
    assert!(net.contains(&format!("inet {address}/{prefix}")), "{net}");
    assert!(
        net.contains(&format!("default via {gateway} dev eth0")),
        "{net}"
    );
    assert!(net.contains("nameserver"), "{net}");

    // Another container reaches it over the bridge.
    let url = format!("http://{address}/");
    let fetched = engine(&["run", "--rm", image, "wget", "-q", "-O", "-", &url]);
    assert_eq!(fetched, "hello-from-cocoon\n");
    address
}

/// Checks that the VMM threads of process `pid` (vCPUs, the device thread, the supervisor)
/// run jailed: a seccomp filter, no_new_privs, no capabilities; and that its guest memory
/// (`guest_mib` MiB at least) is left out of core dumps. Threads named
/// otherwise belong to the embedder and are not checked.
pub fn assert_vmm_jailed(pid: u32, guest_mib: u64) {
    let field = |status: &str, name: &str| -> String {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut jailed = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VMM's threads") {
        let task = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        let comm = comm.trim().to_string();
        // The process's main thread is named after its binary (`cocoon-vmm`, `cocoon`).
        if !(comm.starts_with("cocoon-vcpu") || comm == "cocoon-devices" || comm == "cocoon-vm") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        assert_eq!(field(&status, "Seccomp"), "2", "{comm}: {status}");
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{comm}");
        assert_eq!(field(&status, "CapEff"), "0000000000000000", "{comm}");
        assert_eq!(field(&status, "CapPrm"), "0000000000000000", "{comm}");
        jailed.push(comm);
    }
    assert!(
        jailed.iter().any(|c| c.starts_with("cocoon-vcpu"))
            && jailed.iter().any(|c| c == "cocoon-vm"),
        "no jailed VMM threads in process {pid}: {jailed:?}"
    );
    // smaps: a "Size:" line per mapping, then its "VmFlags:" ("dd": do not dump). Guest
    // memory may be split in several mappings; together they hold at least `guest_mib`.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut size_kib = 0u64;
    let mut undumped_kib = 0u64;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            size_kib = size
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && flags.split_whitespace().any(|f| f == "dd")
        {
            undumped_kib += size_kib;
        }
    }
    assert!(
        undumped_kib >= guest_mib * 1024,
        "only {undumped_kib} KiB of process {pid} is left out of core dumps: guest memory is {guest_mib} MiB"
    );
}
