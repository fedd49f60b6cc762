//! The process that stands in for a container's init: it runs the container's microVM in its
//! own threads, holds the container's stdio (or terminal) and relays it to the guest, forwards
//! the signals it receives to the container's init, and exits with the container's status (by
//! the same signal when the container was killed by one). Engines see a process like runc's
//! container init: its pid in `--pid-file`, its exit status the container's.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::client::{AgentClient, attach_stdio};
use cocoon_agent_protocol::message::{
    CreateContainer, ExitStatus, GuestSetup, StdioConfig, StdioStream,
};
use cocoon_vmm::builder;
use cocoon_vmm::config::{ConsoleConfig, DiskConfig, VmConfig, VsockConfig};

use crate::console;
use crate::state::{EXIT_FILE, VSOCK_SOCKET, write_atomically};

pub const LAUNCH_FILE: &str = "launch.json";
/// The fd on which a monitor started by `create` reports back.
pub const REPORT_FD: RawFd = 3;

/// Everything the monitor needs, written by `create` before it starts the monitor.
#[derive(Debug, Serialize, Deserialize)]
pub struct Launch {
    pub spec: Spec,
    pub images: Vec<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub boot_timeout_secs: u64,
}

/// The monitor's one message to `create`: the container exists, or why it does not.
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    Created,
    Failed(String),
}

/// Signals the monitor passes on to the container's init. The synchronous ones (SEGV, ...)
/// and those with a meaning for the monitor itself are left alone.
const FORWARDED: [i32; 12] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTERM,
    libc::SIGALRM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGPWR,
    libc::SIGWINCH,
    libc::SIGURG,
];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Runs the container's monitor; never returns. Without a `report` (that is, under `run`),
/// a container that could not be created or started is removed here.
pub fn run(dir: &Path, id: &str, report: Option<File>, start: bool) -> ! {
    // Before any thread exists, so every thread (the VM's too) inherits the mask.
    let set = signal_set();
    // SAFETY: set is initialised; this only changes the calling thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let mut report = report;
    let fail = |report: &mut Option<File>, message: String| -> ! {
        tracing::error!("{message}");
        match report.as_mut() {
            Some(file) => {
                let _ = writeln!(
                    file,
                    "{}",
                    serde_json::to_string(&Report::Failed(message)).unwrap_or_default()
                );
            }
            None => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        std::process::exit(1)
    };
    let launch: Launch = match std::fs::read(dir.join(LAUNCH_FILE))
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_slice(&t).map_err(|e| e.to_string()))
    {
        Ok(launch) => launch,
        Err(e) => fail(
            &mut report,
            format!("cannot read {}: {e}", dir.join(LAUNCH_FILE).display()),
        ),
    };
    let uds = dir.join(VSOCK_SOCKET);
    let vm_ended = start_vm(&launch, &uds);
    let session = match Session::open(id, &launch, &uds, &vm_ended, start) {
        Ok(session) => session,
        Err(message) => fail(&mut report, message),
    };
    if let Some(mut file) = report.take() {
        let _ = writeln!(
            file,
            "{}",
            serde_json::to_string(&Report::Created).unwrap_or_default()
        );
    }
    let status = session.wait(&vm_ended, set);
    let _ = write_atomically(
        &dir.join(EXIT_FILE),
        &serde_json::to_vec(&status).unwrap_or_default(),
    );
    exit_like(status)
}

/// Boots the VM on its own thread; the channel says when (and why) it ended.
fn start_vm(launch: &Launch, uds: &Path) -> mpsc::Receiver<String> {
    let config = VmConfig {
        kernel: launch.kernel.clone(),
        initrd: Some(launch.initrd.clone()),
        cmdline: None,
        cpus: launch.cpus,
        memory_mib: launch.memory_mib,
        disks: launch
            .images
            .iter()
            .map(|image| DiskConfig {
                path: image.clone(),
                read_only: true,
            })
            .collect(),
        rng: false,
        vsock: Some(VsockConfig {
            cid: 3,
            uds: uds.to_owned(),
        }),
        net: None,
        console: ConsoleConfig::Off,
    };
    let (tx, rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("vm".into())
        .spawn(move || {
            let reason = match builder::run_with_signals(
                &config,
                Instant::now(),
                SystemTime::now(),
                false,
            ) {
                Ok(outcome) => {
                    let reason = outcome.reason.to_string();
                    // The vCPU threads may still be in KVM_RUN: keep guest memory mapped.
                    std::mem::forget(outcome);
                    reason
                }
                Err(e) => format!("the microVM could not start: {e}"),
            };
            let _ = tx.send(reason);
        });
    rx
}

struct Session {
    id: String,
    uds: PathBuf,
    relays: Vec<JoinHandle<()>>,
    /// The host pty's slave, for window-size changes.
    pty_slave: Option<OwnedFd>,
}

/// Copies `from` to `to` until EOF; then half-closes `shutdown`, so the peer sees EOF too.
fn relay(
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    shutdown: Option<UnixStream>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = to.flush();
                }
            }
        }
        if let Some(socket) = shutdown {
            let _ = socket.shutdown(std::net::Shutdown::Write);
        }
    })
}

