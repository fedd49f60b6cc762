//! Admission: a VM starts only when the host can carry its start. Starting is the costly part
//! of a sandbox's life (a boot or a restore, then the container's set-up, all guest kernel
//! code, which a PVM host emulates); VMs that start at once share the host's cores, and past
//! a point each only slows the others down. So the vCPUs of VMs that are starting are counted
//! host-wide, and a start that would take them past `admission_vcpus_per_core` times the
//! host's cores waits its turn (at most `admission_wait_secs`). A VM that is up no longer
//! counts: an idle sandbox costs nothing, and a busy one's work is its workload's, as under
//! runc. A start also needs the VM's memory free, plus a reserve, or it fails at once.
//!
//! Each starting VM holds a ticket: a file in the admission directory that names its vCPUs,
//! locked (`flock`) for as long as its holder lives, so a holder that dies gives its turn back.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;

/// Host-wide: every `--root` shares the host's cores.
pub const ADMISSION_DIR: &str = "/run/cocoon/admission";

/// When a VM may start (`config.toml`: `admission_vcpus_per_core`, `admission_wait_secs`,
/// `admission_memory_reserve_mib`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub dir: PathBuf,
    /// The host's cores.
    pub cores: usize,
    /// Starting vCPUs allowed per core; 0: no limit.
    pub vcpus_per_core: u32,
    /// How long a start waits for its turn; 0: it fails at once.
    pub wait: Duration,
    /// Memory that stays free beside a new VM's.
    pub memory_reserve_mib: u64,
}

impl Policy {
    pub fn from_config(config: &crate::config::Config) -> Policy {
        Policy {
            dir: PathBuf::from(ADMISSION_DIR),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            vcpus_per_core: config.admission_vcpus_per_core,
            wait: Duration::from_secs(config.admission_wait_secs),
            memory_reserve_mib: config.admission_memory_reserve_mib,
        }
    }

    fn capacity(&self) -> Option<u64> {
        (self.vcpus_per_core > 0).then(|| self.cores as u64 * u64::from(self.vcpus_per_core))
    }
}

