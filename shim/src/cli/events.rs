//! `cocoon events`: the container's cgroup figures as runc prints them, one JSON event a line
//! (`{"type":"stats","id":ID,"data":{...}}`, `data` in runc's `types.Stats` shape). With
//! `--stats` one event, else one every `--interval` until the container stops. The cgroup is
//! the guest's: the agent reads it.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use cocoon_agent_protocol::message::ContainerStats;
use serde::Serialize;

use super::Global;
use crate::error::CliError;
use crate::state::{ContainerDir, Status, VSOCK_SOCKET, status};

#[derive(Args, Debug, Clone)]
pub struct EventsArgs {
    /// Print the container's stats once, then exit.
    #[arg(long)]
    pub stats: bool,
    /// How often to print stats, as a Go duration (5s, 500ms, 1m30s).
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub interval: String,
    pub id: String,
}

pub fn events(global: &Global, args: &EventsArgs) -> Result<(), CliError> {
    let interval = parse_duration(&args.interval)
        .ok_or_else(|| CliError::Other(format!("invalid --interval {:?}", args.interval)))?;
    if interval.is_zero() {
        return Err(CliError::Other(
            "duration interval must be greater than 0".into(),
        ));
    }
    let id = args.id.as_str();
    // The lock is dropped at once: a stream of events must not hold off kill or delete.
    let (path, record) = {
        let dir = ContainerDir::open(&global.root, id)?;
        (dir.path.clone(), dir.read()?)
    };
    match status(&path, &record) {
        Status::Stopped => return Err(CliError::NotRunning),
        // The agent answers only while the vCPUs run.
        Status::Paused => return Err(CliError::Paused(id.into())),
        Status::Created | Status::Running => {}
    }
    let container = crate::cli::container_at(&path.join(VSOCK_SOCKET), id);
    if args.stats {
        print(&stats_event(id, &container.stats()?));
        return Ok(());
    }
    let mut oom_kills = None;
    loop {
        // runc's first event comes after one interval too.
        std::thread::sleep(interval);
        match status(&path, &record) {
            Status::Stopped => return Ok(()),
            // Nothing in the guest moves while paused; the next tick after resume reports.
            Status::Paused => continue,
            Status::Created | Status::Running => {}
        }
        match container.stats() {
            Ok(stats) => {
                // runc reports OOM kills as they happen; the cgroup's count shows them here.
                if oom_kills.is_some_and(|seen| stats.oom_kills > seen) {
                    print(&Event {
                        kind: "oom",
                        id,
                        data: None,
                    });
                }
                oom_kills = Some(stats.oom_kills);
                print(&stats_event(id, &stats));
            }
            // The container may have stopped between the check and the request.
            Err(_) if status(&path, &record) == Status::Stopped => return Ok(()),
            // runc logs a failed collection and goes on.
            Err(e) => tracing::error!("{e}"),
        }
    }
}

fn print(event: &Event) {
    println!("{}", serde_json::to_string(event).unwrap_or_default());
}

/// runc's `types.Event`.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Stats>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The part of runc's `types.Stats` a v2 cgroup gives, with runc's JSON names and its
/// `omitempty` fields left out when zero.
#[derive(Serialize, Default, Debug)]
struct Stats {
    cpu: Cpu,
    memory: Memory,
    pids: Pids,
    blkio: BTreeMap<String, ()>,
    hugetlb: BTreeMap<String, ()>,
}

#[derive(Serialize, Default, Debug)]
struct Cpu {
    usage: CpuUsage,
    throttling: Throttling,
}

/// Nanoseconds.
#[derive(Serialize, Default, Debug)]
struct CpuUsage {
    #[serde(skip_serializing_if = "is_zero")]
    total: u64,
    kernel: u64,
    user: u64,
}

#[derive(Serialize, Default, Debug)]
#[serde(rename_all = "camelCase")]
struct Throttling {
    #[serde(skip_serializing_if = "is_zero")]
    periods: u64,
    #[serde(skip_serializing_if = "is_zero")]
    throttled_periods: u64,
    /// Nanoseconds.
    #[serde(skip_serializing_if = "is_zero")]
    throttled_time: u64,
}

#[derive(Serialize, Default, Debug)]
struct Memory {
    #[serde(skip_serializing_if = "is_zero")]
    cache: u64,
    usage: MemoryEntry,
    swap: MemoryEntry,
    kernel: MemoryEntry,
    #[serde(rename = "kernelTCP")]
    kernel_tcp: MemoryEntry,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    raw: BTreeMap<String, u64>,
}

