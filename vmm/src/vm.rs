//! The VM as a handle: built paused, then resumed, paused, stopped and waited for by whoever
//! holds it (Firecracker's shape). `builder.rs` makes the parts; this module owns the threads.
//!
//! Threads: one per vCPU (parked outside `KVM_RUN` whenever the VM is paused, see
//! `vcpu/control.rs`), one device thread, and one supervisor that waits for the first report
//! of the end of the run, stops and joins the others, and only then publishes the reason. So
//! once [`Vm::wait`] has returned no vCPU is inside `KVM_RUN`, and dropping the handle (guest
//! memory, the VM fd) is safe.
//!
//! The handle handles no signals: what SIGTERM means is the embedder's choice (the VMM binary
//! stops the VM, the runtime forwards it to the container).

use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{BuildError, Origin};
use crate::bus::lock;
use crate::config::{DiskConfig, TapSource, VmConfig};
use crate::devices::registry::Devices;
use crate::devices::virtio::fs::Share;
use crate::event_loop::EventLoop;
use crate::jail::{self, Jail, JailError, Role};
use crate::lifecycle::{ExitReason, Lifecycle};
use crate::snapshot::{self, RestoreConfig, SnapshotError, VmSnapshot};
use crate::vcpu::persist::VcpuPersistError;
use crate::vcpu::{Request, Vcpu, VcpuControl, VcpuState, kick};

/// Where the VM as a whole is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Built and not resumed yet, or paused: no vCPU is in `KVM_RUN`.
    Paused,
    Running,
    /// Over, for this reason; every vCPU thread has left.
    Ended(ExitReason),
}

impl VmState {
    pub fn name(&self) -> &'static str {
        match self {
            VmState::Paused => "paused",
            VmState::Running => "running",
            VmState::Ended(_) => "ended",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("no disk {0} (disks are block0, block1, ... in the order given)")]
    NoSuchDisk(String),
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::persist::SwapError),
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("the VM has no virtio-fs device {0} (it is fs0 when the VM has one)")]
    NoFs(String),
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::persist::ShareAddError),
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no NIC {0} (NICs are net0, net1, ... in the order given)")]
    NoSuchNic(String),
    #[error(transparent)]
    Device(#[from] crate::devices::virtio::persist::AttachError),
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("the VM has ended: {0}")]
    Ended(ExitReason),
    #[error("the VM must be paused for this")]
    NotPaused,
}

/// A device thread to start: its loop, the eventfd that stops it, and its jail.
pub(crate) struct DeviceLoop {
    pub event_loop: EventLoop,
    pub stop: EventFd,
    pub role: Role,
    pub name: &'static str,
}

/// What the builder hands over: everything built, no thread started.
pub(crate) struct Parts {
    pub vm: VmFd,
    pub memory: GuestMemoryMmap,
    pub guest_mappings: Vec<(usize, usize)>,
    pub lifecycle: Arc<Lifecycle>,
    pub ended: Receiver<ExitReason>,
    pub vcpus: Vec<Vcpu>,
    /// The device threads' loops: the one for every device but virtio-fs, and the file
    /// server's own (whose disk I/O must not hold up vsock, the host's control path).
    pub event_loops: Vec<DeviceLoop>,
    pub devices: Devices,
    pub msr_indices: Vec<u32>,
    pub origin: Origin,
}

struct VcpuSlot {
    control: Arc<VcpuControl>,
    /// Valid until the supervisor joins the thread, which it does only after the thread has
    /// marked itself exited; `RunControl::request` kicks only threads that have not.
    thread: libc::pthread_t,
}

impl VcpuSlot {
    fn request(&self, request: Request) {
        let thread = self.thread;
        self.control.request(request, || kick::kick(thread));
    }
}

/// The end of the run, published by the supervisor once every vCPU thread is joined.
#[derive(Default)]
struct Ending {
    reason: Mutex<Option<ExitReason>>,
    published: Condvar,
}

