//! The guest's identity from the host: hostname, wall clock, fresh entropy and the boot id its
//! containers see (a VM restored from a snapshot would otherwise share all four with its
//! siblings), and the engine's network for the containers that share the guest's.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use cocoon_agent_protocol::message::{AgentError, ErrorKind, GuestSetup};

use crate::container::rootfs::RUNTIME_DIR;

/// More than the pool needs to be reseeded; bounds what one request can push through the ioctl.
const MAX_ENTROPY: usize = 4096;

/// Where the host's boot id is kept, for containers to see at
/// `/proc/sys/kernel/random/boot_id`.
pub const BOOT_ID_FILE: &str = "/run/cocoon/boot_id";

static BOOT_ID_SET: AtomicBool = AtomicBool::new(false);

/// The file holding the boot id the host set, if it set one.
pub fn boot_id_file() -> Option<&'static Path> {
    BOOT_ID_SET
        .load(Ordering::Acquire)
        .then(|| Path::new(BOOT_ID_FILE))
}

pub fn setup(setup: &GuestSetup) -> Result<(), AgentError> {
    // Everything is checked before anything changes.
    if let Some(hostname) = &setup.hostname
        && (hostname.is_empty() || hostname.len() > 64)
    {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            "a hostname has 1 to 64 bytes",
        ));
    }
    if let Some(boot_id) = &setup.boot_id
        && !valid_boot_id(boot_id)
    {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            format!("boot id {boot_id:?} is not a lowercase UUID (8-4-4-4-12 hex digits)"),
        ));
    }
    crate::netconf::validate(&setup.network)?;
    if let Some(hostname) = &setup.hostname {
        // SAFETY: pointer and length describe the hostname's bytes.
        if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
            return Err(failed("sethostname"));
        }
    }
    if let Some(ns) = setup.realtime_ns {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: ts is a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(failed("set the clock"));
        }
    }
    if !setup.entropy.is_empty() {
        add_entropy(&setup.entropy[..setup.entropy.len().min(MAX_ENTROPY)])?;
    }
    if let Some(boot_id) = &setup.boot_id {
        store_boot_id(boot_id)?;
    }
    // In the agent's own network namespace, the guest's root one, before the reply: the
    // containers the host creates next find it done, and those sharing it already (a network
    // the engine made after `create`, sent with nothing else set, which changes nothing else
    // above) see it. It also parks the NICs no network names, even for an empty network.
    crate::netconf::apply(&setup.network)?;
    Ok(())
}

/// A UUID as the kernel prints one: 36 characters, lowercase hex in 8-4-4-4-12 groups.
fn valid_boot_id(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// Writes the id where containers created from now on get it. Through a rename, so a container
/// being created meanwhile binds the old file or the new one, never a half-written one.
fn store_boot_id(boot_id: &str) -> Result<(), AgentError> {
    let io = |what: &str, e: std::io::Error| {
        AgentError::new(ErrorKind::Failed, format!("{what} the boot id file: {e}"))
    };
    std::fs::create_dir_all(RUNTIME_DIR).map_err(|e| io("create the directory of", e))?;
    let staged = format!("{BOOT_ID_FILE}.new");
    // The kernel's own file ends in a newline; programs that read it expect one.
    std::fs::write(&staged, format!("{boot_id}\n")).map_err(|e| io("write", e))?;
    std::fs::rename(&staged, BOOT_ID_FILE).map_err(|e| io("replace", e))?;
    BOOT_ID_SET.store(true, Ordering::Release);
    Ok(())
}

fn failed(what: &str) -> AgentError {
    AgentError::new(
        ErrorKind::Failed,
        format!("{what}: {}", std::io::Error::last_os_error()),
    )
}

/// Mixes `bytes` into the pool and credits them, which needs RNDADDENTROPY (a plain write to
/// /dev/urandom mixes without crediting), then reseeds the CRNG from the pool.
fn add_entropy(bytes: &[u8]) -> Result<(), AgentError> {
    // struct rand_pool_info: entropy_count (bits), buf_size (bytes), then the buffer.
    let mut request = Vec::with_capacity(8 + bytes.len());
    request.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    request.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    request.extend_from_slice(bytes);
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| AgentError::new(ErrorKind::Failed, format!("open /dev/urandom: {e}")))?;
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: request is laid out as rand_pool_info with buf_size bytes after the header.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, request.as_ptr()) } != 0 {
        return Err(failed("add entropy"));
    }
    // Credited entropy alone reaches the CRNG only at its next scheduled reseed (up to a
    // minute away): until then a clone's urandom would go on repeating its siblings' output.
    // RNDRESEEDCRNG = _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(failed("reseed the CRNG"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_are_lowercase_uuids() {
        assert!(valid_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
        for bad in [
            "",
            "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f00",
            "0f1e2d3c-4b5a-6978-8796_a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1g0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f\n",
            "../../../../etc/passwd-aaaaaaaaaaaaa",
        ] {
            assert!(!valid_boot_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_boot_id_changes_nothing() {
        let setup = GuestSetup {
            hostname: Some("not-applied".into()),
            realtime_ns: None,
            entropy: Vec::new(),
            boot_id: Some("not-a-uuid".into()),
            network: Default::default(),
        };
        let err = super::setup(&setup).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert!(err.message.contains("not-a-uuid"), "{}", err.message);
        assert!(boot_id_file().is_none());
    }
}
