//! Host files a spec bind-mounts (volumes, and Podman's `/etc/hosts`, `/etc/resolv.conf`,
//! `/etc/hostname` and `/run/.containerenv`) are shared with the guest, live both ways, over
//! the VM's virtio-fs device (`docs/volumes.md`). At `create`, [`plan`] resolves each source,
//! checks what it is, rewrites the mount's source to the share's path in the guest and records
//! the share in `launch.json`; the monitor, once the VM runs, opens each source again
//! ([`HostShare::open`]) and hands the descriptor to the VMM's file server. The guest applies
//! the mount's own options (`ro`, `nosuid`, `nodev`, `noexec`, propagation) to its bind; a
//! `ro` mount's share is read-only in the server too.
//!
//! Binds of `/proc`, `/sys` and `/dev` paths mean the sandbox's own and are left alone; a bind
//! at `/dev/shm` becomes a tmpfs of the guest's.
//!
//! A source is resolved (symlinks and all) before anything is decided about it, and opened
//! only `O_PATH | O_NOFOLLOW`, which opens no device and waits on no FIFO. Only directories
//! and regular files are shared: a source that is a device, FIFO or socket is refused with an
//! error naming the mount (the container could not use it through the guest's kernel). What
//! is inside a shared directory is the file server's to confine (`vmm/.../fs/server.rs`).

use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cocoon_agent_protocol::message::share_path;
use cocoon_agent_protocol::spec::is_bind;
use oci_spec::runtime::{Mount, MountBuilder, Spec};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("mount {destination}: {what} {path}: {source}")]
    Io {
        destination: PathBuf,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "mount {destination}: {path} is a {kind}: only directories and regular files can be shared with the microVM"
    )]
    Kind {
        destination: PathBuf,
        path: PathBuf,
        kind: &'static str,
    },
    #[error(
        "mount {destination}: {path} was replaced by another file between create and the microVM's start"
    )]
    Replaced { destination: PathBuf, path: PathBuf },
}

/// One host directory or file shared with the container's VM, as `launch.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostShare {
    /// The share's name in the VM's file server (the guest sees it at `share_path(name)`).
    pub name: String,
    /// The source, resolved.
    pub source: PathBuf,
    /// The mount's destination in the container, for messages.
    pub destination: PathBuf,
    pub read_only: bool,
    /// The source's identity when `create` looked: the monitor shares that file or none.
    pub dev: u64,
    pub ino: u64,
}

impl HostShare {
    /// The source opened `O_PATH` for the file server, checked to be the file `create` saw.
    pub fn open(&self) -> Result<OwnedFd, ShareError> {
        let (file, meta) = open_path(&self.source).map_err(|source| ShareError::Io {
            destination: self.destination.clone(),
            what: "open",
            path: self.source.clone(),
            source,
        })?;
        if (meta.dev(), meta.ino()) != (self.dev, self.ino) {
            return Err(ShareError::Replaced {
                destination: self.destination.clone(),
                path: self.source.clone(),
            });
        }
        Ok(file.into())
    }
}

fn guest_own(source: &Path) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| source.starts_with(p))
}

fn shm() -> Mount {
    MountBuilder::default()
        .destination("/dev/shm")
        .typ("tmpfs")
        .source("shm")
        .options(
            ["nosuid", "nodev", "noexec", "mode=1777", "size=65536k"]
                .map(String::from)
                .to_vec(),
        )
        .build()
        .expect("a fixed, valid mount")
}

