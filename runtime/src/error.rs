//! The runtime's errors: one line each, worded like runc's where runc has the same error (the
//! `cocoon` CLI prints them as they are).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("invalid resources: {0}")]
    InvalidResources(String),
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
    Share(#[from] crate::shares::ShareError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Hook(#[from] crate::hooks::HookError),
    #[error("the microVM could not start: {0}")]
    Vm(#[from] cocoon_vmm::builder::BuildError),
    #[error("the microVM {0}")]
    VmControl(#[from] cocoon_vmm::vm::VmError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] cocoon_vmm::snapshot::SnapshotError),
    #[error("the microVM stopped while booting: {0}")]
    EndedWhileBooting(cocoon_vmm::lifecycle::ExitReason),
    #[error("the microVM stopped: {0}")]
    VmEnded(cocoon_vmm::lifecycle::ExitReason),
    #[error("{0}")]
    Admission(String),
    #[error("the guest agent did not answer: {0}")]
    GuestStuck(crate::progress::Stuck),
    #[error("{0}")]
    Stdio(#[from] crate::stdio::StdioError),
    #[error("{0}")]
    Control(#[from] crate::control::ControlError),
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("corrupt {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("the root filesystem needs {layers} disk images but a microVM has {slots} disk slots")]
    TooManyLayers { layers: usize, slots: usize },
    #[error("the process has a terminal: --console-socket is required")]
    ConsoleSocketRequired,
    #[error("container not running")]
    NotRunning,
    #[error("container {0} is paused")]
    Paused(String),
    #[error("container {0} is not paused")]
    NotPaused(String),
    /// What a container's monitor process reported (its own error, as a line of text).
    #[error("{0}")]
    Monitor(String),
    #[error("{0}")]
    Network(#[from] crate::network::NetworkError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Whether restoring a template failed in a way that says the template is at fault (its
    /// snapshot unreadable or refused, or its guest not answering), so making it again helps.
    pub fn is_load_failure(&self) -> bool {
        matches!(
            self,
            Error::Snapshot(_) | Error::EndedWhileBooting(_) | Error::GuestStuck(_)
        )
    }

    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}