/// Our own fd `fd` as a File, if it is open.
fn inherited(fd: RawFd) -> Option<File> {
    // SAFETY: fcntl(F_GETFD) only asks whether fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: dup gives us our own copy of an open fd.
    let copy = unsafe { libc::dup(fd) };
    // SAFETY: copy is a new fd nothing else owns.
    (copy >= 0).then(|| unsafe { File::from_raw_fd(copy) })
}

impl Session {
    fn open(
        id: &str,
        launch: &Launch,
        uds: &Path,
        vm_ended: &mpsc::Receiver<String>,
        start: bool,
    ) -> Result<Session, String> {
        let mut client =
            wait_for_agent(uds, vm_ended, Duration::from_secs(launch.boot_timeout_secs))?;
        let mut entropy = vec![0u8; 64];
        // SAFETY: getrandom fills the buffer it is given.
        unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        client
            .setup_guest(GuestSetup {
                hostname: Some(
                    launch
                        .spec
                        .hostname()
                        .clone()
                        .unwrap_or_else(|| id.chars().take(64).collect()),
                ),
                realtime_ns: Some(now.as_nanos() as u64),
                entropy,
            })
            .map_err(|e| e.to_string())?;

        let terminal = launch.spec.process().as_ref().and_then(|p| p.terminal()) == Some(true);
        let mut session = Session {
            id: id.to_owned(),
            uds: uds.to_owned(),
            relays: Vec::new(),
            pty_slave: None,
        };
        let attach = |stream| attach_stdio(uds, id, None, stream).map_err(|e| e.to_string());
        let stdio = if terminal {
            let socket = launch
                .console_socket
                .as_ref()
                .ok_or("the process has a terminal but no --console-socket was given")?;
            let pty = console::open_pty().map_err(|e| e.to_string())?;
            console::send_fd(socket, pty.master.as_raw_fd())
                .map_err(|e| format!("console socket {}: {e}", socket.display()))?;
            // SAFETY: the slave becomes our controlling terminal (we are a session leader), so
            // window-size changes reach us as SIGWINCH.
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
            let conn = attach(StdioStream::Terminal)?;
            let slave = File::from(pty.slave.try_clone().map_err(|e| e.to_string())?);
            let slave_in = slave.try_clone().map_err(|e| e.to_string())?;
            let conn_in = conn.try_clone().map_err(|e| e.to_string())?;
            session.relays.push(relay(conn, slave, None));
            // Input relay: not joined at exit (the engine may never close the terminal).
            relay(slave_in, conn_in, None);
            session.pty_slave = Some(pty.slave);
            StdioConfig {
                terminal: true,
                ..StdioConfig::default()
            }
        } else {
            let stdin = inherited(0);
            if let Some(input) = stdin {
                let conn = attach(StdioStream::Stdin)?;
                let shutdown = conn.try_clone().map_err(|e| e.to_string())?;
                relay(input, conn, Some(shutdown));
            }
            for (fd, stream) in [(1, StdioStream::Stdout), (2, StdioStream::Stderr)] {
                if let Some(output) = inherited(fd) {
                    let conn = attach(stream)?;
                    session.relays.push(relay(conn, output, None));
                }
            }
            StdioConfig {
                terminal: false,
                stdin: inherited(0).is_some(),
                stdout: inherited(1).is_some(),
                stderr: inherited(2).is_some(),
            }
        };
        let layers = (0..launch.images.len())
            .map(|i| format!("/dev/vd{}", (b'a' + i as u8) as char))
            .collect();
        client
            .create_container(CreateContainer {
                container_id: id.to_owned(),
                spec: Box::new(launch.spec.clone()),
                layers,
                stdio,
            })
            .map_err(|e| e.to_string())?;
        if let Some((rows, cols)) = session
            .pty_slave
            .as_ref()
            .and_then(|s| console::window_size(s.as_raw_fd()))
        {
            let _ = client.resize_terminal(id, None, rows, cols);
        }
        if start {
            client.start_container(id).map_err(|e| e.to_string())?;
        }
        Ok(session)
    }

