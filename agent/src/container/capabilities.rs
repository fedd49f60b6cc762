//! Capability names (as oci-spec spells them) to the kernel's numbers.

use oci_spec::runtime::{Capabilities, Capability};

use super::syscall::CapSets;

/// The kernel's capability numbers (linux/capability.h), by name without `CAP_`.
const NUMBERS: [(&str, u32); 41] = [
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("LINUX_IMMUTABLE", 9),
    ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("IPC_OWNER", 15),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_NICE", 23),
    ("SYS_RESOURCE", 24),
    ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26),
    ("MKNOD", 27),
    ("LEASE", 28),
    ("AUDIT_WRITE", 29),
    ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36),
    ("AUDIT_READ", 37),
    ("PERFMON", 38),
    ("BPF", 39),
    ("CHECKPOINT_RESTORE", 40),
];

pub fn number(cap: Capability) -> Option<u32> {
    let name = cap.to_string();
    NUMBERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
}

/// The highest capability the running kernel knows (read once: it is the kernel's constant).
pub fn last_cap() -> u32 {
    static LAST_CAP: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST_CAP.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
    })
}

fn mask(set: &Option<Capabilities>, last_cap: u32) -> u64 {
    set.iter()
        .flatten()
        .filter_map(|&cap| number(cap))
        .filter(|&n| n <= last_cap)
        .fold(0, |mask, n| mask | 1 << n)
}

/// The five sets from the spec. A process without a `capabilities` object gets none, as runc
/// does.
pub fn from_spec(caps: Option<&oci_spec::runtime::LinuxCapabilities>, last_cap: u32) -> CapSets {
    let Some(caps) = caps else {
        return CapSets::default();
    };
    CapSets {
        bounding: mask(caps.bounding(), last_cap),
        effective: mask(caps.effective(), last_cap),
        permitted: mask(caps.permitted(), last_cap),
        inheritable: mask(caps.inheritable(), last_cap),
        ambient: mask(caps.ambient(), last_cap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_oci_capability_has_a_number() {
        let caps: oci_spec::runtime::LinuxCapabilities = serde_json::from_str(
            r#"{"bounding":["CAP_CHOWN","CAP_KILL","CAP_CHECKPOINT_RESTORE","CAP_BPF"],
                "effective":["CAP_NET_BIND_SERVICE"]}"#,
        )
        .unwrap();
        let sets = from_spec(Some(&caps), 40);
        assert_eq!(sets.bounding, 1 | 1 << 5 | 1 << 40 | 1 << 39);
        assert_eq!(sets.effective, 1 << 10);
        assert_eq!(sets.ambient, 0);
        // A kernel that does not know a capability never gets asked for it.
        assert_eq!(from_spec(Some(&caps), 38).bounding, 1 | 1 << 5);
    }
}
