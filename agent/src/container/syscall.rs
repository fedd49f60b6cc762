//! Every system call container setup makes, behind one trait: [`LinuxSyscall`] makes them,
//! and the tests' `Recorder` writes them down so the order and arguments of mounts, namespace
//! and cgroup operations can be checked without a VM or privileges.

use std::ffi::{CString, OsStr};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl Errno {
    /// The error as Go (and so runc) words it: strerror's text, in lower case, without the
    /// number ("no such file or directory").
    pub fn go_text(&self) -> String {
        let text = std::io::Error::from_raw_os_error(self.0).to_string();
        let text = text.split(" (os error").next().unwrap_or_default();
        let mut chars = text.chars();
        chars
            .next()
            .map(|first| first.to_lowercase().chain(chars).collect())
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type SysResult<T = ()> = Result<T, Errno>;

/// What is at a path, without following a final symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    Symlink,
    Other,
}

/// The five capability sets of a process, as bit masks over capability numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

pub trait Syscall {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> SysResult;
    fn umount(&self, target: &Path, flags: libc::c_int) -> SysResult;
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> SysResult;
    fn chdir(&self, path: &Path) -> SysResult;
    /// Creates one directory; an existing one is not an error.
    fn mkdir(&self, path: &Path, mode: u32) -> SysResult;
    /// Creates an empty file if there is nothing at `path`.
    fn create_file(&self, path: &Path) -> SysResult;
    fn symlink(&self, target: &Path, link: &Path) -> SysResult;
    fn mknod(&self, path: &Path, mode: u32, major: u32, minor: u32) -> SysResult;
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> SysResult;
    /// Sets the mode bits exactly, without the umask that mknod(2) applies.
    fn chmod(&self, path: &Path, mode: u32) -> SysResult;
    /// `None` when nothing is there.
    fn file_kind(&self, path: &Path) -> SysResult<Option<FileKind>>;
    fn read_link(&self, path: &Path) -> SysResult<PathBuf>;
    fn write_file(&self, path: &Path, contents: &[u8]) -> SysResult;
    /// A small text file (cgroup and /proc files).
    fn read_file(&self, path: &Path) -> SysResult<String>;
    fn rmdir(&self, path: &Path) -> SysResult;
    /// The per-mount flags (MS_RDONLY, MS_NOSUID, ...) of the mount holding `path`, so a
    /// remount can keep the ones it does not mean to change.
    fn mount_flags(&self, path: &Path) -> SysResult<libc::c_ulong>;
    fn sethostname(&self, name: &str) -> SysResult;
    fn setdomainname(&self, name: &str) -> SysResult;
    fn unshare(&self, flags: libc::c_int) -> SysResult;
    /// Brings a network interface of the caller's network namespace up.
    fn link_up(&self, name: &str) -> SysResult;
    fn setns(&self, fd: RawFd, nstype: libc::c_int) -> SysResult;
    fn setrlimit(&self, resource: u32, soft: u64, hard: u64) -> SysResult;
    fn umask(&self, mask: u32);
    fn setgroups(&self, groups: &[u32]) -> SysResult;
    fn setresgid(&self, gid: u32) -> SysResult;
    fn setresuid(&self, uid: u32) -> SysResult;
    /// Keep (`true`) or lose permitted capabilities across the switch away from uid 0.
    fn set_keep_caps(&self, keep: bool) -> SysResult;
    /// Drops `cap` from the bounding set; the kernel wants CAP_SETPCAP for it.
    fn drop_bounding(&self, cap: u32) -> SysResult;
    /// Sets the effective, permitted and inheritable sets (`caps.bounding` and `caps.ambient`
    /// are not part of capset(2)).
    fn capset(&self, caps: &CapSets) -> SysResult;
    /// Raises `cap` in the ambient set; the kernel wants it permitted and inheritable.
    fn raise_ambient(&self, cap: u32) -> SysResult;
    fn set_no_new_privs(&self) -> SysResult;
    fn install_seccomp(&self, program: &[libc::sock_filter], flags: u32) -> SysResult;
}

fn c_string(s: &OsStr) -> SysResult<CString> {
    CString::new(s.as_bytes()).map_err(|_| Errno(libc::EINVAL))
}

fn c_path(p: &Path) -> SysResult<CString> {
    c_string(p.as_os_str())
}

fn check(rc: libc::c_int) -> SysResult {
    if rc < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// The real thing.
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> SysResult {
        let source = source.map(|s| c_string(OsStr::new(s))).transpose()?;
        let fstype = fstype.map(|s| c_string(OsStr::new(s))).transpose()?;
        let data = data.map(|s| c_string(OsStr::new(s))).transpose()?;
        let target = c_path(target)?;
        let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
        check(unsafe {
            libc::mount(
                ptr(&source),
                target.as_ptr(),
                ptr(&fstype),
                flags,
                ptr(&data).cast(),
            )
        })
    }

    fn umount(&self, target: &Path, flags: libc::c_int) -> SysResult {
        let target = c_path(target)?;
        // SAFETY: target is a NUL-terminated string alive for the call.
        check(unsafe { libc::umount2(target.as_ptr(), flags) })
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> SysResult {
        let new_root = c_path(new_root)?;
        let put_old = c_path(put_old)?;
        // SAFETY: both arguments are NUL-terminated strings alive for the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
        check(rc as libc::c_int)
    }

    fn chdir(&self, path: &Path) -> SysResult {
        let path = c_path(path)?;
        // SAFETY: path is a NUL-terminated string alive for the call.
        check(unsafe { libc::chdir(path.as_ptr()) })
    }

    fn mkdir(&self, path: &Path, mode: u32) -> SysResult {
        let path = c_path(path)?;
        // SAFETY: path is a NUL-terminated string alive for the call.
        match check(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
            Err(Errno(libc::EEXIST)) => Ok(()),
            other => other,
        }
    }

    fn create_file(&self, path: &Path) -> SysResult {
        let path = c_path(path)?;
        let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        // SAFETY: path is a NUL-terminated string alive for the call; the fd is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644) };
        check(fd)?;
        // SAFETY: fd was just opened by us.
        unsafe { libc::close(fd) };
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> SysResult {
        let target = c_path(target)?;
        let link = c_path(link)?;
        // SAFETY: both arguments are NUL-terminated strings alive for the call.
        match check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }) {
            Err(Errno(libc::EEXIST)) => Ok(()),
            other => other,
        }
    }

    fn mknod(&self, path: &Path, mode: u32, major: u32, minor: u32) -> SysResult {
        let path = c_path(path)?;
        let dev = libc::makedev(major, minor);
        // SAFETY: path is a NUL-terminated string alive for the call.
        check(unsafe { libc::mknod(path.as_ptr(), mode, dev) })
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> SysResult {
        let path = c_path(path)?;
        // SAFETY: path is a NUL-terminated string alive for the call.
        check(unsafe { libc::lchown(path.as_ptr(), uid, gid) })
    }

    fn chmod(&self, path: &Path, mode: u32) -> SysResult {
        let path = c_path(path)?;
        // SAFETY: path is a NUL-terminated string alive for the call.
        check(unsafe { libc::chmod(path.as_ptr(), mode) })
    }

    fn file_kind(&self, path: &Path) -> SysResult<Option<FileKind>> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => Ok(Some(FileKind::Symlink)),
            Ok(meta) if meta.is_dir() => Ok(Some(FileKind::Directory)),
            Ok(_) => Ok(Some(FileKind::Other)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn read_link(&self, path: &Path) -> SysResult<PathBuf> {
        Ok(std::fs::read_link(path)?)
    }

    fn write_file(&self, path: &Path, contents: &[u8]) -> SysResult {
        use std::io::Write;
        // No O_CREAT or O_TRUNC: these are cgroup and /proc files that exist.
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all(contents)?;
        Ok(())
    }

    fn read_file(&self, path: &Path) -> SysResult<String> {
        Ok(std::fs::read_to_string(path)?)
    }

    fn rmdir(&self, path: &Path) -> SysResult {
        Ok(std::fs::remove_dir(path)?)
    }

    fn mount_flags(&self, path: &Path) -> SysResult<libc::c_ulong> {
        let path = c_path(path)?;
        // SAFETY: statvfs is plain data; all-zero is a valid value for the kernel to fill.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: path is a NUL-terminated string and st a valid out-parameter.
        check(unsafe { libc::statvfs(path.as_ptr(), &mut st) })?;
        let pairs = [
            (libc::ST_RDONLY, libc::MS_RDONLY),
            (libc::ST_NOSUID, libc::MS_NOSUID),
            (libc::ST_NODEV, libc::MS_NODEV),
            (libc::ST_NOEXEC, libc::MS_NOEXEC),
            (libc::ST_NOATIME, libc::MS_NOATIME),
            (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
            (libc::ST_RELATIME, libc::MS_RELATIME),
        ];
        Ok(pairs
            .iter()
            .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
            .fold(0, |flags, (_, ms_flag)| flags | ms_flag))
    }

    fn sethostname(&self, name: &str) -> SysResult {
        // SAFETY: the pointer and length describe `name`'s bytes.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
    }

    fn setdomainname(&self, name: &str) -> SysResult {
        // SAFETY: the pointer and length describe `name`'s bytes.
        check(unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) })
    }

    fn unshare(&self, flags: libc::c_int) -> SysResult {
        // SAFETY: unshare only changes this process's namespaces.
        check(unsafe { libc::unshare(flags) })
    }

    fn link_up(&self, name: &str) -> SysResult {
        Ok(crate::netif::bring_up(name)?)
    }

    fn setns(&self, fd: RawFd, nstype: libc::c_int) -> SysResult {
        // SAFETY: setns on an fd we hold; the kernel checks its type.
        check(unsafe { libc::setns(fd, nstype) })
    }

    fn setrlimit(&self, resource: u32, soft: u64, hard: u64) -> SysResult {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: limit is a valid rlimit for the call.
        check(unsafe { libc::setrlimit(resource, &limit) })
    }

    fn umask(&self, mask: u32) {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask) };
    }

    fn setgroups(&self, groups: &[u32]) -> SysResult {
        // SAFETY: the pointer and length describe `groups`.
        check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })
    }

    fn setresgid(&self, gid: u32) -> SysResult {
        // Raw syscalls: glibc's wrappers would broadcast to threads, and this process has one.
        // SAFETY: plain syscall with integer arguments.
        check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } as libc::c_int)
    }

    fn setresuid(&self, uid: u32) -> SysResult {
        // SAFETY: plain syscall with integer arguments.
        check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } as libc::c_int)
    }

    fn set_keep_caps(&self, keep: bool) -> SysResult {
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) })
    }

    fn drop_bounding(&self, cap: u32) -> SysResult {
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) })
    }

    fn capset(&self, caps: &CapSets) -> SysResult {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let word = |set: u64, i: u32| (set >> (32 * i)) as u32;
        let data = [0, 1].map(|i| Data {
            effective: word(caps.effective, i),
            permitted: word(caps.permitted, i),
            inheritable: word(caps.inheritable, i),
        });
        // SAFETY: header and the two data words are the layout capset(2) v3 reads.
        check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as libc::c_int)
    }

    fn raise_ambient(&self, cap: u32) -> SysResult {
        // SAFETY: prctl with integer arguments.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                libc::c_ulong::from(cap),
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        })
    }

    fn set_no_new_privs(&self) -> SysResult {
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
    }

    fn install_seccomp(&self, program: &[libc::sock_filter], flags: u32) -> SysResult {
        let prog = libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(|_| Errno(libc::E2BIG))?,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: prog points at `program`, which outlives the call; the kernel copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog,
            )
        };
        // With SECCOMP_FILTER_FLAG_TSYNC a positive result is the id of a thread that could
        // not be synchronised, and no filter was installed (NEW_LISTENER, the other source
        // of positive results, is never asked for). ESRCH is what libseccomp reports then.
        if rc > 0 {
            return Err(Errno(libc::ESRCH));
        }
        check(rc as libc::c_int)
    }
}

