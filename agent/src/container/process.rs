//! The last steps before a container process runs, in the order that keeps each step allowed:
//! working directory, rlimits, OOM score and umask while still root, then the bounding set,
//! groups, gid and uid, the other capability sets, `no_new_privs`, seccomp, and finally exec.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{PosixRlimitType, Process};

use super::syscall::{CapSets, Errno, Syscall};

#[derive(Debug, thiserror::Error)]
#[error("{what}: {errno}")]
pub struct ProcessError {
    pub what: String,
    pub errno: Errno,
}

fn context<T>(result: Result<T, Errno>, what: impl FnOnce() -> String) -> Result<T, ProcessError> {
    result.map_err(|errno| ProcessError {
        what: what(),
        errno,
    })
}

/// The compiled seccomp filter of a process and its flags.
#[derive(Clone)]
pub struct Seccomp {
    pub program: Vec<libc::sock_filter>,
    pub flags: u32,
}

/// What [`apply`] needs beyond the spec's `process`.
pub struct Privileges {
    pub capabilities: CapSets,
    pub last_cap: u32,
    pub seccomp: Option<Seccomp>,
}

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn rlimit_resource(kind: PosixRlimitType) -> u32 {
    match kind {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

/// Finds `program` the way execvp(3) does, with the process's own `PATH`. Runs inside the
/// container's root, before the process is reported ready, so `create` fails for a missing
/// binary as runc's does.
pub fn find_executable(process: &Process) -> Result<PathBuf, String> {
    let program = process
        .args()
        .as_ref()
        .and_then(|a| a.first())
        .ok_or_else(|| "the process has no args".to_owned())?;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = process.cwd().join(program);
        return if executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "exec: \"{program}\": no such file or directory, or not executable"
            ))
        };
    }
    let path_var = process
        .env()
        .iter()
        .flatten()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("exec: \"{program}\": executable file not found in $PATH"))
}

/// Applies everything about the process except exec.
pub fn apply(
    sys: &dyn Syscall,
    process: &Process,
    privileges: &Privileges,
) -> Result<(), ProcessError> {
    let cwd = process.cwd();
    context(sys.chdir(cwd), || format!("chdir to cwd {}", cwd.display()))?;
    for rlimit in process.rlimits().iter().flatten() {
        context(
            sys.setrlimit(rlimit_resource(rlimit.typ()), rlimit.soft(), rlimit.hard()),
            || format!("setrlimit {:?}", rlimit.typ()),
        )?;
    }
    if let Some(score) = process.oom_score_adj() {
        context(
            sys.write_file(
                Path::new("/proc/self/oom_score_adj"),
                score.to_string().as_bytes(),
            ),
            || "set oom_score_adj".into(),
        )?;
    }
    let user = process.user();
    if let Some(mask) = user.umask() {
        sys.umask(mask);
    }
    let no_new_privs = process.no_new_privileges() == Some(true);
    // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN, which the user switch below
    // may take away: load it first.
    if !no_new_privs && let Some(seccomp) = &privileges.seccomp {
        context(sys.install_seccomp(&seccomp.program, seccomp.flags), || {
            "load the seccomp filter".into()
        })?;
    }
    // The order runc uses, each step while the kernel still allows it: the bounding set shrinks
    // while we hold CAP_SETPCAP (root's, before the uid switch); keep-caps carries the permitted
    // set across the switch away from uid 0, which clears the effective and ambient sets; then
    // capset(2) narrows the permitted set and raises the effective one, and ambient capabilities
    // (which must be permitted and inheritable) come last.
    let caps = &privileges.capabilities;
    for cap in (0..=privileges.last_cap).filter(|cap| caps.bounding & (1 << cap) == 0) {
        context(sys.drop_bounding(cap), || {
            format!("drop capability {cap} from the bounding set")
        })?;
    }
    let leaves_root = user.uid() != 0;
    if leaves_root {
        context(sys.set_keep_caps(true), || {
            "keep capabilities across setuid".into()
        })?;
    }
    let groups: Vec<u32> = user.additional_gids().clone().unwrap_or_default();
    context(sys.setgroups(&groups), || format!("setgroups {groups:?}"))?;
    context(sys.setresgid(user.gid()), || {
        format!("setgid {}", user.gid())
    })?;
    context(sys.setresuid(user.uid()), || {
        format!("setuid {}", user.uid())
    })?;
    if leaves_root {
        context(sys.set_keep_caps(false), || {
            "clear keep-capabilities".into()
        })?;
    }
    context(sys.capset(caps), || "set capabilities".into())?;
    // Best effort, as runc does: the kernel refuses an ambient capability that is not also
    // permitted and inheritable, and specs (runc's default among them) often ask for ones that
    // are not.
    for cap in (0..=privileges.last_cap).filter(|cap| caps.ambient & (1 << cap) != 0) {
        let _ = sys.raise_ambient(cap);
    }
    if no_new_privs {
        context(sys.set_no_new_privs(), || "set no_new_privs".into())?;
        if let Some(seccomp) = &privileges.seccomp {
            context(sys.install_seccomp(&seccomp.program, seccomp.flags), || {
                "load the seccomp filter".into()
            })?;
        }
    }
    Ok(())
}

