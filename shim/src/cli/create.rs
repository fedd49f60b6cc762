//! `cocoon create`: boot the container's microVM and prepare its process, stopped before exec.
//! The process that runs the VM (the monitor) is what `--pid-file` names.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use oci_spec::runtime::ContainerState;

use cocoon_runtime::bundle::Bundle;
pub use cocoon_runtime::launch::record;
use cocoon_runtime::launch::{self, CreateRequest};

use super::{CreateArgs, Global};
use crate::error::CliError;
use crate::hooks::{self, Stage};
use crate::monitor::{CONFIRM, REPORT_FD, read_report};
use crate::state::{ContainerDir, Record, write_atomically_mode};

/// Everything before the monitor starts (see `launch::prepare`).
pub fn prepare(global: &Global, args: &CreateArgs) -> Result<(ContainerDir, Bundle), CliError> {
    launch::prepare(&CreateRequest {
        root: &global.root,
        id: &args.id,
        bundle: &args.bundle,
        console_socket: args.console_socket.as_deref(),
        no_template: args.no_template,
    })
}

/// The engine's pid file: readable by others, as runc's is (0644); it holds no secret.
pub fn write_pid_file(path: Option<&std::path::Path>, pid: i32) -> Result<(), CliError> {
    match path {
        Some(path) => write_atomically_mode(path, pid.to_string().as_bytes(), 0o644),
        None => Ok(()),
    }
}

/// Global flags for a child `cocoon` process, so it logs where this one does. Each value is
/// joined to its flag with `=`: a path that starts with `-` is still the flag's value.
fn global_args(global: &Global) -> Vec<OsString> {
    let flag = |name: &str, value: &std::path::Path| {
        let mut arg = OsString::from(format!("--{name}="));
        arg.push(value);
        arg
    };
    let mut args = vec![flag("root", &global.root)];
    if let Some(log) = &global.log {
        args.push(flag("log", log));
    }
    let format = match global.log_format {
        crate::logging::LogFormat::Text => "text",
        crate::logging::LogFormat::Json => "json",
    };
    args.push(format!("--log-format={format}").into());
    if global.debug {
        args.push("--debug".into());
    }
    args
}

/// The command line of a monitor: `verb`, its `options` (each `--flag=value`), then `--` and
/// the positional arguments, so that an id such as `-x` or `--help` (valid ids, as runc's) is
/// never taken for a flag.
fn monitor_args(global: &Global, verb: &str, options: &[OsString], ids: &[&str]) -> Vec<OsString> {
    let mut args = global_args(global);
    args.push(verb.into());
    args.extend(options.iter().cloned());
    args.push("--".into());
    args.extend(ids.iter().map(OsString::from));
    args
}

/// A monitor this verb started that has reported its process created. It dies with this
/// process until [`Monitor::confirm`]: call that once the engine can know of it (state
/// written, pid file given); on failure before, [`Monitor::stop`] it.
pub struct Monitor {
    pub pid: i32,
    channel: UnixStream,
}

impl Monitor {
    /// Lets the monitor go on for good; returns its pid.
    pub fn confirm(mut self) -> Result<i32, CliError> {
        self.channel.write_all(&[CONFIRM]).map_err(|e| {
            stop_monitor(self.pid);
            CliError::Other(format!("the monitor ended before it was confirmed: {e}"))
        })?;
        Ok(self.pid)
    }

    /// Kills the monitor, which ends its VM, and reaps it.
    pub fn stop(self) {
        stop_monitor(self.pid);
    }

