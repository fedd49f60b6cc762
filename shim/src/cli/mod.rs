//! The command line, as runc has it: global flags, then one verb per file in this folder.

pub mod check;
pub mod checkpoint;
pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod gc;
pub mod kill;
pub mod list;
pub mod pause;
pub mod ps;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod template;
pub mod update;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// cocoon: an OCI runtime that runs every container in its own KVM microVM, with runc's
/// command line.
#[derive(Parser, Debug)]
#[command(name = "cocoon", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Directory for the state of containers.
    #[arg(long, global = true, default_value = "/run/cocoon", value_name = "DIR")]
    pub root: PathBuf,
    /// Write logs to this file instead of stderr.
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log debug messages too.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility; cgroups are the guest's own.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, value_name = "VALUE", num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility; checkpoints are VM snapshots, CRIU is not used.
    #[arg(long, global = true, value_name = "PATH")]
    pub criu: Option<PathBuf>,
}

/// Flags of `create` and `run`.
#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// Path to the bundle directory.
    #[arg(short, long, default_value = ".", value_name = "DIR")]
    pub bundle: PathBuf,
    /// A Unix socket that receives the pty master when the process has a terminal.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Write the pid of the container's process (the microVM) to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest always pivots).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility; extra fds are not passed into the VM.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub preserve_fds: u32,
    /// Boot the microVM instead of restoring it from a template.
    #[arg(long)]
    pub no_template: bool,
    /// The container id.
    pub id: String,
}

/// Flags of `exec`, as runc has them.
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// A JSON file with the OCI process to run (instead of COMMAND and the flags below).
    #[arg(short, long, value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// Return once the process has started.
    #[arg(short, long)]
    pub detach: bool,
    /// Write the pid of the process's monitor to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// A Unix socket that receives the pty master (with --tty).
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Set an environment variable (repeatable).
    #[arg(short, long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// UID[:GID] to run as.
    #[arg(short, long, value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Additional group ids (repeatable).
    #[arg(short = 'g', long, value_name = "GID")]
    pub additional_gids: Vec<u32>,
    /// Add a capability (repeatable).
    #[arg(short, long, value_name = "CAP")]
    pub cap: Vec<String>,
    /// Set no_new_privileges for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility.
    #[arg(long, value_name = "LABEL")]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, value_name = "PROFILE")]
    pub apparmor: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Vec<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub ignore_paused: bool,
    pub id: String,
    /// The command and its arguments (unless --process is given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// runc's CRIU options, accepted by `checkpoint` and `restore` for compatibility: a VM snapshot
/// has all of a container's state, so they change nothing.
#[derive(Args, Debug, Clone)]
pub struct CriuArgs {
    #[arg(long, value_name = "DIR")]
    pub work_path: Option<PathBuf>,
    #[arg(long)]
    pub tcp_established: bool,
    #[arg(long)]
    pub file_locks: bool,
    #[arg(long)]
    pub ext_unix_sk: bool,
    #[arg(long)]
    pub shell_job: bool,
}

/// Flags of `checkpoint`.
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Where to write the checkpoint.
    #[arg(long, value_name = "DIR")]
    pub image_path: PathBuf,
    /// Keep the container running after the checkpoint.
    #[arg(long)]
    pub leave_running: bool,
    #[command(flatten)]
    pub criu: CriuArgs,
    pub id: String,
}

