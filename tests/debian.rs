//! The Debian test image (images/build-debian-*.sh: bookworm minbase, then python3-minimal and
//! nginx-light in a second layer) under Podman and under containerd, each container in a
//! microVM. A boot of this image costs 30-100 s on our machines, so each engine boots one
//! long-lived container and execs every check into it. A failed check does not stop the others:
//! the test reports each one and fails at the end with all that failed.
//!
//! Identities are checked against the specs the runtime was given: the container's config.json
//! and, for an exec, the process spec the engine handed over, which a wrapper around the runtime
//! keeps a copy of (engines delete it as soon as the exec has started). containerd 1.6's `ctr run`
//! has no flag for the container's user, so only Podman's container runs as non-root; under both
//! engines an exec runs as non-root.
//!
//! `COCOON_TEST_RUNTIME=/usr/sbin/runc` runs the same checks with runc in cocoon's place, which
//! checks the checks.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cocoon_tests::{
    Containerd, ONE_VM_AT_A_TIME, Podman, Scratch, debian_inputs_or_skip, processes_mentioning,
};
use serde_json::Value;

const PODMAN_IMAGE: &str = "localhost/cocoon-debian:latest";
const CTR_IMAGE: &str = "cocoon/debian:latest";

/// Directories of the image whose listings must match between host and guest: setuid and setgid
/// binaries, hard links (perl, gzip), symlinks (alternatives, nginx's sites-enabled), files of
/// group shadow, and the files images/build-debian-rootfs.sh adds for this test.
const LISTED: [&str; 5] = [
    "/usr/bin",
    "/usr/sbin",
    "/etc",
    "/srv/cocoon-test",
    "/var/www",
];

/// Lists ROOT's directories DIR... one entry a line: path, mode (with setuid, setgid and sticky
/// bits), owner, and per type the size, the link count, the first name of the same inode and
/// a hash of the contents of small files (the guest reads its disks at some hundred KB/s on our
/// machines: all of /usr/bin would take minutes), or the symlink's target; then every extended
/// attribute. Runs on the host's python3 and on the image's python3-minimal (no json module).
const LISTING: &str = r#"
import hashlib, os, stat, sys

# The engines write these or mount over them: they are not the image's any more.
ENGINE_FILES = {
    "etc/group", "etc/hostname", "etc/hosts", "etc/mtab", "etc/passwd", "etc/resolv.conf",
}

def describe(root, rel, first_name):
    path = os.path.join(root, rel)
    st = os.lstat(path)
    fields = [rel, oct(stat.S_IMODE(st.st_mode)), f"{st.st_uid}:{st.st_gid}"]
    if stat.S_ISREG(st.st_mode):
        fields += ["file", str(st.st_size), f"links={st.st_nlink}"]
        if st.st_size <= 16384:
            with open(path, "rb") as f:
                fields.append(hashlib.sha256(f.read()).hexdigest()[:16])
        first = first_name.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            fields.append(f"same-inode-as={first}")
    elif stat.S_ISLNK(st.st_mode):
        fields += ["symlink", os.readlink(path)]
    elif stat.S_ISDIR(st.st_mode):
        # A directory's link count counts subdirectories, which overlayfs does not keep.
        fields += ["dir"]
    else:
        fields += ["special", oct(stat.S_IFMT(st.st_mode)), str(st.st_rdev)]
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        value = os.getxattr(path, name, follow_symlinks=False)
        fields.append(f"xattr:{name}={value.hex()}")
    return " ".join(fields)

root, tops = sys.argv[1], sys.argv[2:]
first_name = {}
for top in tops:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top.strip("/"))):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        print(describe(root, rel_dir, first_name))
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames + links):
            rel = os.path.join(rel_dir, name)
            if rel not in ENGINE_FILES:
                print(describe(root, rel, first_name))
"#;

