//! `cocoon`: an OCI runtime with runc's command line, where each container is a microVM.
//!
//! The verbs live in `cli/`, one file each, thin over the `cocoon-runtime` library; `monitor/`
//! is the process that stands in for a container's init (it holds the container's sandbox).

mod cli;
mod error;
mod logging;
mod monitor;

use cocoon_runtime::{config, console, hooks, signal, state, stdio};

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use error::CliError;

fn dispatch(cli: &Cli) -> Result<(), CliError> {
    let global = &cli.global;
    match &cli.command {
        Command::Create(args) => cli::create::create(global, args),
        Command::Start { id } => cli::start::start(global, id),
        Command::State { id } => cli::state::state(global, id),
        Command::Kill { all, id, signal } => cli::kill::kill(global, id, signal, *all),
        Command::Delete { force, id } => cli::delete::delete(global, id, *force),
        Command::Run { create, detach, .. } => cli::run::run(global, create, *detach),
        Command::Pause { id } => cli::pause::pause(global, id),
        Command::Resume { id } => cli::pause::resume(global, id),
        Command::Exec(args) => cli::exec::exec(global, args),
        Command::Ps { format, id, .. } => cli::ps::ps(global, id, format),
        Command::Update(args) => cli::update::update(global, args),
        Command::Events(args) => cli::events::events(global, args),
        Command::List { format, quiet } => cli::list::list(global, format, *quiet),
        Command::Features => {
            println!("{:#}", cli::features::features());
            Ok(())
        }
        Command::Check { format } => cli::check::check(format),
        Command::Spec { bundle } => cli::spec::spec(bundle),
        Command::Gc { max_age_hours } => cli::gc::gc(*max_age_hours),
        Command::Template { command } => cli::template::template(command),
        Command::Monitor { id, restore_from } => {
            state::check_id(id)?;
            let dir = global.root.join(id);
            let report = monitor::report_channel();
            monitor::container::run(&dir, id, report, false, restore_from.as_deref())
        }
        Command::Checkpoint(args) => cli::checkpoint::checkpoint(global, args),
        Command::Restore(args) => cli::checkpoint::restore(global, args),
        Command::ExecMonitor { id, exec_id } => cli::exec::exec_monitor(global, id, exec_id),
    }
}

fn main() -> ExitCode {
    logging::mark_start();
    let cli = Cli::parse();
    if let Err(e) = logging::init(
        cli.global.log.as_deref(),
        cli.global.log_format,
        cli.global.debug,
    ) {
        eprintln!("cocoon: cannot open the log: {e}");
        return ExitCode::from(1);
    }
    match dispatch(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}
