//! cocoon-agent: PID 1 of every cocoon guest.
//!
//! Today it brings the guest up (mounts), tells the VMM it is running (boot marker), runs the
//! boot self-check on the disks it was given, and powers the VM off. The container lifecycle
//! over vsock builds on this.

mod boot_check;
mod console;
mod mounts;
mod netif;
mod power;
mod selftest;
mod vsock;

fn main() {
    if std::process::id() != 1 {
        eprintln!("cocoon-agent: must run as PID 1 (the guest's /init)");
        std::process::exit(2);
    }
    if let Err(e) = mounts::mount_pseudo_filesystems() {
        console::line(&format!("cocoon-agent: {e}"));
    }
    console::reopen();
    power::mark_agent_up();
    console::line(&format!(
        "cocoon-agent: up, kernel {}, {} cpus, {} MiB",
        kernel_release(),
        online_cpus(),
        memory_mib()
    ));

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let options = boot_check::Options::from_cmdline(&cmdline);
    for line in boot_check::run(&options) {
        console::line(&line);
    }
    if options.selftest {
        selftest::serve();
    }
    if options.panic {
        // PID 1 exiting panics the kernel: how tests make a guest crash on purpose.
        console::line("cocoon-agent: exiting to panic the kernel, as asked");
        std::process::exit(1);
    }
    power::power_off();
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// MemTotal: what the kernel manages, a little less than the VM's RAM.
fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
