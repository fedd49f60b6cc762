//! OCI hooks (`hooks` in config.json) run on the host, as runc runs them: each hook is its
//! `path` exec'd with its `args` (args[0] is argv[0]) and exactly its `env`, the container's
//! state as JSON on stdin, and killed once its `timeout` passes. Which stage runs when is the
//! verbs' business (`create`, `start`, `delete`, `run`); this module runs a stage's list.
//!
//! `createContainer` and `startContainer` hooks belong inside the container's namespaces,
//! which for cocoon are inside the guest: [`check`] refuses them, since nothing runs hooks
//! there yet.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks, State};

/// How much of a hook's stdout and of its stderr a failure quotes.
const OUTPUT_LIMIT: usize = 4096;

/// How long a finished hook's output may take to reach us: a process the hook left behind may
/// hold its pipes open.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

/// What `create` runs once the container's process exists, in runc's order: the deprecated
/// prestart hooks first, as the spec asks of runtimes that still run them.
pub const CREATE: [Stage; 2] = [Stage::Prestart, Stage::CreateRuntime];

const ALL: [Stage; 6] = [
    Stage::Prestart,
    Stage::CreateRuntime,
    Stage::CreateContainer,
    Stage::StartContainer,
    Stage::Poststart,
    Stage::Poststop,
];

impl Stage {
    /// The stage's name in config.json.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prestart => "prestart",
            Stage::CreateRuntime => "createRuntime",
            Stage::CreateContainer => "createContainer",
            Stage::StartContainer => "startContainer",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }

    // Prestart is deprecated in the spec, but engines still write it and runc still runs it.
    #[allow(deprecated)]
    fn list(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            Stage::Prestart => hooks.prestart(),
            Stage::CreateRuntime => hooks.create_runtime(),
            Stage::CreateContainer => hooks.create_container(),
            Stage::StartContainer => hooks.start_container(),
            Stage::Poststart => hooks.poststart(),
            Stage::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

/// Why one hook failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot exec it: {0}")]
    Exec(std::io::Error),
    #[error("cannot wait for it: {0}")]
    Wait(std::io::Error),
    #[error("{status}, stdout: {stdout}, stderr: {stderr}")]
    Failed {
        status: String,
        stdout: String,
        stderr: String,
    },
    #[error("hook ran past specified timeout of {0:.1}s")]
    Timeout(f64),
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "{0} hooks are not supported: they run inside the container's namespaces, which are in the microVM, and cocoon does not run hooks inside the guest yet"
    )]
    InGuest(&'static str),
    #[error("invalid {stage} hook #{index}: path {} is not absolute", path.display())]
    RelativePath {
        stage: &'static str,
        index: usize,
        path: PathBuf,
    },
    #[error("invalid {stage} hook #{index}: timeout must be greater than zero, not {timeout}")]
    Timeout {
        stage: &'static str,
        index: usize,
        timeout: i64,
    },
    #[error("cannot encode the container's state for its hooks: {0}")]
    State(serde_json::Error),
    #[error("error running {stage} hook #{index} ({}): {source}", path.display())]
    Failed {
        stage: &'static str,
        index: usize,
        path: PathBuf,
        source: RunError,
    },
}

/// Refuses, before anything is created, hooks cocoon cannot run and hooks the spec forbids.
pub fn check(hooks: Option<&Hooks>) -> Result<(), HookError> {
    let Some(hooks) = hooks else {
        return Ok(());
    };
    for stage in [Stage::CreateContainer, Stage::StartContainer] {
        if !stage.list(hooks).is_empty() {
            return Err(HookError::InGuest(stage.name()));
        }
    }
    for stage in ALL {
        for (index, hook) in stage.list(hooks).iter().enumerate() {
            if !hook.path().is_absolute() {
                return Err(HookError::RelativePath {
                    stage: stage.name(),
                    index,
                    path: hook.path().clone(),
                });
            }
            if let Some(timeout) = hook.timeout()
                && timeout <= 0
            {
                return Err(HookError::Timeout {
                    stage: stage.name(),
                    index,
                    timeout,
                });
            }
        }
    }
    Ok(())
}

/// Runs the hooks of each stage in turn, each with `state` on stdin; the first failure ends
/// the run and is returned (createRuntime and prestart: the verb fails).
pub fn run(hooks: Option<&Hooks>, stages: &[Stage], state: &State) -> Result<(), HookError> {
    let Some(hooks) = hooks else {
        return Ok(());
    };
    if stages.iter().all(|stage| stage.list(hooks).is_empty()) {
        return Ok(());
    }
    let input = serde_json::to_vec(state).map_err(HookError::State)?;
    for &stage in stages {
        for (index, hook) in stage.list(hooks).iter().enumerate() {
            run_indexed(stage, index, hook, &input)?;
        }
    }
    Ok(())
}