/// A VM's turn to start, given back when dropped (or when its holder dies).
#[derive(Debug)]
pub struct Ticket {
    path: PathBuf,
    _file: File,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Tickets are named `ticket.tmp.PID.RANDOM`.
const TICKET: &str = "ticket";

/// How often a start that waits looks again.
const RETRY: Duration = Duration::from_millis(200);

/// Waits for a turn to start a VM of `cpus` vCPUs and `memory_mib` of memory.
pub fn admit(policy: &Policy, cpus: u8, memory_mib: u64) -> Result<Ticket, Error> {
    crate::state::create_private_dir_all(&policy.dir).map_err(Error::io("create", &policy.dir))?;
    let deadline = Instant::now() + policy.wait;
    let mut told = false;
    loop {
        let lock = crate::state::lock_file(&policy.dir.join(".lock"))?;
        check_memory(policy, memory_mib)?;
        let starting = starting_vcpus(&policy.dir)?;
        let fits = policy
            .capacity()
            .is_none_or(|capacity| starting == 0 || starting + u64::from(cpus) <= capacity);
        if fits {
            let ticket = take(&policy.dir, cpus)?;
            drop(lock);
            return Ok(ticket);
        }
        drop(lock);
        let capacity = policy.capacity().unwrap_or_default();
        if Instant::now() >= deadline {
            return Err(Error::Admission(format!(
                "the host is busy starting microVMs: {starting} vCPUs are starting and this one \
                 needs {cpus}, beyond {capacity} ({} cores x admission_vcpus_per_core = {}); \
                 waited {} s (admission_wait_secs)",
                policy.cores,
                policy.vcpus_per_core,
                policy.wait.as_secs()
            )));
        }
        if !told {
            tracing::info!(
                starting,
                capacity,
                "waiting for a turn to start the microVM"
            );
            told = true;
        }
        std::thread::sleep(RETRY);
    }
}

/// Fails when less memory is free than the VM needs plus the reserve: waiting would not
/// help as surely as it does for CPU, and a VM started short of memory takes it from others.
fn check_memory(policy: &Policy, memory_mib: u64) -> Result<(), Error> {
    let Some(available) = available_mib() else {
        return Ok(());
    };
    let needed = memory_mib.saturating_add(policy.memory_reserve_mib);
    if available < needed {
        return Err(Error::Admission(format!(
            "not enough free memory: the microVM needs {memory_mib} MiB and \
             {} MiB stay reserved (admission_memory_reserve_mib), {available} MiB are available",
            policy.memory_reserve_mib
        )));
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in MiB.
fn available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The vCPUs of the tickets held now; tickets whose holder is gone are removed.
fn starting_vcpus(dir: &Path) -> Result<u64, Error> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(dir).map_err(Error::io("read", dir))? {
        let path = entry.map_err(Error::io("read", dir))?.path();
        if !path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with(TICKET))
        {
            continue;
        }
        let Ok(mut file) = File::open(&path) else {
            continue; // given back meanwhile
        };
        if try_lock(&file) {
            // Nobody holds it: its holder died before giving it back.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        // A ticket being written counts as one vCPU.
        total += text.trim().parse::<u64>().unwrap_or(1).max(1);
    }
    Ok(total)
}

fn take(dir: &Path, cpus: u8) -> Result<Ticket, Error> {
    let path = crate::state::temp_path(&dir.join(TICKET));
    let mut file =
        crate::state::create_new_file(&path, 0o600).map_err(Error::io("create", &path))?;
    if !try_lock(&file) {
        return Err(Error::Other(format!("cannot lock {}", path.display())));
    }
    file.write_all(cpus.to_string().as_bytes())
        .map_err(Error::io("write", &path))?;
    Ok(Ticket { path, _file: file })
}

fn try_lock(file: &File) -> bool {
    // SAFETY: flock on an fd we own; it changes nothing in our memory.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path, wait_ms: u64) -> Policy {
        Policy {
            dir: dir.to_owned(),
            cores: 1,
            vcpus_per_core: 2,
            wait: Duration::from_millis(wait_ms),
            memory_reserve_mib: 0,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cocoon-admit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Two vCPUs may start on one core; a third waits, is refused when its wait is up, and is
    /// let in once a turn is given back.
    #[test]
    fn a_start_beyond_the_capacity_waits_for_a_turn() {
        let dir = scratch("turn");
        let a = admit(&policy(&dir, 0), 1, 1).unwrap();
        let _b = admit(&policy(&dir, 0), 1, 1).unwrap();
        let started = Instant::now();
        let err = admit(&policy(&dir, 300), 1, 1).unwrap_err().to_string();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            err.contains("2 vCPUs are starting and this one needs 1, beyond 2"),
            "{err}"
        );
        let waiter = {
            let dir = dir.clone();
            std::thread::spawn(move || admit(&policy(&dir, 10_000), 1, 1).map(drop))
        };
        std::thread::sleep(Duration::from_millis(300));
        drop(a);
        waiter.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A VM bigger than the whole capacity still starts when nothing else is starting; a
    /// ticket nobody holds (its holder died) is not counted and is removed.
    #[test]
    fn dead_holders_give_their_turn_back() {
        let dir = scratch("dead");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ticket.dead"), "8").unwrap();
        let big = admit(&policy(&dir, 0), 4, 1).unwrap();
        assert!(!dir.join("ticket.dead").exists());
        drop(big);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != ".lock")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_start_without_the_memory_fails_at_once() {
        let dir = scratch("memory");
        let mut short = policy(&dir, 10_000);
        short.memory_reserve_mib = u64::MAX / 4;
        let started = Instant::now();
        let err = admit(&short, 1, 256).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            err.starts_with("not enough free memory: the microVM needs 256 MiB"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
