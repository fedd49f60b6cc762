//! The boot path, top to bottom: KVM and guest memory, the kernel and initramfs, boot
//! structures, devices, vCPUs; then run until the guest stops.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    CMDLINE_START, HIGH_MEMORY_START, I8042_DATA_PORT, KVM_TSS_ADDRESS, MMIO_GAP_START, SERIAL_IRQ,
    SERIAL_PORT_BASE, VIRTIO_MMIO_SIZE, virtio_irq, virtio_mmio_base,
};
use crate::arch::x86_64::{cpuid, memory_map, mptable, msr, pvh, regs};
use crate::boot_image::BootImage;
use crate::bus::{Bus, BusDevice};
use crate::cmdline::{self, MmioDevice};
use crate::config::{ConsoleConfig, VmConfig};
use crate::devices::guest_status::GuestStatus;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialConsole;
use crate::devices::virtio::block::{Block, Disk, DiskError};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::event_loop::{EventLoop, QueueKick};
use crate::lifecycle::{ExitReason, Lifecycle};
use crate::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}")]
    KvmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Memory {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {source} (cocoon needs an uncompressed ELF vmlinux)")]
    KernelLoad {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel {0} has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry(PathBuf),
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("cannot load initramfs {path}: {source}")]
    InitrdLoad {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error("cannot write the command line to guest memory: {0}")]
    CmdlineWrite(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot write the GDT to guest memory: {0}")]
    Gdt(vm_memory::GuestMemoryError),
    #[error("cannot place a device: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("cannot create an eventfd or epoll instance: {0}")]
    Event(std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::KvmSetup { what, source }
}

/// How a run ended, with what the metrics need.
pub struct RunOutcome {
    pub reason: ExitReason,
    pub lifecycle: Arc<Lifecycle>,
    /// Host address ranges of guest RAM (left out of the VMM's own RSS).
    pub guest_mappings: Vec<(usize, usize)>,
    /// Guest RAM and the VM, kept while vCPUs may still be inside KVM_RUN: the process ends
    /// without unmapping or closing them.
    pub guest_memory: GuestMemoryMmap,
    pub vm: VmFd,
}

/// Builds the VM described by `config`, boots it, and waits until it stops. Meant to be called
/// once per process: when it returns, the vCPU and device threads are still parked in KVM and
/// end with the process.
pub fn run(
    config: &VmConfig,
    started: Instant,
    started_wall: SystemTime,
) -> Result<RunOutcome, BuildError> {
    run_with_signals(config, started, started_wall, true)
}

/// [`run`], with `stop_on_signals` saying whether SIGTERM, SIGINT and SIGHUP end the run. A
/// caller that gives signals another meaning (the runtime forwards them to the container)
/// passes false and handles them itself.
pub fn run_with_signals(
    config: &VmConfig,
    started: Instant,
    started_wall: SystemTime,
    stop_on_signals: bool,
) -> Result<RunOutcome, BuildError> {
    config.validate()?;
    let pvm_host = crate::host::is_pvm();
    let (lifecycle, ended) = Lifecycle::new(started, started_wall);
    let lifecycle = Arc::new(lifecycle);
    if stop_on_signals {
        // Before any other thread exists, so every thread inherits the blocked mask.
        watch_stop_signals(lifecycle.clone())?;
    }

    // KVM and guest memory.
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    let mem_size = config.memory_bytes();
    let ranges: Vec<(GuestAddress, usize)> = memory_map::ram_regions(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| BuildError::Memory {
        mib: config.memory_mib,
        source,
    })?;
    let guest_mappings = register_memory(&vm, &mem)?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    phase(started, "vm and memory ready");

    // Kernel and initramfs.
    let entry = load_kernel(&mem, config)?;
    phase(started, "kernel loaded");
    let initrd = config
        .initrd
        .as_ref()
        .map(|path| load_initrd(&mem, path))
        .transpose()?;
    phase(started, "initramfs loaded");

    // Devices.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let console = open_console(&config.console)?;
    if let Some(out) = console {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::Event)?;
        vm.register_irqfd(&irq, SERIAL_IRQ)
            .map_err(kvm_err("wire the serial IRQ"))?;
        pio.insert(
            SERIAL_PORT_BASE.into(),
            8,
            Arc::new(Mutex::new(SerialConsole::new(irq, out))),
        )?;
    }
    pio.insert(
        I8042_DATA_PORT.into(),
        5,
        Arc::new(Mutex::new(I8042::new(lifecycle.clone()))),
    )?;
    mmio.insert(
        crate::arch::x86_64::layout::GUEST_STATUS_START,
        0x1000,
        Arc::new(Mutex::new(GuestStatus::new(lifecycle.clone()))),
    )?;
    let mut announced = Vec::new();
    let mut kicks = Vec::new();
    let mut transports = Vec::new();
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for disk in &config.disks {
        virtio.push(Box::new(Block::new(Disk::open(
            &disk.path,
            disk.read_only,
        )?)));
    }
    if config.rng {
        virtio.push(Box::new(Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(vsock.cid, &vsock.uds).map_err(|source| BuildError::Open {
            what: "vsock socket",
            path: vsock.uds.clone(),
            source,
        })?;
        virtio.push(Box::new(device));
    }
    if let Some(net) = &config.net {
        let tap = Tap::open(&net.tap)?;
        let device = Net::new(tap, net.mac).map_err(BuildError::Event)?;
        virtio.push(Box::new(device));
    }
    for (index, device) in virtio.into_iter().enumerate() {
        let (transport, window) =
            add_virtio_device(&vm, &mem, &mut mmio, &mut kicks, index, device)?;
        announced.push(window);
        transports.push(transport);
    }

    // Boot structures.
    let line = cmdline::build(
        config.console != ConsoleConfig::Off,
        pvm_host,
        &announced,
        config.cmdline.as_deref(),
    )?;
    tracing::debug!(cmdline = %line, "kernel command line");
    let mut bytes = line.into_bytes();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BuildError::CmdlineWrite)?;
    let start_info =
        pvh::write_start_info(&mem, CMDLINE_START, initrd, &memory_map::e820_map(mem_size))?;
    mptable::write(&mem, config.cpus)?;
    regs::write_gdt(&mem).map_err(BuildError::Gdt)?;
    phase(started, "devices and boot structures ready");

    // vCPUs.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report CPUID"))?;
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut vcpus = Vec::with_capacity(config.cpus.into());
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(id.into())
            .map_err(kvm_err("create a vCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::configure(&mut cpuid, id, config.cpus, pvm_host);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        fd.set_msrs(&msr::boot_msrs())
            .map_err(kvm_err("set MSRs"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err("read the LAPIC"))?;
        regs::wire_lint_pins(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm_err("set the LAPIC"))?;
        if id == 0 {
            // Application processors wait for INIT/SIPI from the boot processor.
            fd.set_fpu(&regs::entry_fpu())
                .map_err(kvm_err("set FPU state"))?;
            fd.set_regs(&regs::entry_regs(entry, start_info))
                .map_err(kvm_err("set registers"))?;
            let sregs = fd.get_sregs().map_err(kvm_err("read special registers"))?;
            fd.set_sregs(&regs::entry_sregs(sregs))
                .map_err(kvm_err("set special registers"))?;
        }
        vcpus.push(Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            lifecycle: lifecycle.clone(),
        });
    }

    // Run.
    let event_loop = EventLoop::new(kicks, transports).map_err(BuildError::Event)?;
    if !event_loop.is_empty() {
        spawn("cocoon-devices", move || event_loop.run())?;
    }
    for vcpu in vcpus {
        spawn(&format!("cocoon-vcpu{}", vcpu.id), move || vcpu.run())?;
    }
    // Every sender lives in the Lifecycle we hold, so the channel cannot close while we wait.
    let reason = ended.recv().unwrap_or(ExitReason::VcpuFailed {
        vcpu: 0,
        error: "no vCPU left".into(),
    });
    Ok(RunOutcome {
        reason,
        lifecycle,
        guest_mappings,
        guest_memory: mem,
        vm,
    })
}

/// SIGTERM, SIGINT and SIGHUP end the run like any other reason (so the caller still cleans up
/// its sockets and reports), instead of killing the process where it stands. They are blocked
/// in every thread and taken by one thread with `sigwait`.
fn watch_stop_signals(lifecycle: Arc<Lifecycle>) -> Result<(), BuildError> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only modify it and this
    // thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(BuildError::Event(std::io::Error::from_raw_os_error(rc)));
    }
    spawn("cocoon-signals", move || {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` was initialised above and moved into this thread; `signal` is ours.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            lifecycle.end(ExitReason::Signalled(signal));
        }
    })
}

/// Boot-path timing, for `--log-level debug`.
fn phase(started: Instant, what: &str) {
    tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "{what}");
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), BuildError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(BuildError::Thread)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<(usize, usize)>, BuildError> {
    let mut mappings = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as usize;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `mem`,
        // which the caller keeps alive for as long as the VM runs (the process lifetime).
        unsafe { vm.set_user_memory_region(desc) }.map_err(kvm_err("map guest memory"))?;
        mappings.push((host, region.len() as usize));
    }
    Ok(mappings)
}

fn load_kernel(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<u64, BuildError> {
    let path = &config.kernel;
    let open_err = |source| BuildError::Open {
        what: "kernel",
        path: path.clone(),
        source,
    };
    let mut image = BootImage::new(File::open(path).map_err(open_err)?).map_err(open_err)?;
    let loaded = Elf::load(mem, None, &mut image, Some(GuestAddress(HIGH_MEMORY_START))).map_err(
        |source| BuildError::KernelLoad {
            path: path.clone(),
            source,
        },
    )?;
    tracing::debug!(
        mapped_bytes = image.mapped_bytes(),
        "kernel segments mapped from the image"
    );
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry.0),
        _ => Err(BuildError::NoPvhEntry(path.clone())),
    }
}

/// Loads the initramfs at the top of low RAM (page aligned), where the kernel will not have
/// placed itself.
fn load_initrd(mem: &GuestMemoryMmap, path: &PathBuf) -> Result<pvh::Initrd, BuildError> {
    let open_err = |source| BuildError::Open {
        what: "initramfs",
        path: path.clone(),
        source,
    };
    let mut image = BootImage::new(File::open(path).map_err(open_err)?).map_err(open_err)?;
    let size = image.len();
    let low_end = mem.last_addr().0.min(MMIO_GAP_START - 1) + 1;
    // Keep the lowest 64 MiB for the kernel image and its early allocations.
    let floor = 64 << 20;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= floor)
        .ok_or(BuildError::InitrdTooLarge {
            path: path.clone(),
            size,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut image, size as usize)
        .map_err(|source| BuildError::InitrdLoad {
            path: path.clone(),
            source,
        })?;
    Ok(pvh::Initrd { addr, size })
}

fn open_console(console: &ConsoleConfig) -> Result<Option<Box<dyn Write + Send>>, BuildError> {
    Ok(match console {
        ConsoleConfig::Off => None,
        ConsoleConfig::Stdout => Some(Box::new(std::io::stdout())),
        ConsoleConfig::File(path) => Some(Box::new(File::create(path).map_err(|source| {
            BuildError::Open {
                what: "console file",
                path: path.clone(),
                source,
            }
        })?)),
    })
}

/// Puts a virtio device on the MMIO bus with its IRQ and one ioeventfd per queue.
fn add_virtio_device(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    kicks: &mut Vec<QueueKick>,
    index: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<(Arc<Mutex<MmioTransport>>, MmioDevice), BuildError> {
    let base = virtio_mmio_base(index);
    let irq = virtio_irq(index);
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::Event)?;
    vm.register_irqfd(&irqfd, irq)
        .map_err(kvm_err("wire a virtio IRQ"))?;
    let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)));
    let queues = transport.queue_count();
    let transport = Arc::new(Mutex::new(transport));
    for queue in 0..queues {
        let eventfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::Event)?;
        // Without ioeventfd support the QueueNotify write still reaches the transport through
        // an MMIO exit, only slower.
        match vm.register_ioevent(
            &eventfd,
            &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
            queue as u32,
        ) {
            Ok(()) => kicks.push(QueueKick {
                eventfd,
                transport: transport.clone(),
                queue,
            }),
            Err(e) => tracing::warn!("no ioeventfd for virtio device {index} queue {queue}: {e}"),
        }
    }
    let bus_device: Arc<Mutex<dyn BusDevice>> = transport.clone();
    mmio.insert(base, VIRTIO_MMIO_SIZE, bus_device)?;
    let window = MmioDevice {
        base,
        size: VIRTIO_MMIO_SIZE,
        irq,
    };
    Ok((transport, window))
}
