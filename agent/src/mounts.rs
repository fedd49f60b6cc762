//! The pseudo filesystems every guest needs before anything else.

use std::ffi::CString;

#[derive(Debug, thiserror::Error)]
#[error("cannot mount {fstype} on {target}: {source}")]
pub struct MountError {
    fstype: &'static str,
    target: &'static str,
    source: std::io::Error,
}

const PSEUDO: [(&str, &str, libc::c_ulong); 5] = [
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
    // Containers get cgroups under the unified hierarchy and ptys from here.
    (
        "cgroup2",
        "/sys/fs/cgroup",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    ("devpts", "/dev/pts", libc::MS_NOSUID | libc::MS_NOEXEC),
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

/// Makes the agent's root a bind mount of the initramfs instead of the initramfs itself.
///
/// pivot_root(2) refuses to move a root that is the initial rootfs (it has no parent mount),
/// and every container's setup pivots away from the agent's root. Moving a bind mount of `/`
/// over `/` and chrooting into it is how switch_root does it, without copying any file.
pub fn leave_initramfs() -> Result<(), MountError> {
    let c = |s: &str| CString::new(s).expect("static path has no NUL");
    let (root, sysroot, dot) = (c("/"), c("/sysroot"), c("."));
    let fail = |target: &'static str| MountError {
        fstype: "bind",
        target,
        source: std::io::Error::last_os_error(),
    };
    let _ = std::fs::create_dir_all("/sysroot");
    // SAFETY: plain mount/chdir/chroot calls with NUL-terminated strings alive for each call.
    unsafe {
        if libc::mount(
            root.as_ptr(),
            sysroot.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail("/sysroot"));
        }
        if libc::chdir(sysroot.as_ptr()) != 0
            || libc::mount(
                dot.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) != 0
            || libc::chroot(dot.as_ptr()) != 0
            || libc::chdir(root.as_ptr()) != 0
        {
            return Err(fail("/"));
        }
    }
    Ok(())
}
