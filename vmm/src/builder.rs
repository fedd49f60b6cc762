//! The boot path, top to bottom: KVM and guest memory, the kernel and initramfs, boot
//! structures, devices, vCPUs; handed to `vm.rs`, which starts the threads paused. And the
//! restore path, which makes the same parts from a snapshot instead of a boot.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
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
use crate::bus::lock;
use crate::bus::{Bus, BusDevice};
use crate::cmdline::{self, MmioDevice};
use crate::config::{ConsoleConfig, FsConfig, VmConfig};
use crate::devices::guest_status::GuestStatus;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::persist::SerialState;
use crate::devices::legacy::serial::SerialConsole;
use crate::devices::registry::Devices;
use crate::devices::virtio::block::{Block, Disk, DiskError};
use crate::devices::virtio::fs::device::VIRTIO_ID_FS;
use crate::devices::virtio::fs::{Fs, FsError, Share};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::event_loop::{EventLoop, QueueKick};
use crate::jail::Role;
use crate::lifecycle::Lifecycle;
use crate::snapshot::{self, BootFiles, RestoreConfig, SnapshotError};
use crate::vcpu::Vcpu;
use crate::vm::{DeviceLoop, Parts, Vm};

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
    #[error(transparent)]
    Fs(#[from] FsError),
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
    #[error("cannot restore the serial port: {0}")]
    Serial(#[from] crate::devices::legacy::persist::SerialRestoreError),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::KvmSetup { what, source }
}

/// Builds the VM described by `config`, its vCPUs created and parked before their first
/// `KVM_RUN` (see [`Vm::build`]).
pub fn build(
    config: &VmConfig,
    started: Instant,
    started_wall: SystemTime,
) -> Result<Vm, BuildError> {
    config.validate()?;
    let pvm_host = crate::host::is_pvm();
    let (lifecycle, ended) = Lifecycle::new(started, started_wall);
    let lifecycle = Arc::new(lifecycle);
    let boot_files = BootFiles::of(config).map_err(|source| BuildError::Open {
        what: "boot file",
        path: config.kernel.clone(),
        source,
    })?;

    // KVM and guest memory.
    let mem_size = config.memory_bytes();
    let ranges: Vec<(GuestAddress, usize)> = memory_map::ram_regions(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| BuildError::Memory {
        mib: config.memory_mib,
        source,
    })?;
    let machine = Machine::create(&mem)?;
    phase(started, "vm and memory ready");

    // Kernel and initramfs.
    let mut file_mapped = Vec::new();
    let entry = load_kernel(&mem, config, &mut file_mapped)?;
    phase(started, "kernel loaded");
    let initrd = config
        .initrd
        .as_ref()
        .map(|path| load_initrd(&mem, path, &mut file_mapped))
        .transpose()?;
    phase(started, "initramfs loaded");

    // Devices.
    let console = open_console(&config.console)?;
    let mut platform = Platform::new(&machine.vm, &lifecycle, console, None)?;
    // The kind names the device in the registry (`block0`, `rng0`, ...).
    let mut virtio: Vec<(&str, Box<dyn VirtioDevice>)> = Vec::new();
    for disk in &config.disks {
        virtio.push((
            "block",
            Box::new(Block::new(Disk::open(&disk.path, disk.read_only)?)),
        ));
    }
    if config.rng {
        virtio.push(("rng", Box::new(Rng::new())));
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(vsock.cid, &vsock.uds).map_err(|source| BuildError::Open {
            what: "vsock socket",
            path: vsock.uds.clone(),
            source,
        })?;
        virtio.push(("vsock", Box::new(device)));
    }
    for net in &config.nets {
        let tap = Tap::from_source(&net.tap)?;
        let device = Net::new(tap, net.mac).map_err(BuildError::Event)?;
        virtio.push(("net", Box::new(device)));
    }
    if let Some(fs) = &config.fs {
        virtio.push(("fs", Box::new(open_fs(fs)?)));
    }
    for (kind, device) in virtio {
        let id = platform.devices.next_id(kind);
        platform.add_virtio(&machine.vm, &mem, id, |mem, interrupt| {
            Ok::<_, BuildError>(MmioTransport::new(device, mem, interrupt))
        })?;
    }

    // Boot structures.
    let line = cmdline::build(
        config.console != ConsoleConfig::Off,
        pvm_host,
        &platform.announced,
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
    let supported = machine
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report CPUID"))?;
    let fds = (0..config.cpus)
        .map(|id| {
            let fd = machine
                .vm
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
            Ok(fd)
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    let vm = platform.start(
        machine,
        mem,
        fds,
        lifecycle,
        ended,
        Origin {
            config: config.clone(),
            boot_files,
            memory_from_file: false,
            file_mapped,
        },
    )?;
    phase(started, "vCPUs parked");
    Ok(vm)
}

/// Makes the VM a snapshot describes, paused: RAM mapped from its memory file (nothing read),
/// devices with their saved state and fresh host sides (see `RestoreConfig` for what changes),
/// vCPUs and interrupt controllers as they were. Nothing of the guest's boot runs again.
pub fn restore(
    restore: &RestoreConfig,
    started: Instant,
    started_wall: SystemTime,
) -> Result<Vm, SnapshotError> {
    let snapshot = snapshot::read_state(&restore.dir)?;
    if let Some(expect) = &restore.expect {
        snapshot::check_boot_files(&snapshot, expect)?;
    }
    let config = snapshot::restored_config(&snapshot, restore)?;
    let (lifecycle, ended) = Lifecycle::new(started, started_wall);
    let lifecycle = Arc::new(lifecycle);
    snapshot.guest_status.apply(&lifecycle);

    let mem = snapshot::memory::map(&restore.dir, &snapshot.memory)?;
    let machine = Machine::create(&mem)?;
    snapshot::machine::restore(&machine.vm, &snapshot.machine)?;
    phase(started, "vm and memory ready");

    // The guest has a UART exactly when the snapshot's did; where its output goes is ours.
    let console = match (&snapshot.serial, open_console(&config.console)?) {
        (Some(_), Some(out)) => Some(out),
        (Some(_), None) => Some(Box::new(std::io::sink()) as Box<dyn Write + Send>),
        (None, _) => None,
    };
    let mut platform = Platform::new(&machine.vm, &lifecycle, console, snapshot.serial.as_ref())?;
    for (id, state) in &snapshot.devices {
        platform.add_virtio(&machine.vm, &mem, id.clone(), |mem, interrupt| {
            Ok::<_, SnapshotError>(MmioTransport::restore(
                id,
                state.clone(),
                &restore.overrides,
                mem,
                interrupt,
            )?)
        })?;
    }

    let fds = snapshot
        .vcpus
        .iter()
        .map(|state| {
            let fd = machine
                .vm
                .create_vcpu(state.id.into())
                .map_err(kvm_err("create a vCPU"))?;
            crate::vcpu::persist::restore(&fd, state)?;
            Ok(fd)
        })
        .collect::<Result<Vec<_>, SnapshotError>>()?;
    // Only now that the interrupt controllers are back may devices raise interrupts.
    for transport in &platform.transports {
        lock(transport).after_restore();
    }
    if let Some(serial) = &platform.devices.serial {
        lock(serial).after_restore();
    }
    phase(started, "devices and vCPUs restored");
    let vm = platform.start(
        machine,
        mem,
        fds,
        lifecycle,
        ended,
        Origin {
            config,
            boot_files: snapshot.boot_files,
            memory_from_file: true,
            file_mapped: Vec::new(),
        },
    )?;
    phase(started, "vCPUs parked");
    Ok(vm)
}

/// KVM and the VM, with its in-kernel interrupt controllers and PIT, and `mem` as its RAM.
pub(crate) struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub guest_mappings: Vec<(usize, usize)>,
    /// The MSRs KVM saves for a vCPU (for snapshots).
    pub msr_indices: Vec<u32>,
}

impl Machine {
    fn create(mem: &GuestMemoryMmap) -> Result<Machine, BuildError> {
        let kvm = Kvm::new().map_err(BuildError::Kvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        let guest_mappings = register_memory(&vm, mem)?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .unwrap_or_default();
        Ok(Machine {
            kvm,
            vm,
            guest_mappings,
            msr_indices,
        })
    }
}

/// Where a VM came from, which its snapshots record.
pub(crate) struct Origin {
    pub config: VmConfig,
    pub boot_files: BootFiles,
    /// RAM is a private mapping of a snapshot's memory file (a restored VM).
    pub memory_from_file: bool,
    /// Host ranges of RAM mapped from the kernel and initramfs files (a booted VM).
    pub file_mapped: Vec<(usize, usize)>,
}

/// The buses and devices, as they are being put together.
struct Platform {
    pio: Bus,
    mmio: Bus,
    devices: Devices,
    kicks: Vec<QueueKick>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The virtio windows, for the kernel command line.
    announced: Vec<MmioDevice>,
}

impl Platform {
    /// The legacy devices: the UART (when there is a console), the i8042 reset line, the guest
    /// status page.
    fn new(
        vm: &VmFd,
        lifecycle: &Arc<Lifecycle>,
        console: Option<Box<dyn Write + Send>>,
        serial_state: Option<&SerialState>,
    ) -> Result<Platform, BuildError> {
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let serial = match console {
            Some(out) => {
                let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::Event)?;
                vm.register_irqfd(&irq, SERIAL_IRQ)
                    .map_err(kvm_err("wire the serial IRQ"))?;
                let serial = match serial_state {
                    Some(state) => SerialConsole::restore(irq, out, state)?,
                    None => SerialConsole::new(irq, out),
                };
                let serial = Arc::new(Mutex::new(serial));
                pio.insert(SERIAL_PORT_BASE.into(), 8, serial.clone())?;
                Some(serial)
            }
            None => None,
        };
        let i8042 = Arc::new(Mutex::new(I8042::new(lifecycle.clone())));
        pio.insert(I8042_DATA_PORT.into(), 5, i8042.clone())?;
        let guest_status = Arc::new(Mutex::new(GuestStatus::new(lifecycle.clone())));
        mmio.insert(
            crate::arch::x86_64::layout::GUEST_STATUS_START,
            0x1000,
            guest_status.clone(),
        )?;
        Ok(Platform {
            pio,
            mmio,
            devices: Devices::new(serial, i8042, guest_status),
            kicks: Vec::new(),
            transports: Vec::new(),
            announced: Vec::new(),
        })
    }

    /// Adds the next virtio device (the next MMIO window and IRQ), as `make` builds its
    /// transport given guest memory and its interrupt line.
    fn add_virtio<E: From<BuildError>>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: String,
        make: impl FnOnce(GuestMemoryMmap, Arc<Interrupt>) -> Result<MmioTransport, E>,
    ) -> Result<(), E> {
        let index = self.transports.len();
        let (transport, window) =
            add_virtio_device(vm, mem, &mut self.mmio, &mut self.kicks, index, make)?;
        self.announced.push(window);
        self.devices.add_virtio(id, transport.clone());
        self.transports.push(transport);
        Ok(())
    }

    /// Hands everything to the VM handle, which starts the threads with the vCPUs parked.
    fn start(
        self,
        machine: Machine,
        memory: GuestMemoryMmap,
        fds: Vec<kvm_ioctls::VcpuFd>,
        lifecycle: Arc<Lifecycle>,
        ended: std::sync::mpsc::Receiver<crate::lifecycle::ExitReason>,
        origin: Origin,
    ) -> Result<Vm, BuildError> {
        let pio = Arc::new(self.pio);
        let mmio = Arc::new(self.mmio);
        let vcpus = fds
            .into_iter()
            .enumerate()
            .map(|(id, fd)| Vcpu {
                fd,
                id: id as u8,
                pio: pio.clone(),
                mmio: mmio.clone(),
                lifecycle: lifecycle.clone(),
            })
            .collect();
        // virtio-fs gets a thread of its own; every other device shares one.
        let is_fs = |t: &Arc<Mutex<MmioTransport>>| lock(t).device_type() == VIRTIO_ID_FS;
        let (fs_kicks, kicks): (Vec<_>, Vec<_>) =
            self.kicks.into_iter().partition(|k| is_fs(&k.transport));
        let (fs_transports, transports): (Vec<_>, Vec<_>) =
            self.transports.into_iter().partition(is_fs);
        let event_loops = vec![
            device_loop(kicks, transports, Role::Devices, "cocoon-devices")?,
            device_loop(fs_kicks, fs_transports, Role::Files, "cocoon-fs")?,
        ];
        Vm::start(Parts {
            vm: machine.vm,
            memory,
            guest_mappings: machine.guest_mappings,
            msr_indices: machine.msr_indices,
            lifecycle,
            ended,
            vcpus,
            event_loops,
            devices: self.devices,
            origin,
        })
    }
}

/// The virtio-fs device with its shares open (`O_PATH`: the share's inode, whatever its path
/// means later).
fn open_fs(config: &FsConfig) -> Result<Fs, BuildError> {
    let mut fs = Fs::new(&config.tag)?;
    for share in &config.shares {
        let root = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&share.path)
            .map_err(|source| BuildError::Open {
                what: "share",
                path: share.path.clone(),
                source,
            })?;
        fs.add_share(Share {
            name: share.name.clone(),
            root: root.into(),
            read_only: share.read_only,
        })?;
    }
    Ok(fs)
}

/// One device thread's loop over `kicks` and the host sides of `transports`.
fn device_loop(
    kicks: Vec<QueueKick>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    role: Role,
    name: &'static str,
) -> Result<DeviceLoop, BuildError> {
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::Event)?;
    let theirs = stop.try_clone().map_err(BuildError::Event)?;
    Ok(DeviceLoop {
        event_loop: EventLoop::new(kicks, transports, theirs).map_err(BuildError::Event)?,
        stop,
        role,
        name,
    })
}

