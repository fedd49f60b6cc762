//! `cocoon run`: create and start. Without `--detach` this process becomes the container's
//! process (the monitor) and exits with its status.

use super::{CreateArgs, Global};
use crate::cli::create::{create, prepare, record, write_pid_file};
use crate::cli::start::start;
use crate::error::CliError;

pub fn run(global: &Global, args: &CreateArgs, detach: bool) -> Result<(), CliError> {
    if detach {
        create(global, args)?;
        return start(global, &args.id);
    }
    let (dir, bundle) = prepare(global, args)?;
    let pid = std::process::id() as i32;
    if let Err(e) = dir
        .write(&record(&dir, &bundle, pid, true))
        .and_then(|()| write_pid_file(args.pid_file.as_deref(), pid))
    {
        let _ = dir.remove();
        return Err(e);
    }
    let path = dir.path.clone();
    // Other verbs (kill, state) must be able to lock the container while it runs.
    drop(dir);
    crate::monitor::container::run(&path, &args.id, None, true, None)
}
