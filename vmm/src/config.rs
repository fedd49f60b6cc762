//! What a VM is made of, as the user asked for it, validated before anything is created.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::mptable::MAX_CPUS;

/// Smallest guest: the kernel loads at 16 MiB and needs room to unpack the initramfs.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest we accept.
pub const MAX_MEMORY_MIB: u64 = 256 * 1024;
pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub const DEFAULT_CPUS: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// `PATH[,ro|,rw]`: a path and whether it is read-only; `what` names it in errors.
fn path_and_mode(s: &str, what: &str) -> Result<(PathBuf, bool), String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, other)) => {
            return Err(format!(
                "unknown {what} option {other:?} (expected ro or rw)"
            ));
        }
        None => (s, false),
    };
    if path.is_empty() {
        return Err(format!("{what} path is empty"));
    }
    Ok((PathBuf::from(path), read_only))
}

impl FromStr for DiskConfig {
    type Err = String;

    /// `PATH[,ro|,rw]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = path_and_mode(s, "disk")?;
        Ok(DiskConfig { path, read_only })
    }
}

/// `--share NAME=PATH[,ro|,rw]`: a host directory or file the guest sees as `/NAME` of the
/// virtio-fs mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareConfig {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
}

impl FromStr for ShareConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s.split_once('=').ok_or("expected NAME=PATH[,ro]")?;
        let (path, read_only) = path_and_mode(rest, "share")?;
        Ok(ShareConfig {
            name: name.into(),
            path,
            read_only,
        })
    }
}

/// `--fs TAG`: a virtio-fs device the guest mounts with `mount -t virtiofs TAG DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub shares: Vec<ShareConfig>,
}

/// `--vsock CID,PATH`: the guest's context id and the host-side Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
}

/// Context ids 0-2 are reserved (hypervisor, local, host); the kernel keeps u32::MAX as "any".
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

impl FromStr for VsockConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (cid, path) = s.split_once(',').ok_or("expected CID,PATH")?;
        let cid: u64 = cid
            .parse()
            .map_err(|_| format!("vsock CID {cid:?} is not a number"))?;
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(format!(
                "vsock CID must be between {MIN_GUEST_CID} and {MAX_GUEST_CID}, got {cid}"
            ));
        }
        if path.is_empty() {
            return Err("vsock socket path is empty".into());
        }
        Ok(VsockConfig {
            cid,
            uds: PathBuf::from(path),
        })
    }
}

/// Where a NIC's frames go on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TapSource {
    /// Attach to (or create) the TAP device of this name, in the VMM's network namespace.
    Name(String),
    /// An open TAP fd of this process, opened by the caller (perhaps in another network
    /// namespace) with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. The VMM duplicates it (close-on-exec)
    /// and owns the duplicate; the caller keeps and closes its own. The duplicate shares the
    /// caller's open file description, so it is made non-blocking for both.
    Fd(i32),
    /// No host side (yet): frames the guest sends are counted and dropped, none arrive. A
    /// template's NICs are saved this way, and each clone is restored with its own TAP.
    Detached,
}

/// `--net TAP[,MAC]`, `--net fd=N[,MAC]` or `--net none[,MAC]`: the host side of a NIC and the
/// MAC the guest sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: [u8; 6],
}

/// Used when `--net` names no MAC: locally administered, unicast.
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0xc0, 0xc0, 0x00, 0x00, 0x01];

impl FromStr for NetConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tap, mac) = match s.split_once(',') {
            Some((tap, mac)) => (tap, parse_mac(mac)?),
            None => (s, DEFAULT_MAC),
        };
        let tap = if tap == "none" {
            TapSource::Detached
        } else if let Some(fd) = tap.strip_prefix("fd=") {
            let fd = fd
                .parse::<i32>()
                .ok()
                .filter(|&fd| fd >= 0)
                .ok_or_else(|| format!("TAP fd {fd:?} is not a file descriptor number"))?;
            TapSource::Fd(fd)
        } else {
            if tap.is_empty() || tap.len() > 15 {
                return Err(format!("TAP name {tap:?} must be 1 to 15 bytes"));
            }
            TapSource::Name(tap.into())
        };
        Ok(NetConfig { tap, mac })
    }
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("MAC address {text:?} is not six hex bytes like 02:00:00:00:00:01");
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {text} is multicast"));
    }
    Ok(mac)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleConfig {
    Stdout,
    Off,
    File(PathBuf),
}