#[derive(Serialize, Default, Debug)]
struct MemoryEntry {
    limit: u64,
    #[serde(skip_serializing_if = "is_zero")]
    usage: u64,
    #[serde(skip_serializing_if = "is_zero")]
    max: u64,
    failcnt: u64,
}

#[derive(Serialize, Default, Debug)]
struct Pids {
    #[serde(skip_serializing_if = "is_zero")]
    current: u64,
    #[serde(skip_serializing_if = "is_zero")]
    limit: u64,
}

/// runc's conversion of a v2 cgroup (libcontainer/cgroups/fs2): µs become ns; an unlimited
/// memory.max is the largest u64 and an unlimited pids.max is 0; swap is memory plus swap, as
/// v1 counted it, and the guest has no swap.
fn stats_event<'a>(id: &'a str, s: &ContainerStats) -> Event<'a> {
    let memory_limit = s.memory_max.unwrap_or(u64::MAX);
    let usage = MemoryEntry {
        limit: memory_limit,
        usage: s.memory_current,
        max: s.memory_peak.unwrap_or(0),
        failcnt: s.memory_max_events,
    };
    let swap = MemoryEntry {
        limit: memory_limit,
        usage: s.memory_current,
        ..MemoryEntry::default()
    };
    Event {
        kind: "stats",
        id,
        data: Some(Stats {
            cpu: Cpu {
                usage: CpuUsage {
                    total: s.cpu_usage_usec.saturating_mul(1000),
                    kernel: s.cpu_system_usec.saturating_mul(1000),
                    user: s.cpu_user_usec.saturating_mul(1000),
                },
                throttling: Throttling {
                    periods: s.cpu_nr_periods,
                    throttled_periods: s.cpu_nr_throttled,
                    throttled_time: s.cpu_throttled_usec.saturating_mul(1000),
                },
            },
            memory: Memory {
                cache: s.memory_stat.get("file").copied().unwrap_or(0),
                usage,
                swap,
                raw: s.memory_stat.clone(),
                ..Memory::default()
            },
            pids: Pids {
                current: s.pids_current,
                limit: s.pids_max.unwrap_or(0),
            },
            ..Stats::default()
        }),
    }
}

/// A Go `time.Duration` string, as runc's `--interval` takes it: `5s`, `1m30s`, `1.5h`,
/// `250ms` (units ns, us, µs, ms, s, m, h), or a bare `0`.
fn parse_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, after) = rest.split_at(split);
        let number: f64 = number.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * seconds;
        rest = after;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_go() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "5", "s", "5x", "-1s", "1..5s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn stats_have_runcs_shape() {
        let stats = ContainerStats {
            memory_current: 4 << 20,
            memory_max: Some(64 << 20),
            oom_kills: 0,
            cpu_usage_usec: 3000,
            pids_current: 2,
            pids_max: None,
            cpu_user_usec: 2000,
            cpu_system_usec: 1000,
            memory_peak: Some(5 << 20),
            memory_max_events: 1,
            memory_stat: [("anon".to_owned(), 4096), ("file".to_owned(), 8192)].into(),
            ..ContainerStats::default()
        };
        let json = serde_json::to_value(stats_event("c1", &stats)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "stats",
                "id": "c1",
                "data": {
                    "cpu": {
                        "usage": {"total": 3_000_000, "kernel": 1_000_000, "user": 2_000_000},
                        "throttling": {},
                    },
                    "memory": {
                        "cache": 8192,
                        "usage": {"limit": 64 << 20, "usage": 4 << 20, "max": 5 << 20, "failcnt": 1},
                        "swap": {"limit": 64 << 20, "usage": 4 << 20, "failcnt": 0},
                        "kernel": {"limit": 0, "failcnt": 0},
                        "kernelTCP": {"limit": 0, "failcnt": 0},
                        "raw": {"anon": 4096, "file": 8192},
                    },
                    "pids": {"current": 2},
                    "blkio": {},
                    "hugetlb": {},
                },
            })
        );
        // Unlimited memory is the largest u64, as runc reports "max".
        let unlimited =
            serde_json::to_value(stats_event("c1", &ContainerStats::default())).unwrap();
        assert_eq!(unlimited["data"]["memory"]["usage"]["limit"], u64::MAX);
        let oom = serde_json::to_string(&Event {
            kind: "oom",
            id: "c1",
            data: None,
        })
        .unwrap();
        assert_eq!(oom, r#"{"type":"oom","id":"c1"}"#);
    }
}
