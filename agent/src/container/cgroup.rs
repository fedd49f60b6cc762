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
        match resources {
            Some(resources) => self.update(sys, resources),
            None => Ok(()),
        }
    }

    /// Writes the limits `resources` gives, in v2 terms: at create, and for runc's `update`.
    /// A value left out or zero leaves the cgroup's as it is: engines updating one limit send
    /// zeros for the rest (Docker sends a zero CPU quota and period with every update).
    pub fn update(&self, sys: &dyn Syscall, resources: &LinuxResources) -> Result<(), CgroupError> {
        for (file, value) in self.settings(sys, resources) {
            context(
                sys.write_file(&self.path.join(file), value.as_bytes()),
                || format!("set {file} to {value}"),
            )?;
        }
        Ok(())
    }

    fn settings(
        &self,
        sys: &dyn Syscall,
        resources: &LinuxResources,
    ) -> Vec<(&'static str, String)> {
        let mut settings = Vec::new();
        if let Some(memory) = resources.memory() {
            if let Some(limit) = memory.limit().filter(|l| *l != 0) {
                settings.push(("memory.max", limit_value(limit)));
            }
            if let Some(reservation) = memory.reservation().filter(|r| *r != 0) {
                settings.push(("memory.low", limit_value(reservation)));
            }
            // The guest has no swap device; a swap limit (memory + swap in v1 terms) is moot.
        }
        if let Some(cpu) = resources.cpu() {
            let quota = cpu.quota().filter(|q| *q != 0);
            let period = cpu.period().filter(|p| *p != 0);
            if quota.is_some() || period.is_some() {
                // cpu.max holds both; the one not given keeps its value, as runc keeps it
                // from the container's state. A new cgroup reads "max 100000".
                let current = sys
                    .read_file(&self.path.join("cpu.max"))
                    .unwrap_or_default();
                let mut current = current.split_whitespace();
                let current_quota = current.next().unwrap_or("max").to_owned();
                let current_period = current.next().and_then(|p| p.parse().ok());
                let quota = match quota {
                    Some(q) if q > 0 => q.to_string(),
                    Some(_) => "max".to_owned(),
                    None => current_quota,
                };
                let period = period.or(current_period).unwrap_or(100_000);
                settings.push(("cpu.max", format!("{quota} {period}")));
            }
            if let Some(shares) = cpu.shares().filter(|s| *s != 0) {
                settings.push(("cpu.weight", shares_to_weight(shares).to_string()));
            }
        }
        // runc's reading: 0 means unset, negative means unlimited.
        if let Some(pids) = resources.pids().filter(|p| p.limit() != 0) {
            settings.push(("pids.max", limit_value(pids.limit())));
        }
        settings
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

    /// The cgroup's figures; a file the kernel does not have (memory.peak before 5.19) reads
    /// as zero or unlimited.
    pub fn stats(&self, sys: &dyn Syscall) -> ContainerStats {
        let read = |file: &str| sys.read_file(&self.path.join(file)).unwrap_or_default();
        let number = |file: &str| read(file).trim().parse::<u64>().ok();
        let cpu = read("cpu.stat");
        let cpu_stat = |key| keyed(&cpu, key).unwrap_or(0);
        let events = read("memory.events");
        ContainerStats {
            memory_current: number("memory.current").unwrap_or(0),
            memory_max: number("memory.max"),
            oom_kills: keyed(&events, "oom_kill").unwrap_or(0),
            cpu_usage_usec: cpu_stat("usage_usec"),
            pids_current: number("pids.current").unwrap_or(0),
            pids_max: number("pids.max"),
            cpu_user_usec: cpu_stat("user_usec"),
            cpu_system_usec: cpu_stat("system_usec"),
            cpu_nr_periods: cpu_stat("nr_periods"),
            cpu_nr_throttled: cpu_stat("nr_throttled"),
            cpu_throttled_usec: cpu_stat("throttled_usec"),
            memory_peak: number("memory.peak"),
            memory_max_events: keyed(&events, "max").unwrap_or(0),
            memory_stat: read("memory.stat")
                .lines()
                .filter_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    Some((k.to_owned(), v.trim().parse().ok()?))
                })
                .collect(),
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
    fn an_update_writes_only_what_it_changes() {
        // What containerd's runc shim sends for `docker update --memory 64m`: zeros for the
        // CPU, which must not become "max 0" or a weight of 100.
        let sys = Recorder::default();
        let resources: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":67108864,"swap":134217728},
                "cpu":{"shares":0,"quota":0,"period":0,"cpus":"","mems":""},
                "unknownKey":{"x":1}}"#,
        )
        .unwrap();
        Cgroup::for_container("c1")
            .update(&sys, &resources)
            .unwrap();
        assert_eq!(
            sys.calls(),
            ["write /sys/fs/cgroup/containers/c1/memory.max 67108864"]
        );
    }

    #[test]
    fn an_update_of_quota_or_period_keeps_the_other() {
        let mut sys = Recorder::default();
        sys.contents.insert(
            PathBuf::from("/sys/fs/cgroup/containers/c1/cpu.max"),
            "50000 200000\n".into(),
        );
        let cgroup = Cgroup::for_container("c1");
        let quota: LinuxResources = serde_json::from_str(r#"{"cpu":{"quota":30000}}"#).unwrap();
        cgroup.update(&sys, &quota).unwrap();
        let period: LinuxResources = serde_json::from_str(r#"{"cpu":{"period":50000}}"#).unwrap();
        cgroup.update(&sys, &period).unwrap();
        let pids: LinuxResources = serde_json::from_str(r#"{"pids":{"limit":50}}"#).unwrap();
        cgroup.update(&sys, &pids).unwrap();
        assert_eq!(
            sys.calls(),
            [
                "write /sys/fs/cgroup/containers/c1/cpu.max 30000 200000",
                "write /sys/fs/cgroup/containers/c1/cpu.max 50000 50000",
                "write /sys/fs/cgroup/containers/c1/pids.max 50",
            ]
        );
    }

    #[test]
    fn a_refused_write_names_the_file_and_value() {
        let sys = Recorder {
            failing: ["write /sys/fs/cgroup/containers/c1/pids.max".to_owned()].into(),
            ..Recorder::default()
        };
        let resources: LinuxResources = serde_json::from_str(r#"{"pids":{"limit":5}}"#).unwrap();
        let err = Cgroup::for_container("c1")
            .update(&sys, &resources)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cgroup set pids.max to 5: {}", Errno(libc::EPERM))
        );
    }

    #[test]
    fn stats_read_the_v2_files() {
        let mut sys = Recorder::default();
        let dir = Path::new("/sys/fs/cgroup/containers/c1");
        for (file, text) in [
            ("memory.current", "1048576\n"),
            ("memory.max", "max\n"),
            ("memory.peak", "2097152\n"),
            ("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"),
            ("memory.stat", "anon 4096\nfile 8192\n"),
            (
                "cpu.stat",
                "usage_usec 3000\nuser_usec 2000\nsystem_usec 1000\nnr_periods 7\nnr_throttled 2\nthrottled_usec 500\n",
            ),
            ("pids.current", "3\n"),
            ("pids.max", "50\n"),
        ] {
            sys.contents.insert(dir.join(file), text.into());
        }
        let stats = Cgroup::for_container("c1").stats(&sys);
        assert_eq!(
            stats,
            ContainerStats {
                memory_current: 1 << 20,
                memory_max: None,
                oom_kills: 1,
                cpu_usage_usec: 3000,
                pids_current: 3,
                pids_max: Some(50),
                cpu_user_usec: 2000,
                cpu_system_usec: 1000,
                cpu_nr_periods: 7,
                cpu_nr_throttled: 2,
                cpu_throttled_usec: 500,
                memory_peak: Some(2 << 20),
                memory_max_events: 4,
                memory_stat: [("anon".to_owned(), 4096), ("file".to_owned(), 8192)].into(),
            }
        );
        // A cgroup that is gone reads as empty, not as an error.
        assert_eq!(
            Cgroup::for_container("gone").stats(&sys),
            ContainerStats::default()
        );
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