/// One python3 process: a server on 127.0.0.1 echoes 1 MiB back to a client.
const ROUND_TRIP: &str = r#"
import socket, sys, threading

payload = bytes(range(256)) * 4096
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("127.0.0.1", 0))
server.listen(1)

def echo():
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

def send(client):
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)

echoer = threading.Thread(target=echo)
echoer.start()
with socket.create_connection(server.getsockname(), timeout=30) as client:
    sender = threading.Thread(target=send, args=(client,))
    sender.start()
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    sender.join()
echoer.join()
v = sys.version_info
print(f"python {v[0]}.{v[1]}: {len(received)} bytes echoed over 127.0.0.1, intact: {received == payload}")
"#;
const ROUND_TRIP_OUTPUT: &str = "python 3.11: 1048576 bytes echoed over 127.0.0.1, intact: True\n";

/// HTTP GET / from port 80 of the address in argv[1]: the body on stdout, the status line on
/// stderr, exit status 1 unless it is 200. The image has neither curl nor wget.
const FETCH: &str = r#"
import socket, sys

host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(30)
    s.connect((host, 80))
    s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
    response = b""
    while chunk := s.recv(65536):
        response += chunk
head, _, body = response.partition(b"\r\n\r\n")
status = head.split(b"\r\n")[0].decode()
print(status, file=sys.stderr)
if status.split()[1:2] != ["200"]:
    sys.exit(1)
sys.stdout.buffer.write(body)
"#;

/// Identity of process $1 (a pid, or `self`: the grep reading it). Which id the exec'd shell
/// has, and what the kernel says of the process.
const IDENTITY: &str = r#"printf 'id %s %s %s\n' "$(id -u)" "$(id -g)" "$(id -G)"
printf 'last_cap %s\n' "$(cat /proc/sys/kernel/cap_last_cap)"
printf 'cmdline %s\n' "$(tr '\0' ' ' < "/proc/$1/cmdline")"
grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapBnd):' "/proc/$1/status""#;

/// Linux capability names by number (capability.h), up to the last one Linux 6.1 knows.
const CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// What the guest's files are compared with: the image's stage-2 root filesystem on the host.
struct Host {
    listing: String,
    index_html: Vec<u8>,
}

impl Host {
    fn read(rootfs: &Path) -> Host {
        let out = Command::new("python3")
            .args(["-c", LISTING])
            .arg(rootfs)
            .args(LISTED)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "listing {}: {}",
            rootfs.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).expect("listing is UTF-8");
        // The comparison proves something only if the image has each kind of thing in it.
        for (what, needle) in [
            ("a setuid binary", " 0o4755 0:0 file "),
            ("a hard link", " same-inode-as="),
            ("a symlink", " symlink "),
            ("an extended attribute", " xattr:user.cocoon="),
            (
                "a file of a user the image does not name",
                " 1000:2000 file ",
            ),
        ] {
            assert!(
                listing.contains(needle),
                "the image's {LISTED:?} have no {what} ({needle:?}) to compare"
            );
        }
        let index_html = std::fs::read(rootfs.join("var/www/html/index.nginx-debian.html"))
            .expect("read the image's index.nginx-debian.html");
        Host {
            listing,
            index_html,
        }
    }
}

/// The OCI runtime the engines drive: a wrapper that keeps a copy of every exec's process spec
/// and gives cocoon a layer cache in the scratch directory (the test's image layers are its
/// own, and would otherwise stay in the machine's cache), then becomes cocoon, or the runtime
/// in COCOON_TEST_RUNTIME.
struct Runtime {
    wrapper: PathBuf,
    specs: PathBuf,
    is_cocoon: bool,
}

