//! cocoon-agent: PID 1 of every cocoon guest.
//!
//! It brings the guest up (mounts, the reaper), tells the VMM it is running (boot marker), and
//! then serves the agent protocol on vsock (docs/protocol.md): containers created, started,
//! exec'd into, signalled, waited for and removed on the host's request. Kernel command-line
//! switches select the other modes: `cocoon.check=1` (boot self-check, then power off),
//! `cocoon.selftest=1` (device self-test service), `cocoon.panic=1` (crash on purpose).

mod boot_check;
mod console;
mod container;
mod counters;
mod cpu;
mod guest;
mod mounts;
mod netconf;
mod netif;
mod netlink;
mod nic_park;
mod power;
mod reaper;
mod selftest;
mod server;
mod stdio;
mod vsock;

fn main() {
    if std::process::id() != 1 {
        eprintln!("cocoon-agent: must run as PID 1 (the guest's /init)");
        std::process::exit(2);
    }
    // Before any thread exists, so that all of them inherit the mask (see reaper.rs).
    reaper::block_sigchld();
    reaper::reaper();
    if let Err(e) = mounts::leave_initramfs().and_then(|()| mounts::mount_pseudo_filesystems()) {
        console::line(&format!("cocoon-agent: {e}"));
    }
    console::reopen();
    // Containers that share the guest's network namespace find loopback up, as on a host.
    if let Err(e) = netif::bring_up("lo") {
        console::line(&format!("cocoon-agent: bring up lo: {e}"));
    }
    power::mark_agent_up();
    console::line(&format!(
        "cocoon-agent: up, kernel {}, {} cpus, {} MiB",
        kernel_release(),
        online_cpus(),
        memory_mib()
    ));

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let options = boot_check::Options::from_cmdline(&cmdline);
    if options.panic {
        // PID 1 exiting panics the kernel: how tests make a guest crash on purpose.
        console::line("cocoon-agent: exiting to panic the kernel, as asked");
        std::process::exit(1);
    }
    if options.check || options.selftest {
        for line in boot_check::run(&options) {
            console::line(&line);
        }
    }
    if options.selftest {
        selftest::serve();
    }
    if options.check {
        power::power_off();
    }
    // Once per guest, not per container: the parent cgroup and the state directories.
    let sys = container::syscall::LinuxSyscall;
    if let Err(e) = container::cgroup::enable_controllers(&sys) {
        console::line(&format!("cocoon-agent: {e}"));
    }
    if let Err(e) = container::rootfs::prepare_runtime_dirs(&sys) {
        console::line(&format!("cocoon-agent: {e}"));
    }
    std::thread::Builder::new()
        .name("stdio".into())
        .spawn(stdio::serve)
        .expect("the agent cannot run without its stdio service");
    server::serve();
}

pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// MemTotal: what the kernel manages, a little less than the VM's RAM.
pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
