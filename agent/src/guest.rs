//! The guest's identity from the host: hostname, wall clock and fresh entropy. A VM restored
//! from a snapshot would otherwise share all three with its siblings.

use std::os::fd::AsRawFd;

use cocoon_agent_protocol::message::{AgentError, ErrorKind, GuestSetup};

/// More than the pool needs to be reseeded; bounds what one request can push through the ioctl.
const MAX_ENTROPY: usize = 4096;

pub fn setup(setup: &GuestSetup) -> Result<(), AgentError> {
    if let Some(hostname) = &setup.hostname {
        if hostname.is_empty() || hostname.len() > 64 {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                "a hostname has 1 to 64 bytes",
            ));
        }
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
    Ok(())
}

fn failed(what: &str) -> AgentError {
    AgentError::new(
        ErrorKind::Failed,
        format!("{what}: {}", std::io::Error::last_os_error()),
    )
}

/// Mixes `bytes` into the pool and credits them, which needs RNDADDENTROPY (a plain write to
/// /dev/urandom mixes without crediting).
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
    Ok(())
}
