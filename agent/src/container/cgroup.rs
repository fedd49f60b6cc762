//! One cgroup v2 directory per container, under `/sys/fs/cgroup/containers`, with the spec's
//! memory, cpu and pids limits.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::syscall::{Errno, Syscall};
use cocoon_agent_protocol::message::ContainerStats;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "containers";
const CONTROLLERS: &[u8] = b"+cpu +memory +pids";

#[derive(Debug, thiserror::Error)]
#[error("cgroup {what}: {errno}")]
pub struct CgroupError {
    pub what: String,
    pub errno: Errno,
}

fn context<T>(result: Result<T, Errno>, what: impl FnOnce() -> String) -> Result<T, CgroupError> {
    result.map_err(|errno| CgroupError {
        what: what(),
        errno,
    })
}

/// Turns the controllers on for the containers' parent cgroup. Called once at boot, after
/// cgroup2 is mounted.
pub fn enable_controllers(sys: &dyn Syscall) -> Result<(), CgroupError> {
    let root = Path::new(CGROUP_ROOT);
    context(
        sys.write_file(&root.join("cgroup.subtree_control"), CONTROLLERS),
        || "enable controllers at the root".into(),
    )?;
    let parent = root.join(PARENT);
    context(sys.mkdir(&parent, 0o755), || {
        format!("create {}", parent.display())
    })?;
    context(
        sys.write_file(&parent.join("cgroup.subtree_control"), CONTROLLERS),
        || format!("enable controllers in {}", parent.display()),
    )
}

/// cgroup v1 `cpu.shares` (2..262144) to v2 `cpu.weight` (1..10000), the conversion runc and
/// crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn for_container(id: &str) -> Cgroup {
        Cgroup {
            path: Path::new(CGROUP_ROOT).join(PARENT).join(id),
        }
    }

    /// Creates the cgroup and writes the limits.
    pub fn create(
        &self,
        sys: &dyn Syscall,
        resources: Option<&LinuxResources>,
    ) -> Result<(), CgroupError> {
        context(sys.mkdir(&self.path, 0o755), || {
            format!("create {}", self.path.display())
        })?;
        let Some(resources) = resources else {
            return Ok(());
        };
        let mut settings: Vec<(&str, String)> = Vec::new();
        if let Some(memory) = resources.memory() {
            if let Some(limit) = memory.limit() {
                settings.push(("memory.max", limit_value(limit)));
            }
            if let Some(reservation) = memory.reservation() {
                settings.push(("memory.low", limit_value(reservation)));
            }
            // The guest has no swap device; a swap limit (memory + swap in v1 terms) is moot.
        }
        if let Some(cpu) = resources.cpu() {
            if cpu.quota().is_some() || cpu.period().is_some() {
                let quota = cpu
                    .quota()
                    .filter(|q| *q > 0)
                    .map_or("max".to_owned(), |q| q.to_string());
                let period = cpu.period().unwrap_or(100_000);
                settings.push(("cpu.max", format!("{quota} {period}")));
            }
            if let Some(shares) = cpu.shares() {
                settings.push(("cpu.weight", shares_to_weight(shares).to_string()));
            }
        }
        // runc's reading: 0 means unset, negative means unlimited.
        if let Some(pids) = resources.pids().filter(|p| p.limit() != 0) {
            settings.push(("pids.max", limit_value(pids.limit())));
        }
        for (file, value) in settings {
            context(
                sys.write_file(&self.path.join(file), value.as_bytes()),
                || format!("set {file} to {value}"),
            )?;
        }
        Ok(())
    }

    /// The file a process writes "0" to, to move itself in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// The pids in the cgroup, as the guest sees them.
    pub fn pids(&self) -> Vec<i32> {
        self.read("cgroup.procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn oom_kills(&self) -> u64 {
        keyed(&self.read("memory.events"), "oom_kill").unwrap_or(0)
    }

    pub fn stats(&self) -> ContainerStats {
        let number = |file: &str| self.read(file).trim().parse::<u64>().ok();
        ContainerStats {
            memory_current: number("memory.current").unwrap_or(0),
            memory_max: number("memory.max"),
            oom_kills: self.oom_kills(),
            cpu_usage_usec: keyed(&self.read("cpu.stat"), "usage_usec").unwrap_or(0),
            pids_current: number("pids.current").unwrap_or(0),
            pids_max: number("pids.max"),
        }
    }

    /// SIGKILLs every process in the cgroup (cgroup.kill, Linux 5.14+).
    pub fn kill_all(&self, sys: &dyn Syscall) -> Result<(), CgroupError> {
        context(sys.write_file(&self.path.join("cgroup.kill"), b"1"), || {
            "kill all".into()
        })
    }

    /// Removes the cgroup; the kernel refuses while processes remain, so this retries for a
    /// while after `kill_all`.
    pub fn remove(&self, sys: &dyn Syscall) -> Result<(), CgroupError> {
        let mut last = Ok(());
        for _ in 0..200 {
            last = sys.rmdir(&self.path);
            match last {
                Ok(()) | Err(Errno(libc::ENOENT)) => return Ok(()),
                Err(Errno(libc::EBUSY)) => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        context(last, || format!("remove {}", self.path.display()))
    }
}

fn limit_value(value: i64) -> String {
    if value < 0 {
        "max".into()
    } else {
        value.to_string()
    }
}

/// The value of `key` in a flat keyed file ("key value" lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::super::syscall::recorder::Recorder;
    use super::*;

    #[test]
    fn limits_are_written_in_v2_terms() {
        let sys = Recorder::default();
        let resources: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":67108864,"reservation":-1},
                "cpu":{"quota":50000,"period":100000,"shares":1024},
                "pids":{"limit":20}}"#,
        )
        .unwrap();
        Cgroup::for_container("c1")
            .create(&sys, Some(&resources))
            .unwrap();
        assert_eq!(
            sys.calls(),
            [
                "mkdir /sys/fs/cgroup/containers/c1 755",
                "write /sys/fs/cgroup/containers/c1/memory.max 67108864",
                "write /sys/fs/cgroup/containers/c1/memory.low max",
                "write /sys/fs/cgroup/containers/c1/cpu.max 50000 100000",
                "write /sys/fs/cgroup/containers/c1/cpu.weight 39",
                "write /sys/fs/cgroup/containers/c1/pids.max 20",
            ]
        );
    }

    #[test]
    fn unlimited_quota_and_pids_are_max() {
        let sys = Recorder::default();
        let resources: LinuxResources =
            serde_json::from_str(r#"{"cpu":{"quota":-1},"pids":{"limit":-1}}"#).unwrap();
        Cgroup::for_container("c")
            .create(&sys, Some(&resources))
            .unwrap();
        let calls = sys.calls();
        assert!(calls.contains(&"write /sys/fs/cgroup/containers/c/cpu.max max 100000".to_owned()));
        assert!(calls.contains(&"write /sys/fs/cgroup/containers/c/pids.max max".to_owned()));
    }

    #[test]
    fn shares_map_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10000);
    }

    #[test]
    fn keyed_files_parse() {
        assert_eq!(
            keyed("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n", "oom_kill"),
            Some(2)
        );
        assert_eq!(
            keyed("usage_usec 1234\nuser_usec 1\n", "usage_usec"),
            Some(1234)
        );
        assert_eq!(keyed("", "x"), None);
    }
}