#[cfg(test)]
pub mod recorder {
    //! A [`Syscall`] that records calls as one line each and pretends they succeed.

    use super::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Default)]
    pub struct Recorder {
        pub calls: RefCell<Vec<String>>,
        /// Paths that exist, with what they are; everything else is missing until created.
        pub files: RefCell<BTreeMap<PathBuf, FileKind>>,
        pub links: BTreeMap<PathBuf, PathBuf>,
        /// Calls (by their first word and path) that fail with EPERM.
        pub failing: BTreeSet<String>,
        /// What `read_file` returns; other paths are missing. Reads are not recorded.
        pub contents: BTreeMap<PathBuf, String>,
        /// The mount points of the modelled mount table, oldest first: mounts add to it, a
        /// detach takes the topmost mount at its target and what was mounted under it since.
        /// `read_file` renders it as [`MOUNTINFO`] unless `contents` has that.
        pub mounts: RefCell<Vec<PathBuf>>,
        /// The credentials the calls change, checked the way the kernel checks them, so a
        /// privilege drop in the wrong order fails here as it would in a guest.
        pub creds: RefCell<Creds>,
    }

    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    const CAP_SETPCAP: u32 = 8;
    const CAP_SYS_ADMIN: u32 = 21;
    /// Every capability of a 6.1 kernel (CAP_CHECKPOINT_RESTORE = 40 is the last).
    pub const ALL_CAPS: u64 = (1 << 41) - 1;

    /// A process's uid and capability state, as credentials.c and commoncap.c keep them.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Creds {
        pub uid: u32,
        pub sets: CapSets,
        pub keep_caps: bool,
        pub no_new_privs: bool,
    }

    impl Default for Creds {
        /// The agent's container helper: root with every capability.
        fn default() -> Creds {
            Creds {
                uid: 0,
                sets: CapSets {
                    bounding: ALL_CAPS,
                    effective: ALL_CAPS,
                    permitted: ALL_CAPS,
                    inheritable: 0,
                    ambient: 0,
                },
                keep_caps: false,
                no_new_privs: false,
            }
        }
    }

    impl Creds {
        fn has(&self, cap: u32) -> bool {
            self.sets.effective & (1 << cap) != 0
        }

        /// commoncap.c's cap_emulate_setxuid: leaving uid 0 clears the effective and ambient
        /// sets, and the permitted set too unless keep-caps is on.
        fn switch_uid(&mut self, uid: u32) {
            if self.uid == 0 && uid != 0 {
                if !self.keep_caps {
                    self.sets.permitted = 0;
                }
                self.sets.effective = 0;
                self.sets.ambient = 0;
            }
            self.uid = uid;
        }

        /// commoncap.c's cap_capset checks.
        fn capset_allowed(&self, new: &CapSets) -> bool {
            let old = &self.sets;
            let inheritable_ok =
                self.has(CAP_SETPCAP) || new.inheritable & !(old.inheritable | old.permitted) == 0;
            inheritable_ok
                && new.inheritable & !(old.inheritable | old.bounding) == 0
                && new.permitted & !old.permitted == 0
                && new.effective & !new.permitted == 0
        }
    }

    /// The table `read_file` renders from [`Recorder::mounts`].
    pub const MOUNTINFO: &str = "/proc/self/mountinfo";

    impl Recorder {
        pub fn with_dirs(dirs: &[&str]) -> Recorder {
            let r = Recorder::default();
            for d in dirs {
                r.files
                    .borrow_mut()
                    .insert(PathBuf::from(d), FileKind::Directory);
            }
            r
        }

        pub fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }

        /// The recorded calls whose first word is `verb`.
        pub fn calls_of(&self, verb: &str) -> Vec<String> {
            self.calls()
                .into_iter()
                .filter(|c| c.split(' ').next() == Some(verb))
                .collect()
        }

        /// Records `call`, which fails with EPERM unless the modelled kernel `allowed` it.
        fn record_checked(&self, call: String, allowed: bool) -> SysResult {
            self.record_refused(call, (!allowed).then_some(libc::EPERM))
        }

        fn record_refused(&self, call: String, refused: Option<i32>) -> SysResult {
            match refused {
                None => self.record(call),
                Some(errno) => {
                    self.calls.borrow_mut().push(call);
                    Err(Errno(errno))
                }
            }
        }

        /// A new mount, as the kernel's table would hold it: a remount or a propagation change
        /// makes none.
        fn add_mount(&self, target: &Path, flags: libc::c_ulong) {
            let changes_only = libc::MS_REMOUNT
                | libc::MS_SHARED
                | libc::MS_PRIVATE
                | libc::MS_SLAVE
                | libc::MS_UNBINDABLE;
            if flags & changes_only == 0 {
                self.mounts.borrow_mut().push(target.to_owned());
            }
        }

        /// umount2(MNT_DETACH): the topmost mount at `target` goes, with every mount made
        /// under it after it (mounts below it that predate it belong to the one it covers).
        fn detach(&self, target: &Path) {
            let mut mounts = self.mounts.borrow_mut();
            if let Some(top) = mounts.iter().rposition(|m| m == target) {
                let mut index = 0;
                mounts.retain(|m| {
                    let keep = index < top || (index > top && !m.starts_with(target));
                    index += 1;
                    keep
                });
            }
        }

        /// The mount table in mountinfo's format, spaces and backslashes escaped as the kernel
        /// escapes them.
        fn mountinfo(&self) -> String {
            self.mounts
                .borrow()
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let point = m
                        .display()
                        .to_string()
                        .replace('\\', "\\134")
                        .replace(' ', "\\040");
                    format!("{} 1 0:{i} / {point} rw - none none rw\n", i + 2)
                })
                .collect()
        }

        fn record(&self, call: String) -> SysResult {
            let key: String = call.split(' ').take(2).collect::<Vec<_>>().join(" ");
            self.calls.borrow_mut().push(call);
            if self.failing.contains(&key) {
                Err(Errno(libc::EPERM))
            } else {
                Ok(())
            }
        }
    }

    fn opt(s: Option<&str>) -> &str {
        s.unwrap_or("-")
    }

    impl Syscall for Recorder {
        fn mount(
            &self,
            source: Option<&str>,
            target: &Path,
            fstype: Option<&str>,
            flags: libc::c_ulong,
            data: Option<&str>,
        ) -> SysResult {
            self.record(format!(
                "mount {} {} {} {flags:#x} {}",
                target.display(),
                opt(source),
                opt(fstype),
                opt(data)
            ))?;
            self.add_mount(target, flags);
            Ok(())
        }
        fn umount(&self, target: &Path, flags: libc::c_int) -> SysResult {
            self.record(format!("umount {} {flags:#x}", target.display()))?;
            if flags & libc::MNT_DETACH != 0 {
                self.detach(target);
            }
            Ok(())
        }
        fn pivot_root(&self, new_root: &Path, put_old: &Path) -> SysResult {
            self.record(format!(
                "pivot_root {} {}",
                new_root.display(),
                put_old.display()
            ))
        }
        fn chdir(&self, path: &Path) -> SysResult {
            self.record(format!("chdir {}", path.display()))
        }
        fn mkdir(&self, path: &Path, mode: u32) -> SysResult {
            self.files
                .borrow_mut()
                .insert(path.to_owned(), FileKind::Directory);
            self.record(format!("mkdir {} {mode:o}", path.display()))
        }
        fn create_file(&self, path: &Path) -> SysResult {
            self.files
                .borrow_mut()
                .insert(path.to_owned(), FileKind::Other);
            self.record(format!("create_file {}", path.display()))
        }
        fn symlink(&self, target: &Path, link: &Path) -> SysResult {
            self.record(format!("symlink {} {}", link.display(), target.display()))
        }
        fn mknod(&self, path: &Path, mode: u32, major: u32, minor: u32) -> SysResult {
            self.record(format!("mknod {} {mode:o} {major}:{minor}", path.display()))
        }
        fn chown(&self, path: &Path, uid: u32, gid: u32) -> SysResult {
            self.record(format!("chown {} {uid}:{gid}", path.display()))
        }
        fn chmod(&self, path: &Path, mode: u32) -> SysResult {
            self.record(format!("chmod {} {mode:o}", path.display()))
        }
        fn file_kind(&self, path: &Path) -> SysResult<Option<FileKind>> {
            if self.links.contains_key(path) {
                return Ok(Some(FileKind::Symlink));
            }
            Ok(self.files.borrow().get(path).copied())
        }
        fn read_link(&self, path: &Path) -> SysResult<PathBuf> {
            self.links.get(path).cloned().ok_or(Errno(libc::EINVAL))
        }
        fn write_file(&self, path: &Path, contents: &[u8]) -> SysResult {
            self.record(format!(
                "write {} {}",
                path.display(),
                String::from_utf8_lossy(contents)
            ))
        }
        fn read_file(&self, path: &Path) -> SysResult<String> {
            match self.contents.get(path) {
                Some(contents) => Ok(contents.clone()),
                None if path == Path::new(MOUNTINFO) => Ok(self.mountinfo()),
                None => Err(Errno(libc::ENOENT)),
            }
        }
        fn rmdir(&self, path: &Path) -> SysResult {
            self.record(format!("rmdir {}", path.display()))
        }
        fn mount_flags(&self, _path: &Path) -> SysResult<libc::c_ulong> {
            Ok(libc::MS_NOSUID)
        }
        fn sethostname(&self, name: &str) -> SysResult {
            self.record(format!("sethostname {name}"))
        }
        fn setdomainname(&self, name: &str) -> SysResult {
            self.record(format!("setdomainname {name}"))
        }
        fn unshare(&self, flags: libc::c_int) -> SysResult {
            self.record(format!("unshare {flags:#x}"))
        }
        fn link_up(&self, name: &str) -> SysResult {
            self.record(format!("link_up {name}"))
        }
        fn setns(&self, fd: RawFd, nstype: libc::c_int) -> SysResult {
            self.record(format!("setns {fd} {nstype:#x}"))
        }
        fn setrlimit(&self, resource: u32, soft: u64, hard: u64) -> SysResult {
            self.record(format!("setrlimit {resource} {soft} {hard}"))
        }
        fn umask(&self, mask: u32) {
            let _ = self.record(format!("umask {mask:o}"));
        }
        fn setgroups(&self, groups: &[u32]) -> SysResult {
            let allowed = self.creds.borrow().has(CAP_SETGID);
            self.record_checked(format!("setgroups {groups:?}"), allowed)
        }
        fn setresgid(&self, gid: u32) -> SysResult {
            let allowed = self.creds.borrow().has(CAP_SETGID);
            self.record_checked(format!("setresgid {gid}"), allowed)
        }
        fn setresuid(&self, uid: u32) -> SysResult {
            let allowed = {
                let creds = self.creds.borrow();
                uid == creds.uid || creds.has(CAP_SETUID)
            };
            self.record_checked(format!("setresuid {uid}"), allowed)?;
            self.creds.borrow_mut().switch_uid(uid);
            Ok(())
        }
        fn set_keep_caps(&self, keep: bool) -> SysResult {
            self.creds.borrow_mut().keep_caps = keep;
            self.record(format!("keep_caps {keep}"))
        }
        fn drop_bounding(&self, cap: u32) -> SysResult {
            let allowed = self.creds.borrow().has(CAP_SETPCAP);
            self.record_checked(format!("bounding_drop {cap}"), allowed)?;
            self.creds.borrow_mut().sets.bounding &= !(1 << cap);
            Ok(())
        }
        fn capset(&self, caps: &CapSets) -> SysResult {
            let allowed = self.creds.borrow().capset_allowed(caps);
            self.record_checked(
                format!(
                    "capset e={:#x} p={:#x} i={:#x}",
                    caps.effective, caps.permitted, caps.inheritable
                ),
                allowed,
            )?;
            let mut creds = self.creds.borrow_mut();
            creds.sets.effective = caps.effective;
            creds.sets.permitted = caps.permitted;
            creds.sets.inheritable = caps.inheritable;
            // The kernel keeps an ambient capability only while it is permitted and inheritable.
            creds.sets.ambient &= caps.permitted & caps.inheritable;
            Ok(())
        }
        fn raise_ambient(&self, cap: u32) -> SysResult {
            let allowed = {
                let sets = self.creds.borrow().sets;
                sets.permitted & sets.inheritable & (1 << cap) != 0
            };
            self.record_checked(format!("ambient_raise {cap}"), allowed)?;
            self.creds.borrow_mut().sets.ambient |= 1 << cap;
            Ok(())
        }
        fn set_no_new_privs(&self) -> SysResult {
            self.creds.borrow_mut().no_new_privs = true;
            self.record("no_new_privs".into())
        }
        fn install_seccomp(&self, program: &[libc::sock_filter], flags: u32) -> SysResult {
            let allowed = {
                let creds = self.creds.borrow();
                creds.no_new_privs || creds.has(CAP_SYS_ADMIN)
            };
            // Without no_new_privs, seccomp(2) wants CAP_SYS_ADMIN and says EACCES.
            self.record_refused(
                format!("seccomp {} {flags}", program.len()),
                (!allowed).then_some(libc::EACCES),
            )
        }
    }
}
