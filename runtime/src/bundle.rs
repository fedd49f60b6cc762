//! An OCI bundle: a directory with `config.json` and the root filesystem it names. Everything
//! here is checked before anything is created, so a bad bundle changes nothing.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {path}: {source}")]
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle {0} is not a directory")]
    NotDirectory(PathBuf),
    #[error("cannot read {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid {path}: {source}")]
    BadJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unsupported ociVersion {0:?} in config.json: cocoon runs specs of version 1.x")]
    Version(String),
    #[error("config.json has no process to run")]
    NoProcess,
    #[error("config.json has no root")]
    NoRoot,
    #[error("root filesystem {path}: {source}")]
    Rootfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "root.path {root} resolves to {resolved}, outside the bundle {bundle}: a relative root.path must stay inside the bundle"
    )]
    RootOutside {
        root: PathBuf,
        resolved: PathBuf,
        bundle: PathBuf,
    },
}

pub struct Bundle {
    /// Absolute path of the bundle directory.
    pub path: PathBuf,
    pub spec: Spec,
    /// Absolute path of the root filesystem, every symlink resolved.
    pub rootfs: PathBuf,
}

impl Bundle {
    pub fn load(path: &Path) -> Result<Bundle, BundleError> {
        let path = std::fs::canonicalize(path).map_err(|source| BundleError::Path {
            path: path.to_owned(),
            source,
        })?;
        if !path.is_dir() {
            return Err(BundleError::NotDirectory(path));
        }
        let config = path.join("config.json");
        let text = std::fs::read(&config).map_err(|source| BundleError::ReadConfig {
            path: config.clone(),
            source,
        })?;
        // Checked on the raw JSON first: a version we do not know may not parse as our types.
        let version = serde_json::from_slice::<serde_json::Value>(&text)
            .map_err(|source| BundleError::BadJson {
                path: config.clone(),
                source,
            })?
            .get("ociVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        if version.split('.').next() != Some("1") {
            return Err(BundleError::Version(version));
        }
        let spec: Spec = serde_json::from_slice(&text).map_err(|source| BundleError::BadJson {
            path: config.clone(),
            source,
        })?;
        let root = spec.root().as_ref().ok_or(BundleError::NoRoot)?;
        let rootfs = rootfs(&path, root.path())?;
        Ok(Bundle { path, spec, rootfs })
    }

    /// `create` and `run` need a process; `spec` files without one are valid for other tools.
    pub fn require_process(&self) -> Result<(), BundleError> {
        match self.spec.process() {
            Some(_) => Ok(()),
            None => Err(BundleError::NoProcess),
        }
    }

    pub fn terminal(&self) -> bool {
        self.spec.process().as_ref().and_then(|p| p.terminal()) == Some(true)
    }
}

