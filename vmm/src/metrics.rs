//! Figures the VMM reports about its own run (`--metrics FILE`), for the benchmark.

use std::fmt::Write as _;
use std::time::Duration;

use crate::lifecycle::{ExitReason, Lifecycle};

/// Resident memory of this process in KiB, leaving out every mapping inside the `(start, len)`
/// ranges of `excluded` (guest RAM, which may be split into several mappings), from
/// /proc/self/smaps.
pub fn rss_excluding_kib(excluded: &[(usize, usize)]) -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(rss_from_smaps(&smaps, excluded))
}

fn rss_from_smaps(smaps: &str, excluded: &[(usize, usize)]) -> u64 {
    let mut total = 0;
    let mut counting = true;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _end)) = first
            .split_once('-')
            .filter(|(s, _)| s.chars().all(|c| c.is_ascii_hexdigit()))
        {
            let start = usize::from_str_radix(start, 16).unwrap_or(0);
            counting = !excluded
                .iter()
                .any(|(base, len)| (*base..base + len).contains(&start));
        } else if let Some(rest) = line.strip_prefix("Rss:")
            && counting
        {
            total += rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}

fn micros(d: Option<Duration>) -> String {
    d.map_or("null".into(), |d| d.as_micros().to_string())
}

/// The metrics as one JSON object.
pub fn to_json(lifecycle: &Lifecycle, reason: &ExitReason, rss_kib: Option<u64>) -> String {
    to_json_named(lifecycle, reason.name(), rss_kib)
}

/// [`to_json`] with the exit reason's name given by the caller, which may know more than the
/// VM did (the VMM binary reports a stop it made on a signal as `signalled`).
pub fn to_json_named(lifecycle: &Lifecycle, exit_reason: &str, rss_kib: Option<u64>) -> String {
    let mut s = String::from("{");
    let _ = write!(s, "\"exit_reason\":\"{exit_reason}\",");
    let _ = write!(s, "\"first_kvm_run_us\":{},", micros(lifecycle.first_run()));
    let _ = write!(s, "\"agent_up_us\":{},", micros(lifecycle.agent_up()));
    let wall = |d: Option<Duration>| d.map_or("null".into(), |d| lifecycle.wall_ns(d).to_string());
    let _ = write!(
        s,
        "\"first_kvm_run_unix_ns\":{},",
        wall(lifecycle.first_run())
    );
    let _ = write!(s, "\"agent_up_unix_ns\":{},", wall(lifecycle.agent_up()));
    let _ = write!(
        s,
        "\"rss_excluding_guest_kib\":{},",
        rss_kib.map_or("null".into(), |r| r.to_string())
    );
    s.push_str("\"exits\":{");
    let exits: Vec<String> = lifecycle
        .exits
        .snapshot()
        .iter()
        .map(|(name, n)| format!("\"{name}\":{n}"))
        .collect();
    s.push_str(&exits.join(","));
    s.push_str("}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r-xp 00000000 08:01 123 /usr/bin/cocoon-vmm
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               65536 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";

    #[test]
    fn guest_memory_is_left_out() {
        assert_eq!(rss_from_smaps(SMAPS, &[]), 300 + 65536 + 12);
        assert_eq!(
            rss_from_smaps(SMAPS, &[(0x7f00_0000_0000, 0x800_0000)]),
            312
        );
        // A guest mapping split in two (kernel pages mapped from the image) is left out whole.
        let split = SMAPS.replace("7f0000000000-7f0008000000", "7f0000000000-7f0004000000")
            + "7f0004000000-7f0008000000 rw-p 00000000 08:01 7 /vmlinux\nRss:  4096 kB\n";
        assert_eq!(
            rss_from_smaps(&split, &[(0x7f00_0000_0000, 0x800_0000)]),
            312
        );
    }

    #[test]
    fn json_has_every_field() {
        let (l, _rx) = Lifecycle::new(std::time::Instant::now(), std::time::SystemTime::now());
        l.mark_first_run();
        let json = to_json(&l, &ExitReason::PoweredOff, Some(1234));
        assert!(json.starts_with("{\"exit_reason\":\"powered_off\""));
        assert!(json.contains("\"agent_up_us\":null"));
        assert!(json.contains("\"rss_excluding_guest_kib\":1234"));
        assert!(json.contains("\"io_out\":0"));
        assert!(json.ends_with("}}"));
    }
}