    /// Forwards signals until the container's init exits; returns its status.
    fn wait(self, vm_ended: &mpsc::Receiver<String>, set: libc::sigset_t) -> ExitStatus {
        let (tx, rx) = mpsc::channel();
        let (uds, id) = (self.uds.clone(), self.id.clone());
        let waiter = tx.clone();
        std::thread::spawn(move || {
            let status = AgentClient::connect(&uds).and_then(|mut c| c.wait(&id, None));
            let _ = waiter.send(status.map_err(|e| e.to_string()));
        });
        let (uds, id) = (self.uds.clone(), self.id.clone());
        let slave = self.pty_slave.as_ref().map(|s| s.as_raw_fd());
        std::thread::spawn(move || forward_signals(&uds, &id, slave, set));
        let killed = ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
            oom_killed: false,
        };
        let status = loop {
            if let Ok(result) = rx.recv_timeout(Duration::from_millis(200)) {
                break result.unwrap_or_else(|e| {
                    tracing::error!("lost the guest agent: {e}");
                    killed
                });
            }
            if let Ok(reason) = vm_ended.try_recv() {
                tracing::error!("the microVM ended before the container: {reason}");
                break killed;
            }
        };
        // Output the container wrote before exiting is still on its way: let it arrive.
        let deadline = Instant::now() + Duration::from_secs(5);
        for relay in self.relays {
            while !relay.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        status
    }
}

fn wait_for_agent(
    uds: &Path,
    vm_ended: &mpsc::Receiver<String>,
    timeout: Duration,
) -> Result<AgentClient, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(reason) = vm_ended.try_recv() {
            return Err(format!("the microVM stopped while booting: {reason}"));
        }
        if let Ok(mut client) = AgentClient::connect(uds)
            && client.hello().is_ok()
        {
            return Ok(client);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the guest agent did not answer within {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn forward_signals(uds: &Path, id: &str, pty_slave: Option<RawFd>, set: libc::sigset_t) {
    loop {
        let mut signal = 0;
        // SAFETY: set is initialised and blocked in every thread.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            continue;
        }
        let Ok(mut client) = AgentClient::connect(uds) else {
            continue;
        };
        let result = if signal == libc::SIGWINCH {
            match pty_slave.and_then(console::window_size) {
                Some((rows, cols)) => client.resize_terminal(id, None, rows, cols),
                None => Ok(()),
            }
        } else {
            client.signal(id, None, signal, false)
        };
        if let Err(e) = result {
            tracing::warn!("cannot pass signal {signal} to the container: {e}");
        }
    }
}

/// Exits as the container did: with its code, or killed by its signal.
fn exit_like(status: ExitStatus) -> ! {
    if let Some(signal) = status.signal {
        // SAFETY: restore the default action and unblock it, then deliver it to ourselves.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
        }
        // A signal whose default is to continue or be ignored: exit the way a shell reports it.
        std::process::exit(128 + signal);
    }
    std::process::exit(status.code.unwrap_or(255))
}

/// The report fd `create` passed, if this monitor was started by `create`.
pub fn report_file() -> Option<File> {
    std::env::var_os("COCOON_REPORT_FD")?;
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(REPORT_FD, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: create passed this fd to us for this purpose; we own it from here.
    Some(unsafe { File::from_raw_fd(REPORT_FD) })
}

/// Reads the monitor's report: `Ok` once the container is created.
pub fn read_report(report: File) -> Result<(), String> {
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(report);
    let _ = std::io::BufRead::read_line(&mut reader, &mut line);
    match serde_json::from_str::<Report>(line.trim()) {
        Ok(Report::Created) => Ok(()),
        Ok(Report::Failed(message)) => Err(message),
        Err(_) => Err("the container's monitor exited before the container was created".into()),
    }
}
