//! Host files a spec bind-mounts (`/etc/hosts`, `/etc/resolv.conf` and `/run/.containerenv`
//! from Podman, volumes) cannot be shared into the guest as they are: there is no shared
//! filesystem, only block devices. They are copied into one more read-only EROFS image, and
//! the mounts' sources rewritten to where the agent mounts it. Writes to them stay in the
//! guest. Binds of `/proc`, `/sys` and `/dev` paths mean the sandbox's own and are left alone;
//! a bind at `/dev/shm` becomes a tmpfs of the guest's.

use std::path::{Path, PathBuf};
use std::process::Command;

use cocoon_agent_protocol::spec::is_bind;
use oci_spec::runtime::{Mount, MountBuilder, Spec};

use cocoon_agent_protocol::message::host_files_dir;

use crate::images::ImageError;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
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

/// Copies `source` (a file or a directory tree) to `target`.
fn copy(source: &Path, target: &Path) -> Result<(), ImageError> {
    if source.is_dir() {
        std::fs::create_dir_all(target).map_err(io("create", target))?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", source.display()))
            .arg(target)
            .status()
            .map_err(io("copy", source))?;
        if !status.success() {
            return Err(ImageError::Io {
                what: "copy",
                path: source.to_owned(),
                source: std::io::Error::other("cp -a failed"),
            });
        }
        Ok(())
    } else {
        std::fs::copy(source, target)
            .map(drop)
            .map_err(io("copy", source))
    }
}

/// Rewrites `spec`'s host bind mounts and copies their sources under `staging`. Returns whether
/// anything was copied (and so an image of `staging` is needed).
pub fn stage(spec: &mut Spec, id: &str, staging: &Path) -> Result<bool, ImageError> {
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(false);
    };
    let guest_dir = PathBuf::from(host_files_dir(id));
    let mut copied = 0;
    let mut rewritten = Vec::with_capacity(mounts.len());
    for mut mount in mounts {
        let source = mount.source().clone().filter(|s| s.is_absolute());
        match source {
            Some(_) if is_bind(&mount) && mount.destination() == Path::new("/dev/shm") => {
                mount = shm()
            }
            Some(source) if is_bind(&mount) && !guest_own(&source) && source.exists() => {
                if copied == 0 {
                    std::fs::create_dir_all(staging).map_err(io("create", staging))?;
                }
                let name = copied.to_string();
                copy(&source, &staging.join(&name))?;
                mount.set_source(Some(guest_dir.join(&name)));
                copied += 1;
            }
            _ => {}
        }
        rewritten.push(mount);
    }
    spec.set_mounts(Some(rewritten));
    Ok(copied > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_binds_are_copied_and_guest_paths_left_alone() {
        let dir = std::env::temp_dir().join(format!("cocoon-host-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("vol")).unwrap();
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(dir.join("vol/data"), "x").unwrap();
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": dir.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "none", "source": dir.join("vol"), "options": ["bind"]},
                {"destination": "/dev/shm", "type": "bind", "source": dir.join("shm"), "options": ["bind"]},
                {"destination": "/guest-proc", "type": "bind", "source": "/proc", "options": ["rbind"]}
            ]
        });
        let mut spec: Spec = serde_json::from_value(json).unwrap();
        let staging = dir.join("staging");
        assert!(stage(&mut spec, "c1", &staging).unwrap());
        let mounts = spec.mounts().as_ref().unwrap();
        let source = |i: usize| mounts[i].source().clone().unwrap();
        assert_eq!(source(0), Path::new("proc"));
        assert_eq!(source(1), Path::new("/run/cocoon/containers/c1/host/0"));
        assert_eq!(source(2), Path::new("/run/cocoon/containers/c1/host/1"));
        assert_eq!(mounts[3].typ().as_deref(), Some("tmpfs"));
        assert_eq!(source(4), Path::new("/proc"));
        assert_eq!(
            std::fs::read_to_string(staging.join("0")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            std::fs::read_to_string(staging.join("1/data")).unwrap(),
            "x"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