/// The threads the supervisor stops and joins when the run ends; dropping it does that, so a
/// build that fails half-way leaves no thread behind either.
struct Threads {
    vcpus: Vec<(VcpuSlot, JoinHandle<()>)>,
    devices: Vec<(EventFd, JoinHandle<()>)>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        for (slot, _) in &self.vcpus {
            slot.request(Request::Stop);
        }
        for (slot, thread) in self.vcpus.drain(..) {
            slot.control.wait_until_exited();
            let _ = thread.join();
        }
        for (stop, thread) in self.devices.drain(..) {
            match stop.write(1) {
                Ok(()) => {
                    let _ = thread.join();
                }
                // Left running: it only serves devices of a VM whose vCPUs are gone.
                Err(e) => tracing::warn!("cannot stop the device thread: {e}"),
            }
        }
    }
}

/// Waits for a thread just started to report its jail.
fn wait_jailed(in_jail: &Receiver<Result<(), JailError>>) -> Result<(), BuildError> {
    match in_jail.recv() {
        Ok(entered) => Ok(entered?),
        // It died before it could say: a panic, already reported on stderr.
        Err(_) => Err(BuildError::Thread(std::io::Error::other(
            "a VM thread ended before it was jailed",
        ))),
    }
}

/// One microVM. `Send + Sync`: share it in an `Arc`.
pub struct Vm {
    vcpus: Vec<VcpuSlot>,
    /// Whether the vCPUs were last asked to run (the state between `resume` and `pause`).
    running: AtomicBool,
    /// Serialises pause, resume and vCPU commands, so each sees the vCPUs settle.
    transition: Mutex<()>,
    ending: Arc<Ending>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    devices: Devices,
    lifecycle: Arc<Lifecycle>,
    guest_mappings: Vec<(usize, usize)>,
    msr_indices: Vec<u32>,
    /// Changes when a disk is swapped.
    origin: Mutex<Origin>,
    // Last, so dropped after everything above: the VM fd before guest memory, and both only
    // after `Drop` has joined the vCPU threads.
    vm_fd: VmFd,
    memory: GuestMemoryMmap,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Vm>();
};

impl Vm {
    /// Builds the VM described by `config` with its vCPU and device threads started and every
    /// vCPU parked before its first `KVM_RUN`. `started` is when the embedder began (boot
    /// timings count from it). The VM runs from [`Vm::resume`].
    pub fn build(
        config: &VmConfig,
        started: Instant,
        started_wall: SystemTime,
    ) -> Result<Vm, BuildError> {
        crate::builder::build(config, started, started_wall)
    }

    pub(crate) fn start(parts: Parts) -> Result<Vm, BuildError> {
        kick::install_handler().map_err(BuildError::Signal)?;
        let jail = Jail::new()?;
        jail::harden_process(&parts.guest_mappings);
        let mut threads = Threads {
            vcpus: Vec::with_capacity(parts.vcpus.len()),
            devices: Vec::new(),
        };
        // On an error, dropping `threads` stops and joins what was started.
        Self::spawn_threads(&mut threads, &jail, parts.vcpus, parts.event_loops)?;
        let vcpus = threads
            .vcpus
            .iter()
            .map(|(slot, _)| VcpuSlot {
                control: slot.control.clone(),
                thread: slot.thread,
            })
            .collect();
        let ending = Arc::new(Ending::default());
        let transports: Vec<_> = parts.devices.virtio().map(|(_, t)| t.clone()).collect();
        let supervisor = {
            let ending = ending.clone();
            let ended = parts.ended;
            let (jailed, in_jail) = std::sync::mpsc::channel();
            let jail = jail.clone();
            let thread = std::thread::Builder::new()
                .name("cocoon-vm".into())
                .spawn(move || {
                    let failed = !jail.enter_reporting(Role::Devices, &jailed);
                    if failed {
                        // `threads` is dropped with the closure: the others are stopped.
                        return;
                    }
                    // Every sender lives in the Lifecycle, which the vCPU threads and the
                    // handle hold: the channel cannot close while anyone could still report.
                    let reason = ended.recv().unwrap_or(ExitReason::VcpuFailed {
                        vcpu: 0,
                        error: "no vCPU left".into(),
                    });
                    drop(threads);
                    *lock(&ending.reason) = Some(reason);
                    ending.published.notify_all();
                    // After the reason is out, so a client that reads EOF can learn it.
                    for transport in &transports {
                        lock(transport).vm_ended();
                    }
                })
                // A closure that never ran is dropped, and `threads` with it.
                .map_err(BuildError::Thread)?;
            wait_jailed(&in_jail)?;
            thread
        };
        Ok(Vm {
            vcpus,
            running: AtomicBool::new(false),
            transition: Mutex::new(()),
            ending,
            supervisor: Mutex::new(Some(supervisor)),
            devices: parts.devices,
            lifecycle: parts.lifecycle,
            guest_mappings: parts.guest_mappings,
            msr_indices: parts.msr_indices,
            origin: Mutex::new(parts.origin),
            vm_fd: parts.vm,
            memory: parts.memory,
        })
    }