/// Runs every hook of `stage`; a failure is logged as a warning and the rest still run, as the
/// spec asks for poststart and poststop.
pub fn run_warning(hooks: Option<&Hooks>, stage: Stage, state: &State) {
    let Some(hooks) = hooks else {
        return;
    };
    let list = stage.list(hooks);
    if list.is_empty() {
        return;
    }
    let input = match serde_json::to_vec(state) {
        Ok(input) => input,
        Err(e) => {
            tracing::warn!("{}", HookError::State(e));
            return;
        }
    };
    for (index, hook) in list.iter().enumerate() {
        if let Err(e) = run_indexed(stage, index, hook, &input) {
            tracing::warn!("{e}");
        }
    }
}

fn run_indexed(stage: Stage, index: usize, hook: &Hook, input: &[u8]) -> Result<(), HookError> {
    tracing::debug!(
        hook = %hook.path().display(),
        "running {} hook #{index}",
        stage.name()
    );
    run_one(hook, input).map_err(|source| HookError::Failed {
        stage: stage.name(),
        index,
        path: hook.path().clone(),
        source,
    })
}

fn run_one(hook: &Hook, input: &[u8]) -> Result<(), RunError> {
    let mut command = Command::new(hook.path());
    if let Some((argv0, rest)) = hook.args().as_deref().unwrap_or_default().split_first() {
        command.arg0(argv0).args(rest);
    }
    // The hook's environment is its `env` and nothing of ours.
    command.env_clear();
    for entry in hook.env().as_deref().unwrap_or_default() {
        match entry.split_once('=') {
            Some((key, value)) => {
                command.env(key, value);
            }
            None => tracing::warn!(
                hook = %hook.path().display(),
                "hook environment entry {entry:?} is not KEY=VALUE: left out"
            ),
        }
    }
    // A group of its own, so that a timeout kills what the hook started as well.
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().map_err(RunError::Exec)?;
    // Written from a thread: a hook that never reads its stdin must not block us.
    if let Some(mut stdin) = child.stdin.take() {
        let input = input.to_vec();
        std::thread::spawn(move || {
            // A hook may exit without reading its state: EPIPE is not our failure.
            let _ = stdin.write_all(&input);
        });
    }
    let stdout = capture(child.stdout.take());
    let stderr = capture(child.stderr.take());
    let timeout = hook
        .timeout()
        .map(|secs| Duration::from_secs(secs.max(0) as u64));
    match wait(&mut child, timeout).map_err(RunError::Wait)? {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(RunError::Failed {
            status: describe(status),
            stdout: collected(&stdout),
            stderr: collected(&stderr),
        }),
        None => {
            let pid = child.id() as i32;
            // SAFETY: kill(2) on the hook's process group. The hook is not reaped yet, so its pid,
            // which is the group's id, cannot have been reused.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            Err(RunError::Timeout(
                timeout.map(|t| t.as_secs_f64()).unwrap_or_default(),
            ))
        }
    }
}

/// Waits for the hook; `None` once `timeout` has passed with the hook still running. The hook
/// stays unreaped until it has exited, so killing it by pid afterwards is safe.
fn wait(child: &mut Child, timeout: Option<Duration>) -> std::io::Result<Option<ExitStatus>> {
    let Some(timeout) = timeout else {
        return child.wait().map(Some);
    };
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Reads a pipe to its end on a thread, keeping the first [`OUTPUT_LIMIT`] bytes; the whole
/// pipe is drained so a chatty hook never blocks on it.
fn capture(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let room = OUTPUT_LIMIT - kept.len();
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(kept);
        });
    }
    rx
}

fn collected(output: &mpsc::Receiver<Vec<u8>>) -> String {
    output
        .recv_timeout(OUTPUT_GRACE)
        .map(|bytes| String::from_utf8_lossy(&bytes).trim_end().to_owned())
        .unwrap_or_default()
}

