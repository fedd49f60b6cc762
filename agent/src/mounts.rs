//! The pseudo filesystems every guest needs before anything else.

use std::ffi::CString;

#[derive(Debug, thiserror::Error)]
#[error("cannot mount {fstype} on {target}: {source}")]
pub struct MountError {
    fstype: &'static str,
    target: &'static str,
    source: std::io::Error,
}

const PSEUDO: [(&str, &str, libc::c_ulong); 3] = [
    (
        "proc",
        "/proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        "sysfs",
        "/sys",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    ("devtmpfs", "/dev", libc::MS_NOSUID),
];

pub fn mount_pseudo_filesystems() -> Result<(), MountError> {
    for (fstype, target, flags) in PSEUDO {
        let _ = std::fs::create_dir_all(target);
        let c_type = CString::new(fstype).expect("static name has no NUL");
        let c_target = CString::new(target).expect("static path has no NUL");
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data.
        let rc = unsafe {
            libc::mount(
                c_type.as_ptr(),
                c_target.as_ptr(),
                c_type.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            // Already mounted (e.g. devtmpfs automount) is fine.
            if source.raw_os_error() != Some(libc::EBUSY) {
                return Err(MountError {
                    fstype,
                    target,
                    source,
                });
            }
        }
    }
    Ok(())
}