/// Boot-path timing, for `--log-level debug`.
fn phase(started: Instant, what: &str) {
    tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "{what}");
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
        // which the VM handle keeps until every vCPU thread has been joined and the VM fd is
        // closed.
        unsafe { vm.set_user_memory_region(desc) }.map_err(kvm_err("map guest memory"))?;
        mappings.push((host, region.len() as usize));
    }
    Ok(mappings)
}

/// Loads the kernel; the host ranges it mapped from the file are added to `mapped`.
fn load_kernel(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    mapped: &mut Vec<(usize, usize)>,
) -> Result<u64, BuildError> {
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
    mapped.extend_from_slice(image.mapped_ranges());
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry.0),
        _ => Err(BuildError::NoPvhEntry(path.clone())),
    }
}

/// Loads the initramfs at the top of low RAM (page aligned), where the kernel will not have
/// placed itself.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &PathBuf,
    mapped: &mut Vec<(usize, usize)>,
) -> Result<pvh::Initrd, BuildError> {
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
    mapped.extend_from_slice(image.mapped_ranges());
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
fn add_virtio_device<E: From<BuildError>>(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    kicks: &mut Vec<QueueKick>,
    index: usize,
    make: impl FnOnce(GuestMemoryMmap, Arc<Interrupt>) -> Result<MmioTransport, E>,
) -> Result<(Arc<Mutex<MmioTransport>>, MmioDevice), E> {
    let base = virtio_mmio_base(index);
    let irq = virtio_irq(index);
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::Event)?;
    vm.register_irqfd(&irqfd, irq)
        .map_err(kvm_err("wire a virtio IRQ"))?;
    let transport = make(mem.clone(), Arc::new(Interrupt::new(irqfd)))?;
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
    mmio.insert(base, VIRTIO_MMIO_SIZE, bus_device)
        .map_err(BuildError::from)?;
    let window = MmioDevice {
        base,
        size: VIRTIO_MMIO_SIZE,
        irq,
    };
    Ok((transport, window))
}
