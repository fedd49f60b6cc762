//! `cocoon update`: new limits for a container's cgroup, which lives in the guest, so the agent
//! writes them. As with runc: flags, or with `--resources` an OCI `linux.resources` JSON
//! (containerd's runc shim sends `update --resources - ID` with the JSON on stdin, and then the
//! flags are ignored).

use std::io::Read;

use clap::Args;
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxPids, LinuxResources};

use super::Global;
use crate::error::CliError;
use crate::state::{ContainerDir, Status, VSOCK_SOCKET, status};

/// Flags of `update`, as runc has them (runc's `--cpu-share`, also as `--cpu-shares`). Values
/// are parsed here, not by clap, so a bad one is one error line and exit status 1.
#[derive(Args, Debug, Clone)]
pub struct UpdateArgs {
    /// A file with the new resources as OCI `linux.resources` JSON, or `-` for stdin; the
    /// other flags are then ignored.
    #[arg(short, long, value_name = "FILE|-")]
    pub resources: Option<String>,
    /// Memory limit: bytes or a size such as 64m, 1.5g; -1 for unlimited.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory plus swap (the guest has no swap: checked, then moot).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// Memory reservation (memory.low).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// CPU time allowed per period, in µs; -1 for unlimited.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub cpu_quota: Option<String>,
    /// CPU period, in µs.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub cpu_period: Option<String>,
    /// CPU shares (relative weight).
    #[arg(long = "cpu-share", visible_alias = "cpu-shares", value_name = "N")]
    #[arg(allow_hyphen_values = true)]
    pub cpu_share: Option<String>,
    /// Maximum number of processes; -1 for unlimited.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub pids_limit: Option<String>,
    pub id: String,
}

pub fn update(global: &Global, args: &UpdateArgs) -> Result<(), CliError> {
    let resources = match &args.resources {
        Some(source) => read_resources(source)?,
        None => from_flags(args)?,
    };
    let dir = ContainerDir::open(&global.root, &args.id)?;
    let record = dir.read()?;
    match status(&dir.path, &record) {
        Status::Stopped => Err(CliError::NotRunning),
        // The agent answers only while the vCPUs run.
        Status::Paused => Err(CliError::Paused(args.id.clone())),
        // Unlocked: a guest that does not answer must not hold off kill or delete.
        Status::Created | Status::Running => dir.unlocked(|| {
            crate::cli::container_at(&dir.file(VSOCK_SOCKET), &args.id).update(&resources)
        })?,
    }
}

/// The JSON of `--resources`. Keys the spec does not have are ignored, as runc's decoder
/// ignores them.
fn read_resources(source: &str) -> Result<LinuxResources, CliError> {
    let text = if source == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(CliError::io("read", "stdin"))?;
        text
    } else {
        std::fs::read_to_string(source).map_err(CliError::io("read", source))?
    };
    parse_resources(&text).map_err(|e| {
        let name = if source == "-" { "stdin" } else { source };
        CliError::InvalidResources(format!("{name}: {e}"))
    })
}

fn parse_resources(text: &str) -> Result<LinuxResources, serde_json::Error> {
    serde_json::from_str(text)
}

fn from_flags(args: &UpdateArgs) -> Result<LinuxResources, CliError> {
    let mut resources = LinuxResources::default();
    let (memory, swap, reservation) = (
        flag("memory", &args.memory, parse_memory)?,
        flag("memory-swap", &args.memory_swap, parse_memory)?,
        flag("memory-reservation", &args.memory_reservation, parse_memory)?,
    );
    if memory.is_some() || swap.is_some() || reservation.is_some() {
        let mut m = LinuxMemory::default();
        m.set_limit(memory)
            .set_swap(swap)
            .set_reservation(reservation);
        resources.set_memory(Some(m));
    }
    let (quota, period, shares) = (
        flag("cpu-quota", &args.cpu_quota, |v| v.parse::<i64>().ok())?,
        flag("cpu-period", &args.cpu_period, |v| v.parse::<u64>().ok())?,
        flag("cpu-share", &args.cpu_share, |v| v.parse::<u64>().ok())?,
    );
    if quota.is_some() || period.is_some() || shares.is_some() {
        let mut cpu = LinuxCpu::default();
        cpu.set_quota(quota).set_period(period).set_shares(shares);
        resources.set_cpu(Some(cpu));
    }
    if let Some(limit) = flag("pids-limit", &args.pids_limit, |v| v.parse::<i64>().ok())? {
        let mut pids = LinuxPids::default();
        pids.set_limit(limit);
        resources.set_pids(Some(pids));
    }
    Ok(resources)
}

