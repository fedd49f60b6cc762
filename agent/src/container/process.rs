//! The last steps before a container process runs, in the order that keeps each step allowed:
//! working directory, rlimits, OOM score and umask while still root, then groups, gid and uid,
//! capabilities, `no_new_privs`, seccomp, and finally exec.

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
    if user.uid() != 0 {
        context(sys.set_keep_caps(), || {
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
    context(
        sys.set_capabilities(&privileges.capabilities, privileges.last_cap),
        || "set capabilities".into(),
    )?;
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
        let env = process
            .env()
            .iter()
            .flatten()
            .map(|e| to_c(e))
            .collect::<Result<_, _>>()?;
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
    use super::super::syscall::recorder::Recorder;
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).expect("test process parses")
    }

    fn privileges(seccomp: bool) -> Privileges {
        Privileges {
            capabilities: CapSets {
                bounding: 1,
                ..CapSets::default()
            },
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

    #[test]
    fn root_without_no_new_privs_loads_seccomp_before_dropping_privileges() {
        let sys = Recorder::default();
        let p = process(
            r#"{"cwd":"/work","user":{"uid":0,"gid":0,"umask":18},
                "rlimits":[{"type":"RLIMIT_NOFILE","soft":100,"hard":200}],"oomScoreAdj":5}"#,
        );
        apply(&sys, &p, &privileges(true)).unwrap();
        assert_eq!(
            sys.calls(),
            [
                "chdir /work",
                "setrlimit 7 100 200",
                "write /proc/self/oom_score_adj 5",
                "umask 22",
                "seccomp 1 0",
                "setgroups []",
                "setresgid 0",
                "setresuid 0",
                "capabilities b=0x1 e=0x0 p=0x0 i=0x0 a=0x0 last=40",
            ]
        );
    }

    #[test]
    fn a_user_with_no_new_privs_keeps_caps_then_loads_seccomp_last() {
        let sys = Recorder::default();
        let p = process(
            r#"{"cwd":"/","user":{"uid":1000,"gid":100,"additionalGids":[5,6]},"noNewPrivileges":true}"#,
        );
        apply(&sys, &p, &privileges(true)).unwrap();
        assert_eq!(
            sys.calls(),
            [
                "chdir /",
                "keep_caps",
                "setgroups [5, 6]",
                "setresgid 100",
                "setresuid 1000",
                "capabilities b=0x1 e=0x0 p=0x0 i=0x0 a=0x0 last=40",
                "no_new_privs",
                "seccomp 1 0",
            ]
        );
    }
}