impl Runtime {
    fn new(scratch: &Scratch, cocoon: &Path) -> Runtime {
        let other = std::env::var_os("COCOON_TEST_RUNTIME").map(PathBuf::from);
        let is_cocoon = other.is_none();
        let real = other.unwrap_or_else(|| cocoon.to_owned());
        let specs = scratch.path("exec-specs");
        std::fs::create_dir_all(&specs).unwrap();
        let config = scratch.path("cocoon.toml");
        std::fs::write(
            &config,
            format!("layer_cache = \"{}\"\n", scratch.path("layers").display()),
        )
        .unwrap();
        let wrapper = scratch.path("runtime");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n\
                 take=\n\
                 for arg in \"$@\"; do\n\
                 \x20   [ -n \"$take\" ] && cp \"$arg\" \"{specs}/$(date +%s%N).json\"\n\
                 \x20   take=\n\
                 \x20   [ \"$arg\" = --process ] && take=1\n\
                 done\n\
                 COCOON_CONFIG={config} exec {real} \"$@\"\n",
                specs = specs.display(),
                config = config.display(),
                real = real.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        if !is_cocoon {
            eprintln!(
                "debian: running the checks with {} instead of cocoon",
                real.display()
            );
        }
        Runtime {
            wrapper,
            specs,
            is_cocoon,
        }
    }

    /// Podman's `[containers]` lines this runtime needs.
    fn podman_settings(&self) -> &'static str {
        if self.is_cocoon {
            // The guest applies rlimits; Podman's defaults are fine there.
            ""
        } else {
            // A host runtime sets rlimits on the host, where root lacks CAP_SYS_RESOURCE:
            // Podman's defaults exceed the hard limits.
            "default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]"
        }
    }

    fn forget_exec_specs(&self) {
        for entry in std::fs::read_dir(&self.specs).unwrap().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }

    /// The process spec of the one exec since [`Runtime::forget_exec_specs`].
    fn exec_spec(&self) -> Result<Value, String> {
        let files: Vec<PathBuf> = std::fs::read_dir(&self.specs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        let [file] = files.as_slice() else {
            return Err(format!("expected one exec process spec, found {files:?}"));
        };
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))
    }
}

/// How long one exec may take: a hung one fails its check, not the whole run.
const EXEC_LIMIT: Duration = Duration::from_secs(240);

/// Runs `cmd` with its output captured, killed after `limit`.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn an engine command");
    let collect = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = tx.send(bytes);
        });
        rx
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for an engine command") {
            break status;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for an engine command");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // A process the command started may hold its pipes open: wait for their end only so long.
    let wait = Duration::from_secs(if timed_out { 5 } else { 60 });
    let mut stderr = stderr.recv_timeout(wait).unwrap_or_default();
    if timed_out {
        stderr.extend(format!("\n(killed after {} s)", limit.as_secs()).bytes());
    }
    Output {
        status,
        stdout: stdout.recv_timeout(wait).unwrap_or_default(),
        stderr,
    }
}

/// One long-lived container of an engine.
trait Container {
    /// Runs `args` in the container as `user` (the container's own when `None`).
    fn exec(&self, user: Option<&str>, args: &[&str]) -> Output;
    /// The `process` object of the container's spec.
    fn process_spec(&self) -> Result<Value, String>;
}

struct PodmanContainer<'a> {
    podman: &'a Podman,
    name: &'static str,
}

impl Container for PodmanContainer<'_> {
    fn exec(&self, user: Option<&str>, args: &[&str]) -> Output {
        let mut all = vec!["exec"];
        if let Some(user) = user {
            all.extend(["--user", user]);
        }
        all.push(self.name);
        all.extend(args);
        output_within(self.podman.command(&all), EXEC_LIMIT)
    }

    fn process_spec(&self) -> Result<Value, String> {
        let path = self
            .podman
            .ok(&["inspect", "--format", "{{.OCIConfigPath}}", self.name]);
        let text = std::fs::read_to_string(path.trim()).map_err(|e| format!("{path}: {e}"))?;
        let spec: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        Ok(spec["process"].clone())
    }
}

struct CtrContainer<'a> {
    containerd: &'a Containerd,
    id: String,
    execs: Cell<u32>,
}