    /// Each thread jails itself before it serves anything and says so; a thread that cannot
    /// fails the build (and `threads`, dropped by the caller, stops the ones started).
    fn spawn_threads(
        threads: &mut Threads,
        jail: &Jail,
        vcpus: Vec<Vcpu>,
        event_loops: Vec<DeviceLoop>,
    ) -> Result<(), BuildError> {
        let (jailed, in_jail) = std::sync::mpsc::channel();
        for device_loop in event_loops {
            if device_loop.event_loop.is_empty() {
                continue;
            }
            let (jail, jailed) = (jail.clone(), jailed.clone());
            let (event_loop, role) = (device_loop.event_loop, device_loop.role);
            let thread = std::thread::Builder::new()
                .name(device_loop.name.into())
                .spawn(move || {
                    let failed = !jail.enter_reporting(role, &jailed);
                    if !failed {
                        event_loop.run();
                    }
                })
                .map_err(BuildError::Thread)?;
            threads.devices.push((device_loop.stop, thread));
            wait_jailed(&in_jail)?;
        }
        for vcpu in vcpus {
            let control = Arc::new(VcpuControl::new());
            let theirs = control.clone();
            let (jail, jailed) = (jail.clone(), jailed.clone());
            let thread = std::thread::Builder::new()
                .name(format!("cocoon-vcpu{}", vcpu.id))
                .spawn(move || {
                    let failed = !jail.enter_reporting(Role::Vcpu, &jailed);
                    if failed {
                        // What `run` would say on leaving; the stopping host waits for it.
                        theirs.exited();
                    } else {
                        vcpu.run(theirs);
                    }
                })
                .map_err(BuildError::Thread)?;
            let slot = VcpuSlot {
                control,
                thread: thread.as_pthread_t(),
            };
            threads.vcpus.push((slot, thread));
            wait_jailed(&in_jail)?;
        }
        Ok(())
    }

