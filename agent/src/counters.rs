//! What the guest has spent so far ([`GuestCounters`]), from what the kernel keeps anyway: the
//! host reads it before and after a request to see what the request cost inside the guest.

use cocoon_agent_protocol::message::GuestCounters;

pub fn read() -> GuestCounters {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let own = rusage(libc::RUSAGE_SELF);
    let children = rusage(libc::RUSAGE_CHILDREN);
    let both = |f: fn(&libc::rusage) -> i64| (f(&own).max(0) + f(&children).max(0)) as u64;
    let cpu_us = |r: &libc::rusage| {
        let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
        us(r.ru_utime) + us(r.ru_stime)
    };
    GuestCounters {
        forks: stat_value(&stat, "processes").unwrap_or(0),
        minor_faults: both(|r| r.ru_minflt),
        major_faults: both(|r| r.ru_majflt),
        context_switches: both(|r| r.ru_nvcsw + r.ru_nivcsw),
        cpu_us: both(cpu_us),
        guest_cpu_us: busy_ticks(&stat) * 1_000_000 / clock_ticks_per_second(),
        read_syscalls: stat_value(&io, "syscr:").unwrap_or(0),
        write_syscalls: stat_value(&io, "syscw:").unwrap_or(0),
    }
}

fn rusage(who: libc::c_int) -> libc::rusage {
    // SAFETY: rusage is plain data; all-zero is a valid value for the kernel to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: usage is a valid out-parameter; getrusage fails only for an invalid `who`.
    unsafe { libc::getrusage(who, &mut usage) };
    usage
}

/// USER_HZ, the unit of /proc/stat's times (100 on every Linux the guest runs).
fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as u64 } else { 100 }
}

/// The number after `key` on the line that starts with it (`processes N`, `syscr: N`).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(key)).then(|| fields.next()?.parse().ok())?
    })
}

/// The aggregate `cpu` line's non-idle time: user, nice, system, irq, softirq and steal (idle
/// and iowait are time nothing ran; guest time is already inside user).
fn busy_ticks(stat: &str) -> u64 {
    let Some(line) = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
    else {
        return 0;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  10 2 30 4000 50 6 7 8 9 1\n\
        cpu0 5 1 15 2000 25 3 3 4 0 0\n\
        intr 12345 0 1\nctxt 999\nbtime 1700000000\nprocesses 321\nprocs_running 1\n";

    #[test]
    fn the_cpu_line_counts_everything_but_idle_and_iowait() {
        assert_eq!(busy_ticks(STAT), 10 + 2 + 30 + 6 + 7 + 8);
        assert_eq!(busy_ticks("cpu0 1 2 3\n"), 0);
        assert_eq!(busy_ticks("cpu 1 2\n"), 3);
    }

    #[test]
    fn keyed_values_are_found_by_their_whole_key() {
        assert_eq!(stat_value(STAT, "processes"), Some(321));
        assert_eq!(stat_value(STAT, "procs"), None);
        let io = "rchar: 100\nwchar: 50\nsyscr: 12\nsyscw: 7\n";
        assert_eq!(stat_value(io, "syscr:"), Some(12));
        assert_eq!(stat_value(io, "syscw:"), Some(7));
        assert_eq!(stat_value("", "syscr:"), None);
    }

    #[test]
    fn this_process_has_spent_something() {
        let counters = read();
        assert!(counters.minor_faults > 0, "{counters:?}");
        assert!(
            counters.cpu_us > 0 || counters.context_switches > 0,
            "{counters:?}"
        );
    }
}
