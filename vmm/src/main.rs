//! `cocoon-vmm`: boots one microVM and exits with its outcome.
//!
//! Exit status: 0 when the guest powered off cleanly, 3 when it crashed or KVM stopped it
//! (one line on stderr says why), 1 when the VM could not be built, 2 for usage errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use clap::Parser;
use cocoon_vmm::config::{
    ConsoleConfig, DEFAULT_CPUS, DEFAULT_MEMORY_MIB, DiskConfig, NetConfig, VmConfig, VsockConfig,
};
use cocoon_vmm::{builder, metrics};

/// Boot a Linux guest in a minimal KVM microVM.
#[derive(Parser, Debug)]
#[command(name = "cocoon-vmm", version, about, long_about = None)]
struct Cli {
    /// Uncompressed guest kernel (ELF vmlinux with a PVH entry point).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs to load (uncompressed cpio is fastest).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line options, appended to the built-in ones.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CPUS, value_parser = clap::value_parser!(u8).range(1..))]
    cpus: u8,
    /// Guest memory in MiB (mapped lazily: untouched pages cost nothing).
    #[arg(long, value_name = "MiB", default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// A raw disk image as a virtio-blk device, read-write unless ",ro" follows. Repeatable;
    /// the guest sees them as /dev/vda, /dev/vdb, ... in order.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskConfig>,
    /// Give the guest a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device for guest context id CID; host programs reach guest ports through
    /// the Unix socket PATH (`CONNECT <port>\n`), guest connections to host port P reach PATH_P.
    #[arg(long, value_name = "CID,PATH")]
    vsock: Option<VsockConfig>,
    /// A virtio-net device on the host TAP device TAP (created if missing), with the MAC the
    /// guest sees (default 02:c0:c0:00:00:01).
    #[arg(long, value_name = "TAP[,MAC]")]
    net: Option<NetConfig>,
    /// Where the serial console goes: stdout, off (fastest: no UART at all) or a file.
    #[arg(long, value_name = "stdout|off|FILE", default_value = "stdout")]
    console: ConsoleConfig,
    /// Write run figures (boot timing, exits by reason, own RSS) as JSON to this file at exit.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Log level for the VMM's own messages on stderr (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: tracing::Level,
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

    let config = VmConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        cpus: cli.cpus,
        memory_mib: cli.memory,
        disks: cli.disks,
        rng: cli.rng,
        vsock: cli.vsock,
        net: cli.net,
        console: cli.console,
    };
    let outcome = match builder::run(&config, started, started_wall) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("cocoon-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &cli.metrics {
        let rss = metrics::rss_excluding_kib(&outcome.guest_mappings).ok();
        let json = metrics::to_json(&outcome.lifecycle, &outcome.reason, rss);
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!(
                "cocoon-vmm: cannot write metrics to {}: {e}",
                path.display()
            );
        }
    }
    // The socket is ours: nobody can connect to a VM that is gone.
    if let Some(vsock) = &config.vsock {
        let _ = std::fs::remove_file(&vsock.uds);
    }
    let code = outcome.reason.exit_code();
    if code != 0 {
        eprintln!("cocoon-vmm: {}", outcome.reason);
    }
    // vCPU threads may still be inside KVM_RUN: leave without waiting for them.
    std::process::exit(code)
}