    /// Lets every vCPU run. Returns at once; resuming a running VM changes nothing.
    pub fn resume(&self) -> Result<(), VmError> {
        let _transition = lock(&self.transition);
        self.not_ended()?;
        for slot in &self.vcpus {
            slot.request(Request::Run);
        }
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Returns once every vCPU is out of `KVM_RUN` and parked (or gone, if the VM ended
    /// meanwhile). Pausing a paused VM changes nothing. Devices keep serving their host side
    /// (a vsock peer's bytes still land in guest buffers); only the vCPUs stop.
    pub fn pause(&self) -> Result<(), VmError> {
        let _transition = lock(&self.transition);
        self.not_ended()?;
        for slot in &self.vcpus {
            slot.request(Request::Pause);
        }
        for slot in &self.vcpus {
            slot.control.wait_until_parked();
        }
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Ends the VM from the host: vCPUs are kicked out of `KVM_RUN` and their threads leave.
    /// Returns at once; [`Vm::wait`] then gives [`ExitReason::Stopped`], or the guest's own
    /// reason if it ended first.
    pub fn stop(&self) {
        self.lifecycle.end(ExitReason::Stopped);
    }

    pub fn state(&self) -> VmState {
        match self.try_wait() {
            Some(reason) => VmState::Ended(reason),
            None if self.running.load(Ordering::SeqCst) => VmState::Running,
            None => VmState::Paused,
        }
    }

    /// Each vCPU's state, by vCPU id.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.vcpus.iter().map(|s| s.control.state()).collect()
    }

    /// Blocks until the VM has ended and every vCPU thread is joined.
    pub fn wait(&self) -> ExitReason {
        let mut reason = lock(&self.ending.reason);
        loop {
            if let Some(reason) = reason.as_ref() {
                return reason.clone();
            }
            reason = self
                .ending
                .published
                .wait(reason)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// [`Vm::wait`] for at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let reason = lock(&self.ending.reason);
        let (reason, _) = self
            .ending
            .published
            .wait_timeout_while(reason, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        reason.clone()
    }

    /// The reason, if the VM has ended.
    pub fn try_wait(&self) -> Option<ExitReason> {
        lock(&self.ending.reason).clone()
    }

    /// Runs `f` on every vCPU's fd, on the vCPU's own thread (KVM wants most vCPU ioctls from
    /// there), while the VM is paused; the results come back by vCPU id. The hook later work
    /// (saving and restoring vCPU state) builds on.
    pub fn with_vcpus<R, F>(&self, f: F) -> Result<Vec<R>, VmError>
    where
        F: Fn(u8, &mut VcpuFd) -> R + Send + Sync + 'static,
        R: Send + 'static,
    {
        let _transition = lock(&self.transition);
        self.on_paused_vcpus(f)
    }

    /// [`Vm::with_vcpus`], for a caller that holds the transition lock.
    fn on_paused_vcpus<R, F>(&self, f: F) -> Result<Vec<R>, VmError>
    where
        F: Fn(u8, &mut VcpuFd) -> R + Send + Sync + 'static,
        R: Send + 'static,
    {
        self.not_ended()?;
        if self.running.load(Ordering::SeqCst) {
            return Err(VmError::NotPaused);
        }
        let f = Arc::new(f);
        let (tx, rx) = std::sync::mpsc::channel();
        for (id, slot) in self.vcpus.iter().enumerate() {
            let (f, tx, id) = (f.clone(), tx.clone(), id as u8);
            if !slot.control.submit(Box::new(move |fd: &mut VcpuFd| {
                let _ = tx.send((id, f(id, fd)));
            })) {
                return Err(VmError::Ended(self.wait()));
            }
        }
        drop(tx);
        let mut results: Vec<Option<R>> = (0..self.vcpus.len()).map(|_| None).collect();
        for _ in 0..self.vcpus.len() {
            // A thread that leaves drops its queued commands and their senders.
            let Ok((id, result)) = rx.recv() else {
                return Err(VmError::Ended(self.wait()));
            };
            results[usize::from(id)] = Some(result);
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Restores the VM a snapshot describes, paused (see `builder::restore`).
    pub fn restore(
        restore: &RestoreConfig,
        started: Instant,
        started_wall: SystemTime,
    ) -> Result<Vm, SnapshotError> {
        crate::builder::restore(restore, started, started_wall)
    }

    /// Saves the paused VM to `dir` (created if missing): guest RAM to `memory.bin`, then the
    /// rest to `state.bin`. Devices are held still meanwhile (the device thread waits), so RAM
    /// and device state agree. The VM stays paused.
    pub fn snapshot(&self, dir: &Path) -> Result<(), SnapshotError> {
        let _transition = lock(&self.transition);
        if self.running.load(Ordering::SeqCst) {
            return Err(SnapshotError::NotPaused);
        }
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
            what: "create",
            path: dir.to_owned(),
            source,
        })?;
        // A half-written directory must not pass for a snapshot.
        let _ = std::fs::remove_file(dir.join(snapshot::STATE_FILE));
        let msrs = Arc::new(self.msr_indices.clone());
        let vcpus = self
            .on_paused_vcpus(move |id, fd| crate::vcpu::persist::save(fd, id, &msrs))
            .map_err(|e| match e {
                VmError::Ended(reason) => SnapshotError::Ended(reason),
                VmError::NotPaused => SnapshotError::NotPaused,
            })?
            .into_iter()
            .collect::<Result<Vec<_>, VcpuPersistError>>()?;
        let machine = snapshot::machine::save(&self.vm_fd)?;
        let guards: Vec<_> = self.devices.virtio().map(|(id, t)| (id, lock(t))).collect();
        let origin = lock(&self.origin);
        let memory = snapshot::memory::save(
            &self.memory,
            dir,
            origin.memory_from_file,
            &origin.file_mapped,
        )?;
        let devices = guards
            .iter()
            .map(|(id, transport)| (id.to_string(), transport.save()))
            .collect();
        drop(guards);
        let mut config = origin.config.clone();
        // A TAP fd is this process's: such a NIC is saved detached (its device state too), and
        // each restore gives it a TAP of its own.
        for net in &mut config.nets {
            if matches!(net.tap, TapSource::Fd(_)) {
                net.tap = TapSource::Detached;
            }
        }
        let state = VmSnapshot {
            config,
            boot_files: origin.boot_files.clone(),
            memory,
            machine,
            vcpus,
            devices,
            serial: self.devices.serial.as_ref().map(|s| lock(s).save()),
            guest_status: crate::devices::guest_status::GuestStatusState::save(&self.lifecycle),
        };
        snapshot::write_state(dir, &state)
    }

    /// The configuration this VM was built (or restored) with, disks as swapped since.
    pub fn config(&self) -> VmConfig {
        lock(&self.origin).config.clone()
    }

    /// Gives block device `id` (`block0`, ...) a new backing file, and tells the guest, which
    /// re-reads the capacity (a config-change interrupt). Meant for a disk the guest does not
    /// use meanwhile: a spare slot, or one whose filesystem is unmounted.
    pub fn swap_disk(&self, id: &str, disk: DiskConfig) -> Result<(), SwapError> {
        let index = id
            .strip_prefix("block")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| SwapError::NoSuchDisk(id.to_owned()))?;
        let transport = self
            .devices
            .get(id)
            .ok_or_else(|| SwapError::NoSuchDisk(id.to_owned()))?;
        // Device before origin, as `snapshot` takes them.
        let mut device = lock(transport);
        device.swap_disk(disk.clone())?;
        let mut origin = lock(&self.origin);
        if let Some(slot) = origin.config.disks.get_mut(index) {
            *slot = disk;
        }
        Ok(())
    }

    /// Gives NIC `id` (`net0`, ...) `tap` as its host side while the guest runs: a detached NIC
    /// of a VM restored from a template, once the engine has made the container's network
    /// (Docker does so after `create`). What a snapshot saves follows.
    pub fn attach_tap(&self, id: &str, tap: TapSource) -> Result<(), AttachError> {
        let index = id
            .strip_prefix("net")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| AttachError::NoSuchNic(id.to_owned()))?;
        let transport = self
            .devices
            .get(id)
            .ok_or_else(|| AttachError::NoSuchNic(id.to_owned()))?;
        // Device before origin, as `snapshot` takes them.
        let mut device = lock(transport);
        device.attach_tap(&tap)?;
        let mut origin = lock(&self.origin);
        if let Some(slot) = origin.config.nets.get_mut(index) {
            // The caller's fd number means nothing once it closes it; the VMM holds its own.
            slot.tap = match tap {
                TapSource::Fd(_) => TapSource::Detached,
                other => other,
            };
        }
        Ok(())
    }

    /// Shares a host directory or file (`share.root`, opened by the caller, usually `O_PATH`)
    /// with the guest through virtio-fs device `id` (`fs0`), while the VM runs or is paused:
    /// a VM restored from a template gets its container's volumes this way. A snapshot does
    /// not keep it (a descriptor, not a path); one taken once the guest has used the share
    /// refuses to restore.
    pub fn add_share(&self, id: &str, share: Share) -> Result<(), ShareError> {
        let transport = self
            .devices
            .get(id)
            .ok_or_else(|| ShareError::NoFs(id.to_owned()))?;
        lock(transport).add_share(share)?;
        Ok(())
    }

    /// Boot timestamps and exit counters, for metrics.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// Host address ranges of guest RAM (left out of the VMM's own RSS).
    pub fn guest_mappings(&self) -> &[(usize, usize)] {
        &self.guest_mappings
    }

    /// Every device, virtio ones by id (see `devices/registry.rs`).
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn not_ended(&self) -> Result<(), VmError> {
        match self.try_wait() {
            Some(reason) => Err(VmError::Ended(reason)),
            None => Ok(()),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Guest memory and the VM fd go with `self`: first make sure no vCPU can touch them.
        self.stop();
        self.wait();
        if let Some(supervisor) = lock(&self.supervisor).take() {
            let _ = supervisor.join();
        }
    }
}