/// In the words of runc's errors (Go's), with a signal as its number.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal: {signal}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::ContainerState;
    use std::os::unix::fs::PermissionsExt;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("cocoon-hooks-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn script(&self, name: &str, body: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn parse(json: serde_json::Value) -> Hooks {
        serde_json::from_value(json).unwrap()
    }

    fn state(status: ContainerState) -> State {
        let mut state = State::default();
        state
            .set_version("1.0.2".into())
            .set_id("c1".into())
            .set_status(status)
            .set_pid(Some(4242))
            .set_bundle("/bundles/c1".into());
        state
    }

    #[test]
    fn a_hook_gets_the_state_its_args_and_exactly_its_env() {
        let dir = Dir::new("record");
        let out = dir.0.join("out");
        // The hook is the shell itself, so its argv (the kernel keeps argv[0] for a binary,
        // not for a script) is what /proc shows. No PATH reaches it: builtins and absolute
        // paths only.
        let script = dir.script(
            "record",
            &format!(
                r#"IFS= read -r state || true
/usr/bin/tr '\0' '\n' < /proc/$$/cmdline > {out}
printf 'state=%s\n' "$state" >> {out}
/usr/bin/env >> {out}"#,
                out = out.display()
            ),
        );
        let hooks = parse(serde_json::json!({
            "createRuntime": [{
                "path": "/bin/sh",
                "args": ["my-hook", script, "one", "two words"],
                "env": ["HOOK_VAR=x=y", "OTHER="],
            }]
        }));
        run(Some(&hooks), &CREATE, &state(ContainerState::Creating)).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            ["my-hook", script.to_str().unwrap(), "one", "two words"],
            "{text}"
        );
        let state: serde_json::Value =
            serde_json::from_str(lines[4].strip_prefix("state=").unwrap()).unwrap();
        assert_eq!(
            state,
            serde_json::json!({
                "ociVersion": "1.0.2",
                "id": "c1",
                "status": "creating",
                "pid": 4242,
                "bundle": "/bundles/c1",
            })
        );
        // The shell adds PWD of its own; nothing of ours (PATH, HOME, ...) is there.
        let mut env: Vec<&str> = lines[5..].to_vec();
        env.retain(|l| !l.starts_with("PWD="));
        env.sort();
        assert_eq!(env, ["HOOK_VAR=x=y", "OTHER="], "{text}");
    }

    #[test]
    fn hooks_run_in_order_and_the_first_failure_stops_the_run() {
        let dir = Dir::new("fail");
        let log = dir.0.join("log");
        let note = |name: &str| dir.script(name, &format!("echo {name} >> {}", log.display()));
        let (pre, first) = (note("pre"), note("first"));
        let fail = dir.script("fail", "echo to-out; echo to-err >&2; exit 3");
        let never = note("never");
        let hooks = parse(serde_json::json!({
            "prestart": [{"path": pre}],
            "createRuntime": [{"path": first}, {"path": fail}, {"path": never}],
        }));
        let err = run(Some(&hooks), &CREATE, &state(ContainerState::Creating))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "error running createRuntime hook #1 ({}): exit status 3",
                fail.display()
            )),
            "{err}"
        );
        assert!(err.contains("stdout: to-out, stderr: to-err"), "{err}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\nfirst\n");

        // Poststart and poststop: a failure is a warning and the next hook still runs.
        let after = note("after");
        let hooks = parse(serde_json::json!({
            "poststop": [{"path": fail}, {"path": after}],
        }));
        run_warning(
            Some(&hooks),
            Stage::Poststop,
            &state(ContainerState::Stopped),
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pre\nfirst\nafter\n"
        );
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let dir = Dir::new("timeout");
        let pid_file = dir.0.join("sleeper");
        let hook = dir.script(
            "slow",
            &format!("/bin/sleep 30 & echo $! > {}; wait", pid_file.display()),
        );
        let hooks = parse(serde_json::json!({"prestart": [{"path": hook, "timeout": 1}]}));
        let started = Instant::now();
        let err = run(Some(&hooks), &CREATE, &state(ContainerState::Creating))
            .unwrap_err()
            .to_string();
        let took = started.elapsed();
        assert!(
            err.ends_with("hook ran past specified timeout of 1.0s"),
            "{err}"
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let sleeper: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The sleeper was the hook's child: killed with its group (and reaped by whoever
        // inherited it).
        let running = || {
            std::fs::read_to_string(format!("/proc/{sleeper}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !running(),
            "the hook's child {sleeper} outlived the timeout"
        );
    }

    #[test]
    fn a_missing_hook_fails_with_its_path() {
        let hooks = parse(serde_json::json!({"prestart": [{"path": "/nonexistent/hook"}]}));
        let err = run(Some(&hooks), &CREATE, &state(ContainerState::Creating))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("error running prestart hook #0 (/nonexistent/hook): cannot exec it:"),
            "{err}"
        );
        // Without hooks, nothing runs and nothing fails.
        run(None, &CREATE, &state(ContainerState::Creating)).unwrap();
        run(
            Some(&Hooks::default()),
            &CREATE,
            &state(ContainerState::Creating),
        )
        .unwrap();
    }

    #[test]
    fn check_refuses_guest_hooks_and_bad_hooks() {
        check(None).unwrap();
        check(Some(&parse(serde_json::json!({
            "prestart": [{"path": "/bin/true"}],
            "poststop": [{"path": "/bin/true", "timeout": 5}],
        }))))
        .unwrap();
        for stage in ["createContainer", "startContainer"] {
            let err = check(Some(&parse(
                serde_json::json!({stage: [{"path": "/bin/true"}]}),
            )))
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with(&format!("{stage} hooks are not supported")),
                "{err}"
            );
            assert!(err.contains("inside the guest"), "{err}");
        }
        // An empty list asks for nothing.
        check(Some(&parse(serde_json::json!({"createContainer": []})))).unwrap();
        let err = check(Some(&parse(
            serde_json::json!({"poststart": [{"path": "/bin/true"}, {"path": "true"}]}),
        )))
        .unwrap_err()
        .to_string();
        assert_eq!(err, "invalid poststart hook #1: path true is not absolute");
        let err = check(Some(&parse(
            serde_json::json!({"createRuntime": [{"path": "/bin/true", "timeout": 0}]}),
        )))
        .unwrap_err()
        .to_string();
        assert!(err.contains("timeout must be greater than zero"), "{err}");
    }
}