impl Container for CtrContainer<'_> {
    fn exec(&self, user: Option<&str>, args: &[&str]) -> Output {
        self.execs.set(self.execs.get() + 1);
        let exec_id = format!("e{}", self.execs.get());
        let mut all = vec!["task", "exec", "--exec-id", &exec_id];
        if let Some(user) = user {
            all.extend(["--user", user]);
        }
        all.push(&self.id);
        all.extend(args);
        output_within(self.containerd.command(&all), EXEC_LIMIT)
    }

    fn process_spec(&self) -> Result<Value, String> {
        let info = self.containerd.ok(&["container", "info", &self.id]);
        let info: Value = serde_json::from_str(&info).map_err(|e| e.to_string())?;
        Ok(info["Spec"]["process"].clone())
    }
}

/// Runs checks, reports each as it ends, and fails the test at the end if any failed.
struct Checks {
    engine: &'static str,
    failed: Vec<String>,
    passed: usize,
}

impl Checks {
    fn new(engine: &'static str) -> Checks {
        Checks {
            engine,
            failed: Vec::new(),
            passed: 0,
        }
    }

    fn check(&mut self, name: &str, check: impl FnOnce() -> Result<(), String>) {
        let start = Instant::now();
        let result = check();
        let took = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                eprintln!("{}: ok     {name} ({took:.1} s)", self.engine);
                self.passed += 1;
            }
            Err(why) => {
                eprintln!("{}: FAILED {name} ({took:.1} s)\n    {why}", self.engine);
                self.failed.push(format!("{name}: {why}"));
            }
        }
    }

    fn finish(self) {
        eprintln!(
            "{}: {} passed, {} failed",
            self.engine,
            self.passed,
            self.failed.len()
        );
        assert!(
            self.failed.is_empty(),
            "{}: {} of {} checks failed:\n{}",
            self.engine,
            self.failed.len(),
            self.failed.len() + self.passed,
            self.failed.join("\n")
        );
    }
}

/// The output of a command that must succeed, or why it did not.
fn succeeded(what: &str, out: Output) -> Result<Vec<u8>, String> {
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(600)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!("{what}: {}: {}", out.status, tail.trim()))
}

/// The capabilities of `set` in a spec's `process`, as a mask of the ones in `known`.
fn cap_mask(process: &Value, set: &str, known: u64) -> Result<u64, String> {
    let mut mask = 0u64;
    for name in process["capabilities"][set]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = name.as_str().ok_or("a capability that is not a string")?;
        let bit = CAPS
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("unknown capability {name}"))?;
        mask |= 1 << bit;
    }
    Ok(mask & known)
}