/// The root filesystem `root` names in the bundle at `bundle` (canonical), resolved. As with
/// runc, an absolute path may be anywhere (engines give their own overlay mounts); a relative
/// one must stay inside the bundle, whether it leaves by `..` or through a symlink.
fn rootfs(bundle: &Path, root: &Path) -> Result<PathBuf, BundleError> {
    let joined = bundle.join(root);
    let resolved = std::fs::canonicalize(&joined).map_err(|source| BundleError::Rootfs {
        path: joined.clone(),
        source,
    })?;
    if root.is_relative() && !resolved.starts_with(bundle) {
        return Err(BundleError::RootOutside {
            root: root.to_owned(),
            resolved,
            bundle: bundle.to_owned(),
        });
    }
    let meta = std::fs::metadata(&resolved).map_err(|source| BundleError::Rootfs {
        path: joined.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(BundleError::Rootfs {
            path: joined,
            source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
        });
    }
    Ok(resolved)
}

/// The VM's size for a spec: vCPUs from the CPU quota (rounded up, at least 1), memory from the
/// memory limit plus the guest's own overhead; the configured defaults otherwise.
pub fn vm_size(spec: &Spec, config: &Config) -> (u8, u64) {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let cpus = match (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period())) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => {
            (quota as u64).div_ceil(period).clamp(1, 16) as u8
        }
        _ => config.default_cpus,
    };
    let limit = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0);
    let memory = match limit {
        Some(bytes) => (bytes as u64).div_ceil(1 << 20) + config.memory_overhead_mib,
        None => config.default_memory_mib,
    };
    (cpus, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn bundle(config: Option<&str>, rootfs: bool) -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cocoon-bundle-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(config) = config {
            std::fs::write(dir.join("config.json"), config).unwrap();
        }
        if rootfs {
            std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        }
        Dir(dir)
    }

    const GOOD: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"cwd":"/","user":{"uid":0,"gid":0},"args":["sh"]}}"#;

    #[test]
    fn a_good_bundle_loads() {
        let dir = bundle(Some(GOOD), true);
        let b = Bundle::load(&dir.0).unwrap();
        assert!(b.rootfs.ends_with("rootfs"));
        b.require_process().unwrap();
    }

    #[test]
    fn each_bad_bundle_says_what_is_wrong() {
        let missing = Bundle::load(Path::new("/nonexistent/bundle"))
            .err()
            .unwrap();
        assert!(matches!(missing, BundleError::Path { .. }), "{missing}");
        let dir = bundle(None, true);
        assert!(matches!(
            Bundle::load(&dir.0),
            Err(BundleError::ReadConfig { .. })
        ));
        let dir = bundle(Some("{not json"), true);
        assert!(matches!(
            Bundle::load(&dir.0),
            Err(BundleError::BadJson { .. })
        ));
        let dir = bundle(Some(&GOOD.replace("1.0.2", "2.0.0")), true);
        assert!(matches!(Bundle::load(&dir.0), Err(BundleError::Version(v)) if v == "2.0.0"));
        let dir = bundle(Some(GOOD), false);
        assert!(matches!(
            Bundle::load(&dir.0),
            Err(BundleError::Rootfs { .. })
        ));
        let dir = bundle(
            Some(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#),
            true,
        );
        assert!(matches!(
            Bundle::load(&dir.0).unwrap().require_process(),
            Err(BundleError::NoProcess)
        ));
    }

    #[test]
    fn a_relative_root_must_stay_in_the_bundle() {
        let with_root =
            |root: &str| GOOD.replace(r#""path":"rootfs""#, &format!(r#""path":{root:?}"#));
        let outside = bundle(None, true);
        let escape = format!(
            "../{}/rootfs",
            outside.0.file_name().unwrap().to_str().unwrap()
        );
        let dir = bundle(Some(&with_root(&escape)), true);
        let error = Bundle::load(&dir.0).err().unwrap();
        assert!(matches!(error, BundleError::RootOutside { .. }), "{error}");
        assert!(error.to_string().contains(&escape), "{error}");
        let dir = bundle(Some(&with_root("link")), true);
        std::os::unix::fs::symlink(outside.0.join("rootfs"), dir.0.join("link")).unwrap();
        let error = Bundle::load(&dir.0).err().unwrap();
        assert!(matches!(error, BundleError::RootOutside { .. }), "{error}");
        // Inside, however it is spelled, and anywhere when absolute (engines' overlays).
        let dir = bundle(Some(&with_root("x/../rootfs")), true);
        std::fs::create_dir_all(dir.0.join("x")).unwrap();
        let b = Bundle::load(&dir.0).unwrap();
        assert_eq!(
            b.rootfs,
            std::fs::canonicalize(dir.0.join("rootfs")).unwrap()
        );
        let absolute = outside.0.join("rootfs");
        let dir = bundle(Some(&with_root(absolute.to_str().unwrap())), false);
        let b = Bundle::load(&dir.0).unwrap();
        assert_eq!(b.rootfs, std::fs::canonicalize(&absolute).unwrap());
    }

    #[test]
    fn vm_size_follows_the_limits() {
        let config = Config::default();
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":104857600},"cpu":{"quota":150000,"period":100000}}}}"#,
        )
        .unwrap();
        assert_eq!(
            vm_size(&spec, &config),
            (2, 100 + config.memory_overhead_mib)
        );
        let spec: Spec = serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert_eq!(
            vm_size(&spec, &config),
            (config.default_cpus, config.default_memory_mib)
        );
    }
}