impl FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(ConsoleConfig::Stdout),
            "off" => Ok(ConsoleConfig::Off),
            "" => Err("console must be stdout, off or a file path".into()),
            path => Ok(ConsoleConfig::File(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleConfig::Stdout => write!(f, "stdout"),
            ConsoleConfig::Off => write!(f, "off"),
            ConsoleConfig::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    pub rng: bool,
    /// A virtio-vsock device with its host side on a Unix socket.
    pub vsock: Option<VsockConfig>,
    /// virtio-net devices (`net0`, `net1`, ... in this order; the guest's eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// A virtio-fs device (`fs0`) with the host directories and files it shares.
    #[serde(default)]
    pub fs: Option<FsConfig>,
    pub console: ConsoleConfig,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u64),
    #[error("--memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u64),
    #[error("too many devices: {0} (at most {max} disks and other virtio devices)", max = crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES)]
    TooManyDevices(usize),
    #[error("kernel image {0} does not exist or is not a file")]
    MissingKernel(PathBuf),
    #[error("initramfs {0} does not exist or is not a file")]
    MissingInitrd(PathBuf),
}

impl VmConfig {
    /// Checks sizes and that the files exist, so mistakes are reported before KVM is touched.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(self.cpus.into()));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.virtio_devices() > crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(self.virtio_devices()));
        }
        if !self.kernel.is_file() {
            return Err(ConfigError::MissingKernel(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd
            && !initrd.is_file()
        {
            return Err(ConfigError::MissingInitrd(initrd.clone()));
        }
        Ok(())
    }

    /// How many virtio-mmio devices the VM gets (each takes an IRQ).
    pub fn virtio_devices(&self) -> usize {
        self.disks.len()
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some())
            + self.nets.len()
            + usize::from(self.fs.is_some())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert_eq!(
            "a.img".parse(),
            Ok(DiskConfig {
                path: "a.img".into(),
                read_only: false
            })
        );
        assert_eq!(
            "/x/a.img,ro".parse(),
            Ok(DiskConfig {
                path: "/x/a.img".into(),
                read_only: true
            })
        );
        assert_eq!(
            "a,b.img,rw".parse(),
            Ok(DiskConfig {
                path: "a,b.img".into(),
                read_only: false
            })
        );
        assert!("a.img,rox".parse::<DiskConfig>().is_err());
        assert!(",ro".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn vsock_specs() {
        assert_eq!(
            "3,/tmp/v.sock".parse(),
            Ok(VsockConfig {
                cid: 3,
                uds: "/tmp/v.sock".into()
            })
        );
        assert!("2,/tmp/v.sock".parse::<VsockConfig>().is_err());
        assert!("4294967295,/tmp/v".parse::<VsockConfig>().is_err());
        assert!("x,/tmp/v".parse::<VsockConfig>().is_err());
        assert!("3,".parse::<VsockConfig>().is_err());
        assert!("3".parse::<VsockConfig>().is_err());
    }

    #[test]
    fn share_specs() {
        assert_eq!(
            "data=/srv/data,ro".parse(),
            Ok(ShareConfig {
                name: "data".into(),
                path: "/srv/data".into(),
                read_only: true
            })
        );
        assert_eq!(
            "a=/x=y".parse::<ShareConfig>().map(|s| (s.name, s.path)),
            Ok(("a".into(), "/x=y".into()))
        );
        assert!("/srv/data".parse::<ShareConfig>().is_err());
        assert!("data=".parse::<ShareConfig>().is_err());
        assert!("data=/srv,rx".parse::<ShareConfig>().is_err());
    }

    #[test]
    fn net_specs() {
        let named = |tap: &str, mac| NetConfig {
            tap: TapSource::Name(tap.into()),
            mac,
        };
        assert_eq!("tap0".parse(), Ok(named("tap0", DEFAULT_MAC)));
        assert_eq!(
            "tap0,02:AA:bb:00:00:05".parse(),
            Ok(named("tap0", [2, 0xaa, 0xbb, 0, 0, 5]))
        );
        assert_eq!(
            "fd=7".parse(),
            Ok(NetConfig {
                tap: TapSource::Fd(7),
                mac: DEFAULT_MAC
            })
        );
        assert_eq!(
            "fd=0,02:00:00:00:00:09".parse(),
            Ok(NetConfig {
                tap: TapSource::Fd(0),
                mac: [2, 0, 0, 0, 0, 9]
            })
        );
        assert_eq!(
            "none".parse(),
            Ok(NetConfig {
                tap: TapSource::Detached,
                mac: DEFAULT_MAC
            })
        );
        assert_eq!(
            "none,02:00:00:00:00:03".parse(),
            Ok(NetConfig {
                tap: TapSource::Detached,
                mac: [2, 0, 0, 0, 0, 3]
            })
        );
        for bad in ["fd=", "fd=-1", "fd=x", "fd=99999999999", "fd=3,02:00"] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
        assert!(
            "tap0,01:00:00:00:00:00".parse::<NetConfig>().is_err(),
            "multicast"
        );
        assert!("none,01:00:00:00:00:00".parse::<NetConfig>().is_err());
        assert!("tap0,02:00:00:00:00".parse::<NetConfig>().is_err());
        assert!("tap0,02:00:00:00:00:zz".parse::<NetConfig>().is_err());
        assert!("averyveryverylongtapname".parse::<NetConfig>().is_err());
        assert!(",02:00:00:00:00:01".parse::<NetConfig>().is_err());
    }

    #[test]
    fn net_configs_go_through_serde() {
        let config = VmConfig {
            nets: vec![
                "tap0".parse().unwrap(),
                "fd=5,02:00:00:00:00:02".parse().unwrap(),
                "none".parse().unwrap(),
            ],
            ..config()
        };
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains(r#"{"Fd":5}"#), "{json}");
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), config);
        let bytes = postcard::to_allocvec(&config).unwrap();
        assert_eq!(postcard::from_bytes::<VmConfig>(&bytes).unwrap(), config);
        assert_eq!(config.virtio_devices(), 3);
    }

    #[test]
    fn console_specs() {
        assert_eq!("off".parse(), Ok(ConsoleConfig::Off));
        assert_eq!("stdout".parse(), Ok(ConsoleConfig::Stdout));
        assert_eq!(
            "/tmp/c.log".parse(),
            Ok(ConsoleConfig::File("/tmp/c.log".into()))
        );
        assert!("".parse::<ConsoleConfig>().is_err());
    }

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/proc/self/exe".into(),
            initrd: None,
            cmdline: None,
            cpus: 1,
            memory_mib: 128,
            disks: vec![],
            rng: false,
            vsock: None,
            nets: Vec::new(),
            fs: None,
            console: ConsoleConfig::Off,
        }
    }

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(
            VmConfig {
                cpus: 0,
                ..config()
            }
            .validate(),
            Err(ConfigError::Cpus(0))
        );
        assert_eq!(
            VmConfig {
                cpus: 33,
                ..config()
            }
            .validate(),
            Err(ConfigError::Cpus(33))
        );
        assert_eq!(
            VmConfig {
                memory_mib: 8,
                ..config()
            }
            .validate(),
            Err(ConfigError::Memory(8))
        );
        assert_eq!(
            VmConfig {
                memory_mib: MAX_MEMORY_MIB + 1,
                ..config()
            }
            .validate(),
            Err(ConfigError::Memory(MAX_MEMORY_MIB + 1))
        );
    }

    #[test]
    fn missing_files_are_named() {
        let c = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::MissingKernel("/nonexistent/vmlinux".into()))
        );
        let c = VmConfig {
            initrd: Some("/tmp".into()),
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::MissingInitrd("/tmp".into())));
    }
}