/// Compares what IDENTITY printed with what `process` (a spec's `process` object) implies for a
/// process that the runtime started and that exec'd files without file capabilities since:
/// execve gives root its inheritable and bounding sets and leaves anyone else only the ambient
/// one. `own_id`: whether the `id` line is of the same process (not so for pid 1).
fn compare_identity(output: &str, process: &Value, own_id: bool) -> Result<(), String> {
    let fields: HashMap<&str, &str> = output
        .lines()
        .filter_map(|l| l.split_once([' ', ':']))
        .map(|(k, v)| (k, v.trim()))
        .collect();
    let field = |name: &str| {
        fields
            .get(name)
            .copied()
            .ok_or_else(|| format!("no {name} in {output:?}"))
    };
    let user = &process["user"];
    let uid = user["uid"].as_u64().ok_or("the spec has no user.uid")?;
    let gid = user["gid"].as_u64().ok_or("the spec has no user.gid")?;
    let mut groups: Vec<u64> = user["additionalGids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    groups.sort_unstable();
    let numbers = |text: &str| -> Vec<u64> {
        text.split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect()
    };

    let last_cap: u32 = field("last_cap")?
        .parse()
        .map_err(|e| format!("cap_last_cap: {e}"))?;
    let known = if last_cap >= 63 {
        u64::MAX
    } else {
        (1u64 << (last_cap + 1)) - 1
    };
    let bounding = cap_mask(process, "bounding", known)?;
    let inheritable = cap_mask(process, "inheritable", known)?;
    let ambient =
        cap_mask(process, "ambient", known)? & inheritable & cap_mask(process, "permitted", known)?;
    let permitted = if uid == 0 {
        inheritable | bounding | ambient
    } else {
        ambient
    };

    let mut wrong = Vec::new();
    let mut kernel_groups = numbers(fields.get("Groups").copied().unwrap_or(""));
    kernel_groups.sort_unstable();
    differ(&mut wrong, "Uid", numbers(field("Uid")?), vec![uid; 4]);
    differ(&mut wrong, "Gid", numbers(field("Gid")?), vec![gid; 4]);
    differ(&mut wrong, "Groups", kernel_groups, groups.clone());
    let hex = |mask: u64| format!("{mask:016x}");
    differ(
        &mut wrong,
        "CapPrm",
        field("CapPrm")?.to_owned(),
        hex(permitted),
    );
    differ(
        &mut wrong,
        "CapEff",
        field("CapEff")?.to_owned(),
        hex(permitted),
    );
    differ(
        &mut wrong,
        "CapBnd",
        field("CapBnd")?.to_owned(),
        hex(bounding),
    );
    if own_id {
        let id = numbers(field("id")?);
        let mut want_groups: BTreeSet<u64> = groups.into_iter().collect();
        want_groups.insert(gid);
        differ(&mut wrong, "id -u", id.first().copied(), Some(uid));
        differ(&mut wrong, "id -g", id.get(1).copied(), Some(gid));
        differ(
            &mut wrong,
            "id -G",
            id.iter().skip(2).copied().collect(),
            want_groups,
        );
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

fn differ<T: PartialEq + std::fmt::Debug>(wrong: &mut Vec<String>, what: &str, got: T, want: T) {
    if got != want {
        wrong.push(format!("{what}: got {got:?}, the spec implies {want:?}"));
    }
}

/// Compares the guest's listing with the host's, entry by entry.
fn compare_listing(host: &str, guest: &str) -> Result<(), String> {
    let by_path = |text: &str| -> BTreeMap<String, String> {
        text.lines()
            .map(|l| (l.split(' ').next().unwrap_or("").to_owned(), l.to_owned()))
            .collect()
    };
    let (host, guest) = (by_path(host), by_path(guest));
    let paths: BTreeSet<&String> = host.keys().chain(guest.keys()).collect();
    let differences: Vec<String> = paths
        .into_iter()
        .filter(|p| host.get(*p) != guest.get(*p))
        .map(|p| {
            format!(
                "\n      host:  {}\n      guest: {}",
                host.get(p).map_or("(none)", String::as_str),
                guest.get(p).map_or("(none)", String::as_str)
            )
        })
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} of {} entries differ; the first ones:{}",
        differences.len(),
        host.len(),
        differences[..differences.len().min(12)].concat()
    ))
}

