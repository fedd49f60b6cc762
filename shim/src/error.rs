//! The CLI's errors: one line each, worded like runc's where runc has the same error.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "invalid container id {0:?}: ids are 1 to 1024 characters of [A-Za-z0-9_.+-] and not \".\" or \"..\""
    )]
    InvalidId(String),
    #[error("container with id exists: {0}")]
    Exists(String),
    #[error("container {0} does not exist")]
    NotExist(String),
    #[error("{0}")]
    Bundle(#[from] crate::bundle::BundleError),
    #[error("container {id} is {status}, not {wanted}")]
    WrongState {
        id: String,
        status: &'static str,
        wanted: &'static str,
    },
    #[error("cannot delete container {0} that is not stopped: {1}")]
    NotStopped(String, &'static str),
    #[error("invalid signal {0:?}")]
    InvalidSignal(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Agent(#[from] cocoon_agent_protocol::client::ClientError),
    #[error("{0}")]
    Image(#[from] crate::images::ImageError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> CliError {
        let path = path.into();
        move |source| CliError::Io { what, path, source }
    }
}