/// An exec that failed, worded as runc words it: `exec /bin/x: permission denied`.
pub fn exec_error(path: &Path, errno: Errno) -> String {
    format!("exec {}: {}", path.display(), errno.go_text())
}

/// Execs `path` with the process's args and env; returns only on failure.
pub fn exec(path: &Path, process: &Process) -> Errno {
    let to_c = |s: &str| CString::new(s).map_err(|_| Errno(libc::EINVAL));
    let build = || -> Result<(CString, Vec<CString>, Vec<CString>), Errno> {
        let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno(libc::EINVAL))?;
        let args = process
            .args()
            .iter()
            .flatten()
            .map(|a| to_c(a))
            .collect::<Result<_, _>>()?;
        let own = process.env().clone().unwrap_or_default();
        let env = match crate::cpu::container_env() {
            Some(extra) => crate::cpu::with_env(&own, extra),
            None => own,
        };
        let env = env.iter().map(|e| to_c(e)).collect::<Result<_, _>>()?;
        Ok((path, args, env))
    };
    let (path, args, env) = match build() {
        Ok(parts) => parts,
        Err(errno) => return errno,
    };
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    // SAFETY: path, argv and envp are NUL-terminated strings and NULL-terminated arrays that
    // outlive the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

#[cfg(test)]
mod tests {
    use super::super::syscall::recorder::{ALL_CAPS, Creds, Recorder};
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).expect("test process parses")
    }

    #[test]
    fn exec_errors_read_as_runc_s() {
        let bad = Path::new("/tmp/bad");
        assert_eq!(
            exec_error(bad, Errno(libc::ENOENT)),
            "exec /tmp/bad: no such file or directory"
        );
        assert_eq!(
            exec_error(bad, Errno(libc::EACCES)),
            "exec /tmp/bad: permission denied"
        );
        assert_eq!(
            exec_error(bad, Errno(libc::ENOEXEC)),
            "exec /tmp/bad: exec format error"
        );
    }

    /// runc's and Podman's default set: CHOWN, DAC_OVERRIDE, FSETID, FOWNER, MKNOD, NET_RAW,
    /// SETGID, SETUID, SETFCAP, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, KILL, AUDIT_WRITE.
    const DEFAULT_CAPS: u64 = 1 << 0
        | 1 << 1
        | 1 << 4
        | 1 << 3
        | 1 << 27
        | 1 << 13
        | 1 << 6
        | 1 << 7
        | 1 << 31
        | 1 << 8
        | 1 << 10
        | 1 << 18
        | 1 << 5
        | 1 << 29;

    fn privileges(capabilities: CapSets, seccomp: bool) -> Privileges {
        Privileges {
            capabilities,
            last_cap: 40,
            seccomp: seccomp.then(|| Seccomp {
                program: vec![libc::sock_filter {
                    code: 6,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                }],
                flags: 0,
            }),
        }
    }

    fn all_but_ambient(mask: u64) -> CapSets {
        CapSets {
            bounding: mask,
            effective: mask,
            permitted: mask,
            inheritable: 0,
            ambient: 0,
        }
    }

    /// The calls other than the bounding-set drops, which are many and checked apart.
    fn calls_but_drops(sys: &Recorder) -> Vec<String> {
        sys.calls()
            .into_iter()
            .filter(|c| !c.starts_with("bounding_drop"))
            .collect()
    }

    fn dropped(sys: &Recorder) -> u64 {
        sys.calls_of("bounding_drop")
            .iter()
            .map(|c| c[14..].parse::<u32>().expect("cap number"))
            .fold(0, |mask, cap| mask | 1 << cap)
    }

    #[test]
    fn root_without_no_new_privs_loads_seccomp_before_dropping_privileges() {
        let sys = Recorder::default();
        let p = process(
            r#"{"cwd":"/work","user":{"uid":0,"gid":0,"umask":18},
                "rlimits":[{"type":"RLIMIT_NOFILE","soft":100,"hard":200}],"oomScoreAdj":5}"#,
        );
        apply(&sys, &p, &privileges(all_but_ambient(DEFAULT_CAPS), true)).unwrap();
        assert_eq!(
            calls_but_drops(&sys),
            [
                "chdir /work",
                "setrlimit 7 100 200",
                "write /proc/self/oom_score_adj 5",
                "umask 22",
                "seccomp 1 0",
                "setgroups []",
                "setresgid 0",
                "setresuid 0",
                &format!("capset e={DEFAULT_CAPS:#x} p={DEFAULT_CAPS:#x} i=0x0"),
            ]
        );
        assert_eq!(dropped(&sys), ALL_CAPS & !DEFAULT_CAPS);
        assert_eq!(sys.creds.borrow().sets, all_but_ambient(DEFAULT_CAPS));
    }

    #[test]
    fn a_user_with_default_caps_and_no_new_privs_drops_in_the_order_the_kernel_allows() {
        let sys = Recorder::default();
        let p = process(
            r#"{"cwd":"/","user":{"uid":1000,"gid":100,"additionalGids":[5,6]},"noNewPrivileges":true}"#,
        );
        apply(&sys, &p, &privileges(all_but_ambient(DEFAULT_CAPS), true)).unwrap();
        let calls = calls_but_drops(&sys);
        assert_eq!(
            calls,
            [
                "chdir /",
                "keep_caps true",
                "setgroups [5, 6]",
                "setresgid 100",
                "setresuid 1000",
                "keep_caps false",
                &format!("capset e={DEFAULT_CAPS:#x} p={DEFAULT_CAPS:#x} i=0x0"),
                "no_new_privs",
                "seccomp 1 0",
            ]
        );
        // Every bounding-set drop happens before the uid switch.
        let all = sys.calls();
        let last_drop = all.iter().rposition(|c| c.starts_with("bounding_drop"));
        let setuid = all.iter().position(|c| c.starts_with("setresuid"));
        assert!(last_drop < setuid, "{all:?}");
        assert_eq!(
            *sys.creds.borrow(),
            Creds {
                uid: 1000,
                sets: all_but_ambient(DEFAULT_CAPS),
                keep_caps: false,
                no_new_privs: true,
            }
        );
    }

    #[test]
    fn a_user_with_no_capabilities_ends_with_none() {
        let sys = Recorder::default();
        let p = process(r#"{"cwd":"/","user":{"uid":1000,"gid":1000}}"#);
        apply(&sys, &p, &privileges(CapSets::default(), true)).unwrap();
        assert_eq!(sys.creds.borrow().sets, CapSets::default());
        assert_eq!(dropped(&sys), ALL_CAPS);
        // Without no_new_privs the filter went in while CAP_SYS_ADMIN was still held.
        assert_eq!(sys.calls_of("seccomp"), ["seccomp 1 0"]);
        assert!(!sys.creds.borrow().no_new_privs);
    }

    #[test]
    fn a_user_gets_extra_and_ambient_capabilities() {
        let sys = Recorder::default();
        let bind = 1 << 10;
        let extra = DEFAULT_CAPS | 1 << 12 | 1 << 21;
        let caps = CapSets {
            bounding: extra,
            effective: extra,
            permitted: extra,
            inheritable: bind,
            // SYS_TIME is not permitted: the kernel refuses it, and runc goes on without it.
            ambient: bind | 1 << 25,
        };
        let p = process(r#"{"cwd":"/","user":{"uid":33,"gid":33}}"#);
        apply(&sys, &p, &privileges(caps, false)).unwrap();
        assert_eq!(
            sys.creds.borrow().sets,
            CapSets {
                ambient: bind,
                ..caps
            }
        );
        assert_eq!(
            sys.calls_of("ambient_raise"),
            ["ambient_raise 10", "ambient_raise 25"]
        );
    }

    #[test]
    fn the_kernel_model_refuses_a_bounding_drop_after_the_uid_switch() {
        // The order this module used before: switch uid, then shrink the bounding set.
        let sys = Recorder::default();
        sys.set_keep_caps(true).unwrap();
        sys.setresuid(1000).unwrap();
        assert_eq!(sys.drop_bounding(21), Err(Errno(libc::EPERM)));
        assert_eq!(sys.setresuid(0), Err(Errno(libc::EPERM)));
        // And capset cannot grant what the bounding set no longer has.
        let sys = Recorder::default();
        sys.drop_bounding(12).unwrap();
        let wider = CapSets {
            inheritable: 1 << 12,
            ..CapSets::default()
        };
        assert_eq!(sys.capset(&wider), Err(Errno(libc::EPERM)));
    }

    #[test]
    fn an_inheritable_capability_outside_the_bounding_set_fails_with_context() {
        let sys = Recorder::default();
        let caps = CapSets {
            inheritable: 1 << 12,
            ..all_but_ambient(DEFAULT_CAPS)
        };
        let p = process(r#"{"cwd":"/","user":{"uid":1000,"gid":1000}}"#);
        let err = apply(&sys, &p, &privileges(caps, false)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "set capabilities: Operation not permitted (os error 1)"
        );
    }
}
