//! `cocoon-vmm`: boots one microVM and exits with its outcome.
//!
//! Exit status: 0 when the guest powered off cleanly, 3 when it crashed or KVM stopped it
//! (one line on stderr says why), 1 when the VM could not be built, 2 for usage errors,
//! 128 + N when signal N (SIGTERM, SIGINT, SIGHUP) stopped it.
//!
//! The signal policy is this binary's, not the library's: the stop signals are blocked before
//! any thread exists and one thread takes them and stops the VM, so the sockets are still
//! removed and the metrics written.

mod signals;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use clap::Parser;
use cocoon_vmm::config::{
    ConsoleConfig, DEFAULT_CPUS, DEFAULT_MEMORY_MIB, DiskConfig, FsConfig, NetConfig, ShareConfig,
    VmConfig, VsockConfig,
};
use cocoon_vmm::lifecycle::ExitReason;
use cocoon_vmm::snapshot::RestoreConfig;
use cocoon_vmm::vm::Vm;
use cocoon_vmm::{api, metrics};
use signals::StopSignals;

/// Boot a Linux guest in a minimal KVM microVM.
#[derive(Parser, Debug)]
#[command(name = "cocoon-vmm", version, about, long_about = None)]
struct Cli {
    /// Uncompressed guest kernel (ELF vmlinux with a PVH entry point). With --restore, the
    /// kernel the snapshot must have been taken with.
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Initramfs to load (uncompressed cpio is fastest).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line options, appended to the built-in ones.
    #[arg(
        long,
        value_name = "ARGS",
        allow_hyphen_values = true,
        conflicts_with = "restore"
    )]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..), conflicts_with = "restore")]
    cpus: Option<u8>,
    /// Guest memory in MiB (mapped lazily: untouched pages cost nothing).
    #[arg(long, value_name = "MiB", conflicts_with = "restore")]
    memory: Option<u64>,
    /// A raw disk image as a virtio-blk device, read-write unless ",ro" follows. Repeatable;
    /// the guest sees them as /dev/vda, /dev/vdb, ... in order. With --restore, the backing
    /// files of the snapshot's first disks, in order.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskConfig>,
    /// Give the guest a virtio-rng device (entropy from the host's getrandom).
    #[arg(long, conflicts_with = "restore")]
    rng: bool,
    /// A virtio-vsock device for guest context id CID; host programs reach guest ports through
    /// the Unix socket PATH (`CONNECT <port>\n`), guest connections to host port P reach PATH_P.
    #[arg(long, value_name = "CID,PATH")]
    vsock: Option<VsockConfig>,
    /// A virtio-net device, with the MAC the guest sees (default 02:c0:c0:00:00:01), on the host
    /// TAP device TAP (created if missing), on the TAP open as fd N in this process (opened with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, perhaps in another network namespace), or on none
    /// (frames the guest sends are dropped). Repeatable: net0, net1, ... are the guest's eth0,
    /// eth1, ... With --restore, the host sides of the snapshot's first NICs, in order.
    #[arg(long = "net", value_name = "TAP|fd=N|none[,MAC]")]
    nets: Vec<NetConfig>,
    /// A virtio-fs device the guest mounts with `mount -t virtiofs TAG DIR`; its root holds
    /// the --share entries.
    #[arg(long = "fs", value_name = "TAG", conflicts_with = "restore")]
    fs_tag: Option<String>,
    /// A host directory or file the guest sees, live, as DIR/NAME of the --fs mount,
    /// read-write unless ",ro" follows. Repeatable.
    #[arg(long = "share", value_name = "NAME=PATH[,ro]", requires = "fs_tag")]
    shares: Vec<ShareConfig>,
    /// Where the serial console goes: stdout, off (fastest: no UART at all) or a file.
    /// [default: stdout; with --restore, the snapshot's]
    #[arg(long, value_name = "stdout|off|FILE")]
    console: Option<ConsoleConfig>,
    /// Write run figures (boot timing, exits by reason, own RSS) as JSON to this file at exit.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Serve a control socket at PATH (removed at exit): one JSON request per line,
    /// {"action":"pause"}, {"action":"resume"} or {"action":"state"}, one JSON reply per line.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Restore the VM saved in the snapshot directory DIR (see {"action":"snapshot"}) instead of
    /// booting one. --vsock and --net then move the snapshot's devices to a new socket or TAP.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Log level for the VMM's own messages on stderr (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: tracing::Level,
    /// Run the VM's threads without the seccomp allowlist, capability drop and non-dumpable
    /// process (for debugging a filter; the jail is on by default, see docs/security.md).
    #[arg(long)]
    no_seccomp: bool,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false)
        .init();
    cocoon_vmm::jail::set_seccomp(!cli.no_seccomp);

    let how = match &cli.restore {
        Some(dir) => How::Restore(restore_config(dir, &cli)),
        None => How::Boot(VmConfig {
            kernel: cli.kernel.clone().unwrap_or_default(),
            initrd: cli.initrd.clone(),
            cmdline: cli.cmdline.clone(),
            cpus: cli.cpus.unwrap_or(DEFAULT_CPUS),
            memory_mib: cli.memory.unwrap_or(DEFAULT_MEMORY_MIB),
            disks: cli.disks.clone(),
            rng: cli.rng,
            vsock: cli.vsock.clone(),
            nets: cli.nets.clone(),
            fs: cli.fs_tag.clone().map(|tag| FsConfig {
                tag,
                shares: cli.shares.clone(),
            }),
            console: cli.console.clone().unwrap_or(ConsoleConfig::Stdout),
        }),
    };
    let vm = match start(&cli.api_sock, &how, started, started_wall) {
        Ok(vm) => vm,
        Err(e) => {
            // Sockets are left alone: a path in use may be another VM's.
            eprintln!("cocoon-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    let reason = vm.reason();
    let (code, name, message) = match vm.stop_signal.get().copied() {
        Some(signal) if reason == ExitReason::Stopped => (
            // As a shell reports a process killed by a signal.
            128 + signal,
            "signalled",
            format!("stopped by signal {signal}, guest killed"),
        ),
        _ => (reason.exit_code(), reason.name(), reason.to_string()),
    };
    if let Some(path) = &cli.metrics {
        let rss = metrics::rss_excluding_kib(vm.vm.guest_mappings()).ok();
        let json = metrics::to_json_named(vm.vm.lifecycle(), name, rss);
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!(
                "cocoon-vmm: cannot write metrics to {}: {e}",
                path.display()
            );
        }
    }
    remove_sockets(&vm.vm.config(), &cli.api_sock);
    if code != 0 {
        eprintln!("cocoon-vmm: {message}");
    }
    // The vCPU threads are joined; the device and API threads end with the process.
    std::process::exit(code)
}

struct Running {
    vm: Arc<Vm>,
    /// The stop signal that ended the run, if one did.
    stop_signal: Arc<OnceLock<i32>>,
}

impl Running {
    fn reason(&self) -> ExitReason {
        self.vm.wait()
    }
}

enum How {
    Boot(VmConfig),
    Restore(RestoreConfig),
}

/// A restore of `dir`, with the flags that may change a snapshot's VM applied.
fn restore_config(dir: &std::path::Path, cli: &Cli) -> RestoreConfig {
    let mut restore = RestoreConfig::new(dir);
    restore.overrides.disks = cli
        .disks
        .iter()
        .enumerate()
        .map(|(i, disk)| (format!("block{i}"), disk.clone()))
        .collect();
    restore.overrides.vsock_uds = cli.vsock.as_ref().map(|v| v.uds.clone());
    restore.overrides.nets = cli
        .nets
        .iter()
        .enumerate()
        .map(|(i, net)| (format!("net{i}"), net.clone()))
        .collect();
    restore.console = cli.console.clone();
    restore.expect = cli.kernel.as_ref().map(|kernel| VmConfig {
        kernel: kernel.clone(),
        initrd: cli.initrd.clone(),
        cmdline: None,
        cpus: DEFAULT_CPUS,
        memory_mib: DEFAULT_MEMORY_MIB,
        disks: Vec::new(),
        rng: false,
        vsock: None,
        nets: Vec::new(),
        fs: None,
        console: ConsoleConfig::Off,
    });
    restore
}

/// Builds (or restores) the VM, hooks up the stop signals and the API socket, and lets the
/// guest run.
fn start(
    api_sock: &Option<PathBuf>,
    how: &How,
    started: Instant,
    started_wall: SystemTime,
) -> Result<Running, String> {
    // Before any other thread exists, so every thread inherits the blocked mask.
    let signals =
        StopSignals::block().map_err(|e| format!("cannot block the stop signals: {e}"))?;
    let vm = match how {
        How::Boot(config) => Vm::build(config, started, started_wall).map_err(|e| e.to_string()),
        How::Restore(restore) => {
            Vm::restore(restore, started, started_wall).map_err(|e| e.to_string())
        }
    };
    let vm = Arc::new(vm?);
    let stop_signal = Arc::new(OnceLock::new());
    {
        let (vm, stop_signal) = (vm.clone(), stop_signal.clone());
        signals
            .watch(move |signal| {
                let _ = stop_signal.set(signal);
                vm.stop();
            })
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    }
    // Bound while the VM is still paused: a client may pause it before its first instruction.
    if let Some(path) = api_sock {
        let listener = cocoon_vmm_abi::uds::bind_unix(path)
            .map_err(|e| format!("cannot bind the API socket {}: {e}", path.display()))?;
        api::serve(listener, vm.clone())
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
    }
    // Fails only if the VM has already ended (a signal came first); `wait` then says why.
    let _ = vm.resume();
    Ok(Running { vm, stop_signal })
}

/// The sockets are ours: nobody can connect to a VM that is gone.
fn remove_sockets(config: &VmConfig, api_sock: &Option<PathBuf>) {
    if let Some(vsock) = &config.vsock {
        let _ = std::fs::remove_file(&vsock.uds);
    }
    if let Some(path) = api_sock {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_vmm::config::TapSource;

    #[test]
    fn net_is_repeatable_and_moves_nics_on_restore() {
        let cli = Cli::try_parse_from([
            "cocoon-vmm",
            "--kernel",
            "vmlinux",
            "--net",
            "tap0",
            "--net",
            "fd=5,02:00:00:00:00:02",
            "--net",
            "none",
        ])
        .unwrap();
        let taps: Vec<TapSource> = cli.nets.iter().map(|n| n.tap.clone()).collect();
        assert_eq!(
            taps,
            [
                TapSource::Name("tap0".into()),
                TapSource::Fd(5),
                TapSource::Detached
            ]
        );
        assert_eq!(cli.nets[1].mac, [2, 0, 0, 0, 0, 2]);
        let cli = Cli::try_parse_from([
            "cocoon-vmm",
            "--restore",
            "/snap",
            "--net",
            "none",
            "--net",
            "fd=7",
        ])
        .unwrap();
        let restore = restore_config(std::path::Path::new("/snap"), &cli);
        let ids: Vec<&str> = restore.overrides.nets.keys().map(String::as_str).collect();
        assert_eq!(ids, ["net0", "net1"]);
        assert_eq!(restore.overrides.nets["net1"].tap, TapSource::Fd(7));
        assert!(Cli::try_parse_from(["cocoon-vmm", "--kernel", "k", "--net", "fd=x"]).is_err());
    }
}