/// The checks both engines run in their container. `root` is how to exec as root; `users` the
/// exec users whose identity is checked (`None`: the container's own).
fn container_checks(
    checks: &mut Checks,
    container: &dyn Container,
    runtime: &Runtime,
    host: &Host,
    root: Option<&str>,
    users: &[Option<&str>],
) {
    checks.check(
        "python3 runs a script: 1 MiB echoed over 127.0.0.1 in one process",
        || {
            let out = succeeded(
                "python3",
                container.exec(None, &["python3", "-c", ROUND_TRIP]),
            )?;
            let out = String::from_utf8_lossy(&out);
            (out == ROUND_TRIP_OUTPUT)
                .then_some(())
                .ok_or(format!("printed {out:?}"))
        },
    );
    checks.check(
        "nginx starts with Debian's default site (port 80 and [::]:80)",
        || succeeded("nginx", container.exec(root, &["nginx"])).map(drop),
    );
    for address in ["127.0.0.1", "::1"] {
        checks.check(
            &format!("GET / from nginx over {address} is index.nginx-debian.html"),
            || {
                let body = succeeded(
                    "the GET",
                    container.exec(None, &["python3", "-c", FETCH, address]),
                )?;
                (body == host.index_html).then_some(()).ok_or(format!(
                    "got {} bytes that are not the image's {} bytes: {:?}",
                    body.len(),
                    host.index_html.len(),
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ))
            },
        );
    }
    checks.check(
        "the container's process (pid 1): ids, groups and capabilities as its spec implies",
        || {
            let out = succeeded(
                "identity of pid 1",
                container.exec(root, &["sh", "-c", IDENTITY, "sh", "1"]),
            )?;
            let out = String::from_utf8_lossy(&out);
            if !out.contains("\ncmdline sleep 1000 \n") {
                return Err(format!(
                    "pid 1 is not the container's `sleep 1000`: {out:?}"
                ));
            }
            compare_identity(&out, &container.process_spec()?, false)
        },
    );
    for user in users {
        let name = match user {
            Some(user) => format!("exec --user {user}"),
            None => "exec as the container's user".to_owned(),
        };
        checks.check(
            &format!("{name}: id and /proc/self/status as its process spec implies"),
            || {
                runtime.forget_exec_specs();
                let out = succeeded(
                    &name,
                    container.exec(*user, &["sh", "-c", IDENTITY, "sh", "self"]),
                )?;
                compare_identity(&String::from_utf8_lossy(&out), &runtime.exec_spec()?, true)
            },
        );
    }
    checks.check(
        "the image's owners, modes, setuid bits, hard links, symlinks and xattrs in the guest",
        || {
            let mut args = vec!["python3", "-c", LISTING, "/"];
            args.extend(LISTED);
            let guest = succeeded("the listing", container.exec(root, &args))?;
            compare_listing(&host.listing, &String::from_utf8_lossy(&guest))
        },
    );
}

