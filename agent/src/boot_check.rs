//! The boot self-check (see `cocoon_agent_protocol::boot_check`): optionally write the test
//! pattern to a disk, then read every virtio disk whole and report its checksum.

use std::fs::OpenOptions;
use std::io::{Read, Write};

use cocoon_agent_protocol::boot_check::{Fnv1a64, HWRNG_SAMPLE, disk_line, hwrng_line, pattern};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `cocoon.write=vdX:LEN`
    pub write: Option<(String, usize)>,
    /// `cocoon.panic=1`
    pub panic: bool,
    /// `cocoon.selftest=1`: serve the device self-test over vsock instead of the agent protocol.
    pub selftest: bool,
    /// `cocoon.check=1`: run the boot self-check and power off.
    pub check: bool,
}

impl Options {
    pub fn from_cmdline(cmdline: &str) -> Options {
        let mut options = Options::default();
        for word in cmdline.split_whitespace() {
            if let Some(spec) = word.strip_prefix("cocoon.write=") {
                if let Some((dev, Ok(len))) = spec
                    .split_once(':')
                    .map(|(dev, len)| (dev, len.parse::<usize>()))
                    && is_disk_name(dev)
                {
                    options.write = Some((dev.to_owned(), len));
                }
            } else if word == "cocoon.panic=1" {
                options.panic = true;
            } else if word == "cocoon.selftest=1" {
                options.selftest = true;
            } else if word == "cocoon.check=1" {
                options.check = true;
            }
        }
        options
    }
}

/// `vd` followed by lowercase letters: a virtio disk, nothing that could walk out of /dev.
fn is_disk_name(name: &str) -> bool {
    name.strip_prefix("vd")
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Runs the check; returns the lines to print.
pub fn run(options: &Options) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some((dev, len)) = &options.write {
        let result = OpenOptions::new()
            .write(true)
            .open(format!("/dev/{dev}"))
            .and_then(|mut f| f.write_all(&pattern(*len)).and_then(|()| f.sync_all()));
        lines.push(match result {
            Ok(()) => format!("cocoon-agent: wrote {len} bytes to {dev}"),
            Err(e) => format!("cocoon-agent: cannot write {dev}: {e}"),
        });
    }
    if let Some(line) = hwrng() {
        lines.push(line);
    }
    lines.push(crate::cpu::ExtendedState::read().line());
    let mut disks: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| is_disk_name(n))
                .collect()
        })
        .unwrap_or_default();
    disks.sort();
    for name in disks {
        lines.push(match checksum(&format!("/dev/{name}")) {
            Ok((bytes, sum)) => disk_line(&name, bytes, sum),
            Err(e) => format!("cocoon-agent: cannot read {name}: {e}"),
        });
    }
    lines
}

/// Reads from /dev/hwrng when the VM has an entropy device.
fn hwrng() -> Option<String> {
    let mut file = std::fs::File::open("/dev/hwrng").ok()?;
    let mut buf = [0u8; HWRNG_SAMPLE];
    match file.read_exact(&mut buf) {
        Ok(()) => Some(hwrng_line(
            buf.len(),
            buf.iter().filter(|b| **b != 0).count(),
        )),
        // The node exists whenever the kernel has the hwrng core; ENODEV: no device behind it.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => None,
        Err(e) => Some(format!("cocoon-agent: cannot read /dev/hwrng: {e}")),
    }
}

fn checksum(path: &str) -> std::io::Result<(u64, u64)> {
    Fnv1a64::of_reader(&mut std::fs::File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed_and_hostile_names_refused() {
        let o = Options::from_cmdline("quiet cocoon.write=vdb:4096 cocoon.panic=1");
        assert_eq!(
            o,
            Options {
                write: Some(("vdb".into(), 4096)),
                panic: true,
                selftest: false,
                check: false,
            }
        );
        assert!(Options::from_cmdline("cocoon.selftest=1").selftest);
        assert_eq!(Options::from_cmdline("cocoon.write=../sda:1").write, None);
        assert_eq!(Options::from_cmdline("cocoon.write=vd:1").write, None);
        assert_eq!(Options::from_cmdline("cocoon.write=vdb:x").write, None);
        assert!(!Options::from_cmdline("cocoon.panic=0").panic);
    }
}