fn flag<T>(
    name: &str,
    value: &Option<String>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, CliError> {
    value
        .as_deref()
        .map(|v| parse(v).ok_or_else(|| CliError::InvalidResources(format!("--{name} {v:?}"))))
        .transpose()
}

/// A memory flag: `-1` (unlimited) or a size as runc reads it (go-units' RAMInBytes).
fn parse_memory(value: &str) -> Option<i64> {
    if value == "-1" {
        return Some(-1);
    }
    parse_size(value)
}

/// A size in bytes with an optional binary unit: `1024`, `64m`, `64MiB`, `1.5g`, `2 GB`
/// (k, m, g, t, p are powers of 1024, with or without `i` and `b`). Fractions round down.
pub fn parse_size(value: &str) -> Option<i64> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return None,
    };
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let bytes = if let Some((whole, fraction)) = number.split_once('.') {
        let whole: u64 = whole.parse().ok()?;
        let fraction: f64 = format!("0.{fraction}").parse().ok()?;
        let scale = (1u64 << shift) as f64;
        (whole as f64 * scale + fraction * scale) as u64
    } else {
        number.parse::<u64>().ok()?.checked_mul(1 << shift)?
    };
    i64::try_from(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn sizes_read_like_go_units() {
        assert_eq!(parse_size("67108864"), Some(67_108_864));
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("64mb"), Some(64 << 20));
        assert_eq!(parse_size("2 g"), Some(2 << 30));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("10b"), Some(10));
        for bad in [
            "", "m", "-5", "-1", "64x", "1.2.3m", "1..5k", ".5m", "64 mm", "1e3",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
        assert_eq!(parse_size("9999999p"), None, "overflow");
        assert_eq!(parse_memory("-1"), Some(-1));
        assert_eq!(parse_memory("-2"), None);
    }

    fn args(line: &[&str]) -> UpdateArgs {
        let cli = Cli::try_parse_from(["cocoon", "update"].iter().chain(line)).unwrap();
        match cli.command {
            Command::Update(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_become_oci_resources() {
        let r = from_flags(&args(&[
            "--memory",
            "64m",
            "--memory-swap",
            "-1",
            "--cpu-quota",
            "-1",
            "--cpu-period",
            "50000",
            "--cpu-shares",
            "512",
            "--pids-limit",
            "50",
            "c1",
        ]))
        .unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "memory": {"limit": 67108864, "swap": -1},
                "cpu": {"quota": -1, "period": 50000, "shares": 512},
                "pids": {"limit": 50},
            })
        );
        let r = from_flags(&args(&["--pids-limit", "-1", "c1"])).unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap()["pids"]["limit"], -1);
        assert!(r.memory().is_none() && r.cpu().is_none());
    }

    #[test]
    fn bad_flag_values_name_the_flag() {
        for (line, wanted) in [
            (
                ["--memory", "lots", "c1"],
                "invalid resources: --memory \"lots\"",
            ),
            (
                ["--memory", "-5", "c1"],
                "invalid resources: --memory \"-5\"",
            ),
            (
                ["--cpu-period", "-1", "c1"],
                "invalid resources: --cpu-period \"-1\"",
            ),
            (
                ["--pids-limit", "x", "c1"],
                "invalid resources: --pids-limit \"x\"",
            ),
        ] {
            let err = from_flags(&args(&line)).unwrap_err();
            assert_eq!(err.to_string(), wanted);
        }
    }

    #[test]
    fn engine_command_lines_parse() {
        // go-runc's Update, which containerd's runc shim calls.
        assert_eq!(
            args(&["--resources=-", "c1"]).resources.as_deref(),
            Some("-")
        );
        assert_eq!(
            args(&["-r", "/tmp/r.json", "c1"]).resources.as_deref(),
            Some("/tmp/r.json")
        );
    }

    #[test]
    fn resources_json_ignores_unknown_keys_and_refuses_malformed_json() {
        let r = parse_resources(r#"{"memory":{"limit":1048576},"rdma":{},"futureKey":1}"#).unwrap();
        assert_eq!(r.memory().unwrap().limit(), Some(1 << 20));
        assert!(parse_resources(r#"{"memory":{"limit":"64m"}}"#).is_err());
        assert!(parse_resources("{").is_err());
    }
}
