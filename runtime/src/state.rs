//! The runtime's record of a container: one directory per container under `--root`, holding
//! `state.json`, the VMM's vsock socket, the container's own images and, once it has exited,
//! `exit.json`. Verbs that change a container hold an exclusive lock on the directory.
//!
//! The records hold the spec, and with it whatever secrets its environment carries: the
//! runtime's directories are made 0700 and its files 0600, whatever the umask, and no path
//! here follows a symlink someone planted at its last component.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{ContainerState, Hooks, State};
use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::message::{ExitStatus, valid_id};

use crate::error::Error;

pub const STATE_FILE: &str = "state.json";
pub const EXIT_FILE: &str = "exit.json";
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The monitor's control socket (see control.rs).
pub const CONTROL_SOCKET: &str = "control.sock";
/// Present while the monitor holds the VM's vCPUs stopped (`pause`).
pub const PAUSED_FILE: &str = "paused";

/// The `ociVersion` of the state we report (`state`, and hooks' stdin).
pub const OCI_VERSION: &str = "1.0.2";

/// What `create` records and the other verbs read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// The process standing in for the container's init: the VMM.
    pub pid: i32,
    /// Its start time in clock ticks since boot (/proc/PID/stat field 22), so a recycled pid
    /// is not mistaken for it.
    pub pid_start_time: u64,
    /// RFC 3339, UTC.
    pub created: String,
    pub started: bool,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The spec's hooks, kept for the verbs after `create` (poststart, poststop): the bundle
    /// may have changed or gone by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
}

impl Record {
    /// The container's state as the OCI runtime spec defines it, which is what hooks read on
    /// stdin. As with runc, there is no pid once the container is stopped.
    pub fn oci_state(&self, status: ContainerState) -> State {
        let mut state = State::default();
        state
            .set_version(OCI_VERSION.into())
            .set_id(self.id.clone())
            .set_status(status)
            .set_pid((status != ContainerState::Stopped).then_some(self.pid))
            .set_bundle(self.bundle.clone())
            .set_annotations((!self.annotations.is_empty()).then(|| {
                self.annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }));
        state
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    /// Running, with the VM's vCPUs stopped.
    Paused,
    Stopped,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }

    pub fn oci(self) -> ContainerState {
        match self {
            Status::Created => ContainerState::Created,
            // The OCI state has no "paused"; runc's `state` says it, hooks see running.
            Status::Running | Status::Paused => ContainerState::Running,
            Status::Stopped => ContainerState::Stopped,
        }
    }
}

pub fn check_id(id: &str) -> Result<(), Error> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_owned()))
    }
}

/// A container's directory, locked for as long as this value lives.
pub struct ContainerDir {
    pub path: PathBuf,
    pub id: String,
    lock: File,
}

/// Opens (creating, 0600) `path` and takes an exclusive lock on it, waiting for other holders;
/// the lock goes with the returned file.
pub fn lock_file(path: &Path) -> Result<File, Error> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io("open", path))?;
    // SAFETY: flock on an fd we own; blocks until the holder releases it.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io("lock", path)(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Opens a directory of ours: a symlink in its place is an error, not followed.
fn open_dir(dir: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
}

fn lock(dir: &Path) -> Result<File, Error> {
    let file = open_dir(dir).map_err(Error::io("open", dir))?;
    flock(file, dir)
}

fn flock(file: File, dir: &Path) -> Result<File, Error> {
    // SAFETY: flock on an fd we own; blocks until other verbs on this container finish.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io("lock", dir)(std::io::Error::last_os_error()));
    }
    Ok(file)
}

impl ContainerDir {
    /// Creates the directory of a new container; an existing one is a duplicate id.
    pub fn create(root: &Path, id: &str) -> Result<ContainerDir, Error> {
        check_id(id)?;
        create_private_dir_all(root).map_err(Error::io("create", root))?;
        let path = root.join(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists(id.into()));
            }
            Err(e) => return Err(Error::io("create", &path)(e)),
        }
        // 0700 exactly, whatever the umask: set on the directory we opened, not by path.
        let file = open_dir(&path)
            .and_then(|file| {
                file.set_permissions(std::fs::Permissions::from_mode(0o700))?;
                Ok(file)
            })
            .map_err(Error::io("create", &path))?;
        let lock = flock(file, &path)?;
        Ok(ContainerDir {
            path,
            id: id.to_owned(),
            lock,
        })
    }

    /// Opens and locks an existing container's directory.
    pub fn open(root: &Path, id: &str) -> Result<ContainerDir, Error> {
        check_id(id)?;
        let path = root.join(id);
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Err(Error::NotExist(id.into()));
        }
        let lock = lock(&path)?;
        // A directory without a record is a create that has not finished, or crashed.
        if !path.join(STATE_FILE).exists() {
            return Err(Error::NotExist(id.into()));
        }
        Ok(ContainerDir {
            path,
            id: id.to_owned(),
            lock,
        })
    }

    /// Runs `f` with the lock released, then takes it again. Hooks run this way: a hook may
    /// call `state` (or any verb) on this very container, which would otherwise wait for us
    /// while we wait for it.
    pub fn unlocked<T>(&self, f: impl FnOnce() -> T) -> Result<T, Error> {
        // SAFETY: flock on the fd we own.
        unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
        let result = f();
        // SAFETY: as above; blocks until a verb the hooks started has finished.
        if unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io("lock", &self.path)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(result)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn read(&self) -> Result<Record, Error> {
        read_record(&self.path)
    }

    /// Writes the record atomically: a reader sees the old one or the new one.
    pub fn write(&self, record: &Record) -> Result<(), Error> {
        write_atomically(
            &self.file(STATE_FILE),
            &serde_json::to_vec_pretty(record).map_err(|source| Error::Encode {
                what: "the container's record",
                source,
            })?,
        )
    }

    pub fn remove(self) -> Result<(), Error> {
        std::fs::remove_dir_all(&self.path).map_err(Error::io("remove", &self.path))
    }
}

