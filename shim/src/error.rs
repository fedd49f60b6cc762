//! The CLI's errors are the runtime's: one line each, worded like runc's.

pub use cocoon_runtime::Error as CliError;