/// Waits up to 30 s for every process that mentions `needle` to be gone.
fn no_processes_mentioning(needle: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("still running: {left:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn no_state_dirs(dirs: &[PathBuf]) -> Result<(), String> {
    let left: Vec<&PathBuf> = dirs.iter().filter(|d| d.exists()).collect();
    left.is_empty()
        .then_some(())
        .ok_or(format!("state left behind: {left:?}"))
}

#[test]
fn debian_image_under_podman() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(inputs) = debian_inputs_or_skip("debian-podman", "/usr/bin/podman") else {
        return;
    };
    let host = Host::read(&inputs.rootfs);
    let scratch = Scratch::new("debian-podman");
    let runtime = Runtime::new(&scratch, &inputs.cocoon);
    let podman = Podman::setup(&scratch, &runtime.wrapper, runtime.podman_settings());
    podman.ok(&["load", "-i", inputs.image.to_str().unwrap()]);
    let layers = podman.ok(&[
        "image",
        "inspect",
        "--format",
        "{{len .RootFS.Layers}}",
        PODMAN_IMAGE,
    ]);
    assert!(
        layers.trim().parse::<u32>().unwrap() >= 2,
        "layers: {layers}"
    );

    let mut checks = Checks::new("debian-podman");
    let started = Instant::now();
    // A volume the non-root user may write to.
    let vol = scratch.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::os::unix::fs::chown(&vol, Some(1000), Some(1000)).unwrap();
    let volume = format!("{}:/data", vol.display());
    // Non-root, with groups of its own; the checks that need root exec as root.
    podman.ok(&[
        "run",
        "-d",
        "--name",
        "deb",
        "--user",
        "1000:1000",
        "--group-add",
        "2000",
        "--group-add",
        "3000",
        "-v",
        &volume,
        PODMAN_IMAGE,
        "sleep",
        "1000",
    ]);
    eprintln!(
        "debian-podman: container up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let id = podman
        .ok(&["inspect", "--format", "{{.Id}}", "deb"])
        .trim()
        .to_owned();
    let container = PodmanContainer {
        podman: &podman,
        name: "deb",
    };
    container_checks(
        &mut checks,
        &container,
        &runtime,
        &host,
        Some("0:0"),
        &[None, Some("1000:1000"), Some("0:0")],
    );

    checks.check(
        "the non-root user's writes to a volume are on the host, as its own",
        || {
            let script = "echo written-by-$(id -u) > /data/note && python3 -c \
                      'import os; print(open(\"/data/from-host\").read(), end=\"\")'";
            std::fs::write(vol.join("from-host"), "host-says-hi\n").map_err(|e| e.to_string())?;
            let out = succeeded(
                "the volume write",
                container.exec(None, &["sh", "-c", script]),
            )?;
            let note = vol.join("note");
            let meta = std::fs::metadata(&note).map_err(|e| format!("{}: {e}", note.display()))?;
            let text = std::fs::read_to_string(&note).map_err(|e| e.to_string())?;
            use std::os::unix::fs::MetadataExt;
            if (meta.uid(), meta.gid()) != (1000, 1000) || text != "written-by-1000\n" {
                return Err(format!("{}:{} {text:?}", meta.uid(), meta.gid()));
            }
            let out = String::from_utf8_lossy(&out);
            (out == "host-says-hi\n")
                .then_some(())
                .ok_or(format!("read {out:?}"))
        },
    );
    checks.check("podman rm --force --time 0", || {
        succeeded(
            "podman rm",
            podman.run(&["rm", "--force", "--time", "0", "deb"]),
        )
        .map(drop)
    });
    // Podman gives up on a container whose process does not die within seconds: once it has,
    // a second rm removes what is left.
    if !podman.ok(&["ps", "-aq"]).trim().is_empty() {
        let _ = no_processes_mentioning(&id);
        let _ = podman.run(&["rm", "--force", "--time", "0", "deb"]);
    }
    checks.check(
        "nothing left behind: no container, no process, no runtime state",
        || {
            let ps = podman.ok(&["ps", "-aq"]);
            if !ps.trim().is_empty() {
                return Err(format!("containers: {ps}"));
            }
            no_processes_mentioning(&id)?;
            no_state_dirs(&[
                Path::new("/run/cocoon").join(&id),
                Path::new("/run/runc").join(&id),
            ])
        },
    );
    eprintln!(
        "debian-podman: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    checks.finish();
}

#[test]
fn debian_image_under_containerd() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(inputs) = debian_inputs_or_skip("debian-containerd", "/usr/bin/containerd") else {
        return;
    };
    let host = Host::read(&inputs.rootfs);
    let scratch = Scratch::new("debian-containerd");
    let runtime = Runtime::new(&scratch, &inputs.cocoon);
    let mut containerd = Containerd::start(&scratch);
    containerd.ok(&[
        "image",
        "import",
        "--index-name",
        CTR_IMAGE,
        inputs.image.to_str().unwrap(),
    ]);

    let mut checks = Checks::new("debian-containerd");
    let id = format!("cocoon-debian-{}", std::process::id());
    let started = Instant::now();
    containerd.ok(&[
        "run",
        "-d",
        "--runc-binary",
        runtime.wrapper.to_str().unwrap(),
        CTR_IMAGE,
        &id,
        "sleep",
        "1000",
    ]);
    eprintln!(
        "debian-containerd: container up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let container = CtrContainer {
        containerd: &containerd,
        id: id.clone(),
        execs: Cell::new(0),
    };
    container_checks(
        &mut checks,
        &container,
        &runtime,
        &host,
        None,
        &[None, Some("1000:1000")],
    );

    checks.check(
        "ctr task kill -s KILL, task delete, container delete",
        || {
            // A task that already stopped has nothing left to kill.
            if containerd.task_status(&id) != "STOPPED" {
                succeeded("kill", containerd.ctr(&["task", "kill", "-s", "KILL", &id]))?;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while containerd.task_status(&id) != "STOPPED" {
                if Instant::now() > deadline {
                    return Err("the task did not stop within 30 s of SIGKILL".into());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            succeeded("task delete", containerd.ctr(&["task", "delete", &id]))?;
            succeeded(
                "container delete",
                containerd.ctr(&["container", "delete", &id]),
            )
            .map(drop)
        },
    );
    checks.check(
        "nothing left behind: no task, no process, no runtime state",
        || {
            let tasks = containerd.ok(&["task", "ls", "-q"]);
            if !tasks.trim().is_empty() {
                return Err(format!("tasks: {tasks}"));
            }
            no_processes_mentioning(&id)?;
            no_state_dirs(&[Path::new("/run/containerd/runc/default").join(&id)])
        },
    );
    containerd.shut_down();
    eprintln!(
        "debian-containerd: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    checks.finish();
}

/// The comparisons themselves, on what runc gave under Podman (no VM needed).
#[test]
fn identities_follow_the_execve_rules() {
    let caps = serde_json::json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
        "CAP_SYS_CHROOT",
        "CAP_MKNOD",
        "CAP_AUDIT_WRITE",
        "CAP_SETFCAP"
    ]);
    let non_root = serde_json::json!({
        "user": {"uid": 1000, "gid": 1000, "additionalGids": [1000, 3000, 2000]},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
    });
    let root = serde_json::json!({
        "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
    });
    let status = |ids: &str, groups: &str, caps: &str| {
        format!(
            "id {ids} {ids} {ids} {groups}\nlast_cap 40\ncmdline sh -c \nUid:\t{ids}\t{ids}\t{ids}\t{ids}\n\
             Gid:\t{ids}\t{ids}\t{ids}\t{ids}\nGroups:\t{groups} \nCapPrm:\t{caps}\nCapEff:\t{caps}\n\
             CapBnd:\t00000000a80425fb\n"
        )
    };
    // A non-root process keeps only its (empty) ambient set across execve.
    let dropped = status("1000", "1000 2000 3000", "0000000000000000");
    compare_identity(&dropped, &non_root, true).unwrap();
    let kept = status("1000", "1000 2000 3000", "00000000a80425fb");
    let err = compare_identity(&kept, &non_root, true).unwrap_err();
    assert!(err.contains("CapEff") && err.contains("CapPrm"), "{err}");
    // Root gets its bounding set back.
    compare_identity(&status("0", "", "00000000a80425fb"), &root, true).unwrap();
    let err = compare_identity(&status("0", "0 5", "00000000a80425fb"), &root, true).unwrap_err();
    assert!(err.contains("Groups") && err.contains("id -G"), "{err}");
    let err = compare_identity(&status("1000", "", "0000000000000000"), &root, false).unwrap_err();
    assert!(err.contains("Uid") && !err.contains("id -u"), "{err}");
}

#[test]
fn listings_compare_entry_by_entry() {
    let host = "usr/bin/su 0o4755 0:0 file 1 ab links=1\nusr/bin/x 0o755 0:0 symlink y\n";
    compare_listing(host, host).unwrap();
    let guest = "usr/bin/su 0o755 0:0 file 1 ab links=1\nusr/bin/z 0o644 0:0 file 0 cd links=1\n";
    let err = compare_listing(host, guest).unwrap_err();
    assert!(err.starts_with("3 of 2 entries differ"), "{err}");
    assert!(
        err.contains("guest: usr/bin/su 0o755") && err.contains("host:  (none)"),
        "{err}"
    );
}