pub fn read_record(dir: &Path) -> Result<Record, Error> {
    read_json(&dir.join(STATE_FILE))
}

/// One of the runtime's JSON files; unreadable or malformed is an error naming it.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = read_file(path).map_err(Error::io("read", path))?;
    serde_json::from_slice(&text).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads one of the runtime's files; a symlink in its place is an error, not followed.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    Ok(text)
}

/// `mkdir -p` whose new directories are 0700 (whatever the umask: each is set after it is
/// made); existing ones are left as they are.
pub fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {
            let dir = open_dir(path)?;
            dir.set_permissions(std::fs::Permissions::from_mode(0o700))
        }
        // Made meanwhile by another process (or a symlink to a directory: the caller's path).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// A directory the runtime shares between containers (the layer cache, the templates), made
/// 0700; one an older cocoon made with the umask's mode is closed to others too, so that
/// nothing in it is readable by them.
pub fn private_shared_dir(path: &Path) -> std::io::Result<()> {
    create_private_dir_all(path)?;
    if std::fs::metadata(path)?.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A temporary name beside `path` that no other writer uses: `NAME.tmp.PID.RANDOM`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut random = [0u8; 8];
    // SAFETY: getrandom fills the buffer it is given, at most its length.
    let filled = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if filled != random.len() as isize {
        // Unique enough with the pid: the file is created with O_EXCL anyway.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        random = nanos.to_le_bytes();
    }
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(
        ".tmp.{}.{:016x}",
        std::process::id(),
        u64::from_le_bytes(random)
    ));
    path.with_file_name(name)
}

/// Creates `path`, which must not exist (a symlink there is not followed), with `mode`
/// exactly, whatever the umask.
pub fn create_new_file(path: &Path, mode: u32) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(file)
}

/// Syncs the directory holding `path`, so that a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Writes one of the runtime's files (mode 0600) atomically: a reader sees the old one or the
/// new one, even after a crash. See [`write_atomically_mode`].
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), Error> {
    write_atomically_mode(path, contents, 0o600)
}