/// Flags of `restore`.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// The checkpoint to restore.
    #[arg(long, value_name = "DIR")]
    pub image_path: PathBuf,
    /// Return once the container runs.
    #[arg(short, long)]
    pub detach: bool,
    #[command(flatten)]
    pub criu: CriuArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a container: boot its microVM and prepare the process, stopped before exec.
    Create(CreateArgs),
    /// Run the process of a created container.
    Start { id: String },
    /// Print the state of a container as JSON (OCI runtime spec).
    State { id: String },
    /// Send a signal (default SIGTERM) to the container's init process, or with --all to all
    /// of its processes.
    Kill {
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Remove a stopped container (with --force, stop it first).
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; without --detach, wait for it and exit with its status.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Return once the container has started.
        #[arg(short, long)]
        detach: bool,
        /// Accepted for runc compatibility.
        #[arg(long)]
        keep: bool,
    },
    /// Save a running container to a directory: a snapshot of its microVM. The container stops
    /// unless --leave-running.
    Checkpoint(CheckpointArgs),
    /// Restore a checkpointed container (under its own id) and run it from where it was.
    Restore(RestoreArgs),
    /// Suspend every process of the container: the microVM's vCPUs stop.
    Pause { id: String },
    /// Let a paused container go on.
    Resume { id: String },
    /// Run a further process in a running container.
    Exec(Box<ExecArgs>),
    /// Change the resource limits of a container.
    Update(update::UpdateArgs),
    /// Print the container's stats as JSON events (once with --stats).
    Events(events::EventsArgs),
    /// List the processes of a container (guest pids).
    Ps {
        #[arg(short, long, default_value = "table", value_name = "table|json")]
        format: String,
        id: String,
        /// Accepted for runc compatibility (ps(1) options).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table", value_name = "table|json")]
        format: String,
        /// Print only the ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print what this runtime supports, as JSON (OCI runtime features).
    Features,
    /// Check whether this host can run cocoon's microVMs (exits non-zero when it cannot).
    Check {
        #[arg(short, long, default_value = "text", value_name = "text|json")]
        format: String,
    },
    /// Manage the templates (snapshots of booted microVMs) that sandboxes are restored from.
    Template {
        #[command(subcommand)]
        command: template::TemplateCommand,
    },
    /// Remove cached layer images that no VM holds open and no container has used lately.
    Gc {
        /// Remove those unused for this many hours (default: `layer_cache_max_age_hours`).
        #[arg(long, value_name = "HOURS")]
        max_age_hours: Option<u64>,
    },
    /// Write a default config.json to the bundle directory.
    Spec {
        #[arg(short, long, default_value = ".", value_name = "DIR")]
        bundle: PathBuf,
    },
    /// Internal: the process that stands in for a container's init.
    #[command(hide = true)]
    Monitor {
        id: String,
        /// Restore the sandbox from this checkpoint instead of booting it.
        #[arg(long, value_name = "DIR")]
        restore_from: Option<PathBuf>,
    },
    /// Internal: the process that stands in for an exec'd process.
    #[command(hide = true)]
    ExecMonitor { id: String, exec_id: String },
}

/// A handle on container `id` through its VM's vsock socket, whose replies are awaited for as
/// long as the guest makes progress by the config's limits (`guest_cpu_budget_secs`,
/// `guest_idle_secs`).
pub fn container_at(vsock_socket: &std::path::Path, id: &str) -> cocoon_runtime::Container {
    let limits = cocoon_runtime::config::Config::load()
        .map(|config| config.guest_limits())
        .unwrap_or_default();
    cocoon_runtime::Container::new(vsock_socket, id).with_limits(limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("cocoon").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The exact command lines containerd's runc shim and Podman issue (ENGINE-FACTS.md).
    #[test]
    fn engine_command_lines_parse() {
        let cli = parse(&[
            "--root",
            "/run/containerd/runc/default",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "c1",
        ]);
        assert!(
            matches!(cli.command, Command::Create(ref a) if a.id == "c1" && a.pid_file.is_some())
        );
        assert_eq!(cli.global.log_format, LogFormat::Json);
        let cli = parse(&["--systemd-cgroup", "kill", "--all", "c1", "9"]);
        assert!(
            matches!(cli.command, Command::Kill { all: true, ref signal, .. } if signal == "9")
        );
        let cli = parse(&["delete", "--force", "c1"]);
        assert!(matches!(cli.command, Command::Delete { force: true, .. }));
        // runc's `spec --rootless` lands on the global flag, which is accepted and ignored.
        let cli = parse(&["spec", "--rootless"]);
        assert!(matches!(cli.command, Command::Spec { .. }));
        assert_eq!(cli.global.rootless.as_deref(), Some("true"));
        parse(&[
            "create",
            "--bundle",
            "/b",
            "--console-socket",
            "/tmp/pty.sock",
            "--no-pivot",
            "c1",
        ]);
        parse(&["run", "-d", "--bundle", "/b", "c1"]);
        parse(&["ps", "--format", "json", "c1"]);
        parse(&["list", "-q"]);
        let cli = parse(&[
            "exec",
            "--process",
            "/tmp/runc-process1",
            "--detach",
            "--pid-file",
            "/b/e1.pid",
            "c1",
        ]);
        assert!(matches!(cli.command, Command::Exec(ref e) if e.detach && e.process.is_some()));
        let cli = parse(&[
            "exec", "-t", "-e", "A=1", "--cwd", "/tmp", "c1", "sh", "-c", "ls -l",
        ]);
        assert!(
            matches!(cli.command, Command::Exec(ref e) if e.command == ["sh", "-c", "ls -l"] && e.tty)
        );
    }
}