    /// Tells the monitor it will not be confirmed, so it ends what it started itself (an exec
    /// monitor kills its process in the guest), and reaps it.
    pub fn abandon(self) {
        drop(self.channel);
        // SAFETY: waitpid(2) on our own child, not yet reaped.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}

/// Starts `cocoon VERB OPTIONS -- IDS` as a monitor in a session of its own and waits until it
/// reports its process created.
pub fn spawn_monitor(
    global: &Global,
    verb: &str,
    options: &[OsString],
    ids: &[&str],
) -> Result<Monitor, CliError> {
    let (channel, theirs) =
        UnixStream::pair().map_err(|e| CliError::Other(format!("socketpair: {e}")))?;
    let their_fd = theirs.as_raw_fd();
    let exe = std::env::current_exe().map_err(CliError::io("find", "/proc/self/exe"))?;
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut command = Command::new(exe);
    command
        .args(monitor_args(global, verb, options, ids))
        .env("COCOON_REPORT_FD", REPORT_FD.to_string());
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, prctl, getppid,
    // dup2, fcntl.
    unsafe {
        command.pre_exec(move || {
            // A session of its own: the engine's terminal signals do not reach it directly.
            libc::setsid();
            // Until confirmed, the monitor dies with us (a `create` killed mid-boot must not
            // leave a VM nobody knows of); if we are already gone, it does not start.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if their_fd == REPORT_FD {
                libc::fcntl(REPORT_FD, libc::F_SETFD, 0);
            } else if libc::dup2(their_fd, REPORT_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| CliError::Other(format!("start the monitor: {e}")))?;
    drop(theirs);
    let monitor = Monitor {
        pid: child.id() as i32,
        channel,
    };
    match read_report(&monitor.channel) {
        Ok(()) => Ok(monitor),
        Err(e) => {
            monitor.stop();
            Err(e)
        }
    }
}

/// Kills a monitor this process started, which ends its VM, and reaps it.
fn stop_monitor(pid: i32) {
    // SAFETY: kill(2) and waitpid(2) on our own child, not yet reaped, so the pid is still it.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// The prestart and createRuntime hooks, once the container's process (the monitor) exists,
/// with the state as `state` reports it then but `creating`, as runc has it. The lock is
/// released meanwhile so the hooks may use the other verbs on the container.
pub fn run_create_hooks(dir: &ContainerDir, record: &Record) -> Result<(), CliError> {
    let state = record.oci_state(ContainerState::Creating);
    Ok(dir.unlocked(|| hooks::run(record.hooks.as_ref(), &hooks::CREATE, &state))??)
}

/// The poststop hooks, once the container and its state are gone: after `delete`, and after a
/// create that failed once its hooks had run (the spec's lifecycle goes on to poststop after a
/// failed createRuntime hook; runc's destroy runs them after any such failure).
pub fn run_poststop_hooks(record: &Record) {
    hooks::run_warning(
        record.hooks.as_ref(),
        Stage::Poststop,
        &record.oci_state(ContainerState::Stopped),
    );
}

pub fn create(global: &Global, args: &CreateArgs) -> Result<(), CliError> {
    let (dir, bundle) = prepare(global, args)?;
    let monitor = match spawn_monitor(global, "monitor", &[], &[&dir.id]) {
        Ok(monitor) => monitor,
        Err(e) => {
            let _ = dir.remove();
            return Err(e);
        }
    };
    let pid = monitor.pid;
    let record = record(&dir, &bundle, pid, false);
    let mut hooks_ran = false;
    let result = dir
        .write(&record)
        .and_then(|()| {
            hooks_ran = true;
            run_create_hooks(&dir, &record)
        })
        .and_then(|()| write_pid_file(args.pid_file.as_deref(), pid));
    // Confirmed last: until then a monitor dies with us, so a create killed at any point
    // leaves no VM behind.
    let result = match result {
        Ok(()) => monitor.confirm().map(drop),
        Err(e) => {
            monitor.stop();
            Err(e)
        }
    };
    if let Err(e) = result {
        // Nothing stays: the VM went with its monitor, the state goes with the directory.
        let _ = dir.remove();
        if hooks_ran {
            run_poststop_hooks(&record);
        }
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: Vec<OsString>) -> Cli {
        Cli::try_parse_from(std::iter::once(OsString::from("cocoon")).chain(args.clone()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// runc's ids are `[\w+-.]+`: ones that look like flags must reach the monitor as ids,
    /// and paths that do as values.
    #[test]
    fn ids_and_paths_that_look_like_flags_reach_the_monitor_as_they_are() {
        let global =
            Cli::try_parse_from(["cocoon", "--root=-root", "--log=-log", "--debug", "list"])
                .unwrap()
                .global;
        for id in ["-x", "--help", "-h", "--root", "-", "--", "--version"] {
            assert!(crate::state::check_id(id).is_ok(), "{id}");
            let cli = parse(monitor_args(&global, "monitor", &[], &[id]));
            assert!(
                matches!(&cli.command, Command::Monitor { id: got, restore_from: None } if got == id),
                "{id}: {:?}",
                cli.command
            );
            assert_eq!(cli.global.root, std::path::Path::new("-root"));
            assert_eq!(
                cli.global.log.as_deref(),
                Some(std::path::Path::new("-log"))
            );
            assert!(cli.global.debug);
        }
        let cli = parse(monitor_args(
            &global,
            "monitor",
            &["--restore-from=-image".into()],
            &["--help"],
        ));
        assert!(matches!(
            &cli.command,
            Command::Monitor { id, restore_from: Some(dir) }
                if id == "--help" && dir == std::path::Path::new("-image")
        ));
        // As with runc, such an id follows `--` on the verbs' own command lines.
        let cli = parse(
            ["create", "--bundle", "/b", "--", "-x"]
                .map(OsString::from)
                .to_vec(),
        );
        assert!(matches!(&cli.command, Command::Create(args) if args.id == "-x"));
        let cli = parse(
            ["exec", "--", "-x", "sh", "-c", "true"]
                .map(OsString::from)
                .to_vec(),
        );
        assert!(matches!(
            &cli.command,
            Command::Exec(args) if args.id == "-x" && args.command == ["sh", "-c", "true"]
        ));
        let cli = parse(monitor_args(
            &global,
            "exec-monitor",
            &[],
            &["-x", "--help"],
        ));
        assert!(matches!(
            &cli.command,
            Command::ExecMonitor { id, exec_id } if id == "-x" && exec_id == "--help"
        ));
    }
}