/// Writes `path` through a temporary file of its own ([`temp_path`], created with O_EXCL and
/// O_NOFOLLOW, so nothing planted there is followed), synced before it is renamed over `path`
/// (a rename replaces a symlink at `path`, never follows it), and the directory synced after.
pub fn write_atomically_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = temp_path(path);
    let mut file = create_new_file(&tmp, mode).map_err(Error::io("create", &tmp))?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(Error::io("write", &tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(Error::io("rename", path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path).map_err(Error::io("sync the directory of", path))
}

pub fn read_exit(dir: &Path) -> Option<ExitStatus> {
    let text = read_file(&dir.join(EXIT_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Field 22 of /proc/PID/stat, or `None` when the process is gone.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the record's process is still the one `create` started (a zombie counts as gone).
pub fn monitor_alive(record: &Record) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", record.pid)) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    state != Some("Z") && process_start_time(record.pid) == Some(record.pid_start_time)
}

pub fn status(dir: &Path, record: &Record) -> Status {
    if read_exit(dir).is_some() || !monitor_alive(record) {
        Status::Stopped
    } else if dir.join(PAUSED_FILE).exists() {
        Status::Paused
    } else if record.started {
        Status::Running
    } else {
        Status::Created
    }
}

/// Every container directory under `root` that has a record, sorted by id.
pub fn list(root: &Path) -> Vec<(PathBuf, Record)> {
    let mut found: Vec<(PathBuf, Record)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let dir = entry.path();
            read_record(&dir).ok().map(|record| (dir, record))
        })
        .collect();
    found.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    found
}

/// `SystemTime` as RFC 3339 in UTC with nanoseconds, as runc's `created`.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_210_096, 5);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.000000005Z");
    }

    #[test]
    fn ids_and_duplicates() {
        let root = std::env::temp_dir().join(format!("cocoon-state-{}", std::process::id()));
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(
                matches!(ContainerDir::create(&root, bad), Err(Error::InvalidId(_))),
                "{bad:?}"
            );
        }
        let dir = ContainerDir::create(&root, "c1").unwrap();
        assert!(matches!(
            ContainerDir::create(&root, "c1"),
            Err(Error::Exists(_))
        ));
        // No record yet: the other verbs do not see it.
        drop(dir);
        assert!(matches!(
            ContainerDir::open(&root, "c1"),
            Err(Error::NotExist(_))
        ));
        assert!(matches!(
            ContainerDir::open(&root, "c2"),
            Err(Error::NotExist(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn record(annotations: &[(&str, &str)]) -> Record {
        Record {
            id: "c1".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            pid: 42,
            pid_start_time: 1,
            created: rfc3339(UNIX_EPOCH),
            started: false,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            hooks: None,
        }
    }

    #[test]
    fn the_oci_state_for_hooks() {
        let state = serde_json::to_value(record(&[]).oci_state(ContainerState::Creating)).unwrap();
        assert_eq!(
            state,
            serde_json::json!({
                "ociVersion": OCI_VERSION, "id": "c1", "status": "creating", "pid": 42,
                "bundle": "/b",
            })
        );
        let state =
            serde_json::to_value(record(&[("a", "1")]).oci_state(ContainerState::Stopped)).unwrap();
        assert_eq!(
            state,
            serde_json::json!({
                "ociVersion": OCI_VERSION, "id": "c1", "status": "stopped", "bundle": "/b",
                "annotations": {"a": "1"},
            })
        );
    }

    /// Whether another process could lock the directory now.
    fn lockable(path: &Path) -> bool {
        let file = File::open(path).unwrap();
        // SAFETY: flock on an fd we own; non-blocking, and released when `file` closes.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    #[test]
    fn unlocked_lets_others_in_and_locks_again() {
        let root = std::env::temp_dir().join(format!("cocoon-unlock-{}", std::process::id()));
        let dir = ContainerDir::create(&root, "c1").unwrap();
        assert!(!lockable(&dir.path));
        assert!(dir.unlocked(|| lockable(&dir.path)).unwrap());
        assert!(!lockable(&dir.path));
        dir.remove().unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn directories_and_files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("cocoon-private-{}", std::process::id()));
        let root = base.join("a/root");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        // SAFETY: umask(2) only swaps the process's mask; the old one is put back below.
        let old = unsafe { libc::umask(0) };
        let dir = ContainerDir::create(&root, "c1").unwrap();
        dir.write(&record(&[])).unwrap();
        write_atomically(&dir.file("other.json"), b"{}").unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        for made in [&base.join("a"), &root, &dir.path] {
            assert_eq!(mode(made), 0o700, "{}", made.display());
        }
        assert_eq!(mode(&dir.file(STATE_FILE)), 0o600);
        assert_eq!(mode(&dir.file("other.json")), 0o600);
        assert_eq!(dir.read().unwrap().id, "c1");
        // Nothing but the files themselves: no temporary file stays behind.
        let mut names: Vec<String> = std::fs::read_dir(&dir.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["other.json", "state.json"]);
        // A shared directory an older version left open is closed.
        let shared = base.join("cache");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_shared_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o700);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn symlinks_planted_at_state_paths_are_not_followed() {
        let base = std::env::temp_dir().join(format!("cocoon-planted-{}", std::process::id()));
        let root = base.join("root");
        let dir = ContainerDir::create(&root, "c1").unwrap();
        let victim = base.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.file(STATE_FILE)).unwrap();
        assert!(matches!(dir.read(), Err(Error::Io { .. })));
        assert!(read_exit(&dir.path).is_none());
        dir.write(&record(&[])).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(
            std::fs::symlink_metadata(dir.file(STATE_FILE))
                .unwrap()
                .is_file()
        );
        // Temporary names are never guessable in advance, and never opened if they exist.
        let path = dir.file("launch.json");
        let (a, b) = (temp_path(&path), temp_path(&path));
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("launch.json.tmp.{}.", std::process::id())),
            "{name}"
        );
        std::os::unix::fs::symlink(base.join("planted"), &a).unwrap();
        assert!(create_new_file(&a, 0o600).is_err());
        assert!(!base.join("planted").exists());
        let lock = dir.file("x.lock");
        std::os::unix::fs::symlink(&victim, &lock).unwrap();
        assert!(lock_file(&lock).is_err());
        // A container directory that is a symlink is no container.
        let elsewhere = base.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(
            elsewhere.join(STATE_FILE),
            serde_json::to_vec(&record(&[])).unwrap(),
        )
        .unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("c2")).unwrap();
        assert!(matches!(
            ContainerDir::open(&root, "c2"),
            Err(Error::NotExist(_))
        ));
        drop(dir);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn our_own_start_time_is_readable() {
        assert!(process_start_time(std::process::id() as i32).is_some());
        assert!(process_start_time(i32::MAX).is_none());
    }
}