/// What a file that is not shared is, for messages.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// Opens `path` without following its last component and without opening what it names
/// (`O_PATH`): a device's driver is not called, a FIFO not waited on.
fn open_path(path: &Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

/// Whether the mount asks for a read-only bind (the last of `ro`/`rw` wins, as in mount(8)).
fn read_only(mount: &Mount) -> bool {
    mount
        .options()
        .iter()
        .flatten()
        .rfind(|o| *o == "ro" || *o == "rw")
        .is_some_and(|o| o == "ro")
}

/// The share of one bind mount's resolved `source`.
fn share_of(mount: &Mount, source: &Path, name: String) -> Result<HostShare, ShareError> {
    let destination = mount.destination().clone();
    let (_, meta) = open_path(source).map_err(|e| ShareError::Io {
        destination: destination.clone(),
        what: "open",
        path: source.to_owned(),
        source: e,
    })?;
    if !meta.is_dir() && !meta.is_file() {
        return Err(ShareError::Kind {
            destination,
            path: source.to_owned(),
            kind: kind(&meta),
        });
    }
    Ok(HostShare {
        name,
        source: source.to_owned(),
        destination,
        read_only: read_only(mount),
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Rewrites `spec`'s host bind mounts to their shares' paths in the guest and returns the
/// shares, in the order of the mounts.
pub fn plan(spec: &mut Spec) -> Result<Vec<HostShare>, ShareError> {
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(Vec::new());
    };
    let mut shares = Vec::new();
    let mut rewritten = Vec::with_capacity(mounts.len());
    for mut mount in mounts {
        let source = mount.source().clone().filter(|s| s.is_absolute());
        match source {
            Some(_) if is_bind(&mount) && mount.destination() == Path::new("/dev/shm") => {
                mount = shm()
            }
            Some(source) if is_bind(&mount) && !guest_own(&source) => {
                // One that cannot be resolved fails here, as runc's mount would: left as it
                // is, the guest would resolve it in its own file system.
                let resolved = std::fs::canonicalize(&source).map_err(|e| ShareError::Io {
                    destination: mount.destination().clone(),
                    what: "resolve",
                    path: source.clone(),
                    source: e,
                })?;
                if guest_own(&resolved) {
                    // A link into /dev, /proc or /sys: the guest's own, never opened here.
                    mount.set_source(Some(resolved));
                    rewritten.push(mount);
                    continue;
                }
                let share = share_of(&mount, &resolved, shares.len().to_string())?;
                mount.set_source(Some(PathBuf::from(share_path(&share.name))));
                shares.push(share);
            }
            _ => {}
        }
        rewritten.push(mount);
    }
    spec.set_mounts(Some(rewritten));
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(destination: &str, source: &Path) -> serde_json::Value {
        serde_json::json!({"destination": destination, "type": "bind", "source": source, "options": ["rbind"]})
    }

    fn spec_of(mounts: Vec<serde_json::Value>) -> Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "mounts": mounts}))
            .unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cocoon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn host_binds_become_shares_and_guest_paths_are_left_alone() {
        let dir = scratch("shares-plan");
        std::fs::create_dir_all(dir.join("vol")).unwrap();
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::os::unix::fs::symlink(dir.join("vol"), dir.join("link-to-vol")).unwrap();
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": dir.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "none", "source": dir.join("link-to-vol"), "options": ["bind", "ro", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": dir.join("shm"), "options": ["bind"]},
                {"destination": "/guest-proc", "type": "bind", "source": "/proc", "options": ["rbind"]}
            ]
        });
        let mut spec: Spec = serde_json::from_value(json).unwrap();
        let shares = plan(&mut spec).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let source = |i: usize| mounts[i].source().clone().unwrap();
        assert_eq!(source(0), Path::new("proc"));
        assert_eq!(source(1), Path::new("/run/cocoon/fs/0"));
        assert_eq!(source(2), Path::new("/run/cocoon/fs/1"));
        assert_eq!(mounts[3].typ().as_deref(), Some("tmpfs"));
        assert_eq!(source(4), Path::new("/proc"));
        // The options stay for the guest to apply.
        assert_eq!(mounts[1].options().as_deref().unwrap(), ["rbind", "ro"]);
        assert_eq!(shares.len(), 2);
        assert_eq!((shares[0].name.as_str(), shares[0].read_only), ("0", true));
        assert_eq!(shares[0].source, dir.join("hosts"));
        assert_eq!(shares[0].destination, Path::new("/etc/hosts"));
        // The link resolved; the last of ro/rw counts.
        assert_eq!(
            (shares[1].source.clone(), shares[1].read_only),
            (dir.join("vol"), false)
        );
        // The monitor gets the very files create saw, and nothing else.
        assert!(shares[1].open().is_ok());
        // Renamed away, not removed: a new directory could reuse a freed inode number.
        std::fs::rename(dir.join("vol"), dir.join("vol-old")).unwrap();
        std::fs::create_dir(dir.join("vol")).unwrap();
        let err = shares[1].open().unwrap_err();
        assert!(matches!(err, ShareError::Replaced { .. }), "{err}");
        assert!(err.to_string().contains("mount /data"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    /// `plan` in a thread: one that opened a FIFO would wait forever, and so fails here.
    fn plan_within(spec: Spec) -> (Result<Vec<HostShare>, ShareError>, Spec) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut spec = spec;
            let result = plan(&mut spec);
            let _ = tx.send((result, spec));
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("plan waited on a special file")
    }

    #[test]
    fn special_sources_are_refused_without_being_opened() {
        let dir = scratch("shares-special");
        mkfifo(&dir.join("fifo"));
        let _socket = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
        std::os::unix::fs::symlink(dir.join("fifo"), dir.join("to-fifo")).unwrap();
        for (source, kind) in [("fifo", "FIFO"), ("sock", "socket"), ("to-fifo", "FIFO")] {
            let spec = spec_of(vec![bind("/run/x", &dir.join(source))]);
            let (result, _) = plan_within(spec);
            let error = result.unwrap_err();
            let text = error.to_string();
            assert!(
                matches!(error, ShareError::Kind { kind: k, .. } if k == kind),
                "{source}: {text}"
            );
            assert!(text.contains("mount /run/x"), "{text}");
        }
        // A source that is not there fails create, naming the mount.
        let (result, _) = plan_within(spec_of(vec![bind("/missing", &dir.join("nothing"))]));
        let text = result.unwrap_err().to_string();
        assert!(text.contains("mount /missing: resolve"), "{text}");
        // A link into /dev is the guest's /dev: the host's device is not shared, nor opened.
        std::os::unix::fs::symlink("/dev/null", dir.join("to-null")).unwrap();
        let spec = spec_of(vec![bind("/x", &dir.join("to-null"))]);
        let (result, spec) = plan_within(spec);
        assert!(result.unwrap().is_empty());
        let source = spec.mounts().as_ref().unwrap()[0].source().clone();
        assert_eq!(source.as_deref(), Some(Path::new("/dev/null")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
