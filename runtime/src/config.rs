//! The runtime's own settings: built-in defaults, overridden by `/etc/cocoon/config.toml`
//! (or the file `COCOON_CONFIG` names), then by `COCOON_KERNEL`/`COCOON_INITRD` for development.
//!
//! The default kernel and initramfs sit beside the binary, in `../lib/cocoon/` (so
//! `/usr/local/bin/cocoon` uses `/usr/local/lib/cocoon/`): engines run the runtime with an
//! environment of their own, so the files must be found without one.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/cocoon/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The guest kernel (uncompressed vmlinux with a PVH entry).
    pub kernel: PathBuf,
    /// The initramfs with the agent as /init.
    pub initrd: PathBuf,
    /// Guest memory when the spec sets no memory limit.
    pub default_memory_mib: u64,
    /// Added to the spec's memory limit: the guest kernel and agent live outside the container's
    /// cgroup.
    pub memory_overhead_mib: u64,
    /// vCPUs when the spec sets no CPU quota.
    pub default_cpus: u8,
    /// Where EROFS images of image layers are cached, shared by all containers.
    pub layer_cache: PathBuf,
    /// vCPU seconds a guest may spend without giving what is awaited of it (its agent's
    /// first answer after a boot, a reply): a wait on the guest is judged by its progress,
    /// not by the wall clock (see `progress.rs`).
    pub guest_cpu_budget_secs: u64,
    /// Seconds a guest may do nothing at all (no vCPU running or waiting to run) while
    /// something is awaited of it.
    pub guest_idle_secs: u64,
    /// vCPUs of VMs that are starting, per host core, beyond which a start waits its turn
    /// (see `admission.rs`); 0: no limit.
    pub admission_vcpus_per_core: u32,
    /// How long a start waits for its turn before it fails; 0: it fails at once.
    pub admission_wait_secs: u64,
    /// Memory that must stay free beside a new VM's, or its start fails.
    pub admission_memory_reserve_mib: u64,
    /// No longer used: waits on a guest are judged by its progress (`guest_cpu_budget_secs`,
    /// `guest_idle_secs`). Accepted so that a config written for an older cocoon still loads;
    /// `load` warns.
    pub boot_timeout_secs: Option<u64>,
    /// Start sandboxes by restoring a template (a snapshot of a booted VM) instead of booting.
    pub templates: bool,
    /// Where templates are kept, shared by all containers.
    pub template_dir: PathBuf,
    /// Jail the VMM's threads (seccomp allowlists, no capabilities, not dumpable; see
    /// docs/security.md). Off only to debug a filter.
    pub seccomp: bool,
    /// From releases that copied bind mounts' sources into an image: accepted, ignored (they
    /// are shared over virtio-fs now, nothing is copied).
    pub host_files_max_mib: Option<u64>,
    /// A cached layer image no VM holds open and no `create` has used for this many hours is
    /// removed (`cocoon gc`, and `create` at most once an hour).
    pub layer_cache_max_age_hours: u64,
}

/// `../lib/cocoon` relative to the running binary.
fn lib_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("lib/cocoon")))
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/cocoon"))
}

impl Default for Config {
    fn default() -> Config {
        let lib = lib_dir();
        Config {
            kernel: lib.join("vmlinux"),
            initrd: lib.join("initramfs.cpio"),
            default_memory_mib: 256,
            memory_overhead_mib: 64,
            default_cpus: 1,
            layer_cache: PathBuf::from("/var/lib/cocoon/layers"),
            guest_cpu_budget_secs: crate::progress::DEFAULT_CPU_BUDGET_SECS,
            guest_idle_secs: crate::progress::DEFAULT_IDLE_SECS,
            admission_vcpus_per_core: 2,
            admission_wait_secs: 900,
            admission_memory_reserve_mib: 256,
            boot_timeout_secs: None,
            templates: true,
            template_dir: PathBuf::from("/var/lib/cocoon/templates"),
            seccomp: true,
            host_files_max_mib: None,
            layer_cache_max_age_hours: 168,
        }
    }
}

impl Config {
    /// How long an unused layer image stays in the cache.
    pub fn layer_cache_max_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.layer_cache_max_age_hours.saturating_mul(3600))
    }

    /// How long waits on a guest go on without progress.
    pub fn guest_limits(&self) -> crate::progress::GuestLimits {
        crate::progress::GuestLimits {
            cpu_budget: std::time::Duration::from_secs(self.guest_cpu_budget_secs),
            idle: std::time::Duration::from_secs(self.guest_idle_secs),
        }
    }

    pub fn load() -> Result<Config, ConfigError> {
        let explicit = std::env::var_os("COCOON_CONFIG").map(PathBuf::from);
        let path = explicit
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&path, &text)?,
            // The file is optional unless named explicitly.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
                Config::default()
            }
            Err(e) => return Err(ConfigError::Read(path, e)),
        };
        if config.boot_timeout_secs.is_some() {
            tracing::warn!(
                "{}: boot_timeout_secs is ignored: waits on a guest are judged by its progress \
                 (guest_cpu_budget_secs, guest_idle_secs; docs/cli.md)",
                path.display()
            );
        }
        if config.host_files_max_mib.is_some() {
            tracing::warn!(
                "{}: host_files_max_mib is ignored: bind mounts are shared with the microVM \
                 over virtio-fs, not copied (docs/volumes.md)",
                path.display()
            );
        }
        if let Some(kernel) = std::env::var_os("COCOON_KERNEL") {
            config.kernel = kernel.into();
        }
        if let Some(initrd) = std::env::var_os("COCOON_INITRD") {
            config.initrd = initrd.into();
        }
        Ok(config)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_owned(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overrides_some_defaults() {
        let c = Config::parse(
            Path::new("t"),
            "default_memory_mib = 512\nkernel = \"/k\"\n",
        )
        .unwrap();
        assert_eq!(c.default_memory_mib, 512);
        assert_eq!(c.kernel, Path::new("/k"));
        assert_eq!(c.default_cpus, Config::default().default_cpus);
    }

    /// A config written for an older cocoon still loads.
    #[test]
    fn the_old_boot_timeout_is_accepted() {
        let c = Config::parse(Path::new("t"), "boot_timeout_secs = 180\n").unwrap();
        assert_eq!(c.boot_timeout_secs, Some(180));
        assert_eq!(c.guest_limits(), Config::default().guest_limits());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse(Path::new("t"), "memory = 1\n").unwrap_err();
        assert!(e.to_string().contains("memory"), "{e}");
    }
}
