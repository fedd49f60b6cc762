//! The run state of one vCPU thread, shared between that thread and the VM handle.
//!
//! The host asks (run, pause, stop); the vCPU thread answers by moving between parked and
//! running. Everything here is plain locking, generic over what the thread owns (its `VcpuFd`
//! in the VMM, a stand-in in the tests), so the state machine is tested without KVM. Getting a
//! thread out of `KVM_RUN` is the caller's business: [`RunControl::request`] tells it through
//! the `kick` closure.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::bus::lock;

/// What the host wants a vCPU to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Run,
    Pause,
    /// Final: no later request undoes it, so a pause racing with the end of the VM cannot
    /// park a thread that the VM is waiting to join.
    Stop,
}

/// Where a vCPU thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Parked outside `KVM_RUN`; commands run here.
    Paused,
    /// Between leaving the park and coming back to it: in or around `KVM_RUN`.
    Running,
    /// The thread has left (the VM ended); it owns nothing any more.
    Exited,
}

impl VcpuState {
    pub fn name(self) -> &'static str {
        match self {
            VcpuState::Paused => "paused",
            VcpuState::Running => "running",
            VcpuState::Exited => "exited",
        }
    }
}

/// What a parked thread does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    Run,
    Stop,
}

/// Work for a parked thread, on what it owns.
pub type Command<T> = Box<dyn FnOnce(&mut T) + Send>;

struct Inner<T> {
    request: Request,
    state: VcpuState,
    commands: VecDeque<Command<T>>,
}

pub struct RunControl<T> {
    inner: Mutex<Inner<T>>,
    changed: Condvar,
    /// `request != Run`, readable without the lock on every pass of the run loop.
    leave: AtomicBool,
}

impl<T> Default for RunControl<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> RunControl<T> {
    /// A vCPU that has not run yet: paused, and asked to stay so.
    pub fn new() -> Self {
        RunControl {
            inner: Mutex::new(Inner {
                request: Request::Pause,
                state: VcpuState::Paused,
                commands: VecDeque::new(),
            }),
            changed: Condvar::new(),
            leave: AtomicBool::new(true),
        }
    }

    // Host side.

    /// Asks for `request`; `kick` is called (under the lock, so the thread cannot exit
    /// meanwhile) when the thread is running and must be got out of `KVM_RUN`.
    pub fn request(&self, request: Request, kick: impl FnOnce()) {
        let mut inner = lock(&self.inner);
        if inner.request == Request::Stop || inner.state == VcpuState::Exited {
            return;
        }
        inner.request = request;
        // Before the kick: the thread checks the flag after the kick's immediate-exit mark.
        self.leave.store(request != Request::Run, Ordering::SeqCst);
        if request != Request::Run && inner.state == VcpuState::Running {
            kick();
        }
        self.changed.notify_all();
    }

    /// Blocks until the thread is parked or gone (not merely asked to be).
    pub fn wait_until_parked(&self) {
        let mut inner = lock(&self.inner);
        while inner.state == VcpuState::Running {
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until the thread has left.
    pub fn wait_until_exited(&self) {
        let mut inner = lock(&self.inner);
        while inner.state != VcpuState::Exited {
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn state(&self) -> VcpuState {
        lock(&self.inner).state
    }

    /// Queues `command` for the parked thread. Returns false (and drops it) when the thread
    /// has left; a thread that leaves with commands queued drops them, so a caller waiting for
    /// a command's answer on a channel learns it will not come.
    pub fn submit(&self, command: Command<T>) -> bool {
        let mut inner = lock(&self.inner);
        if inner.state == VcpuState::Exited || inner.request == Request::Stop {
            return false;
        }
        inner.commands.push_back(command);
        self.changed.notify_all();
        true
    }

    // vCPU thread side.

    /// Parks the calling thread until it may run or must stop, running queued commands on
    /// `target` meanwhile.
    pub fn park(&self, target: &mut T) -> Resume {
        let mut inner = lock(&self.inner);
        if inner.state != VcpuState::Paused {
            inner.state = VcpuState::Paused;
            self.changed.notify_all();
        }
        loop {
            while let Some(command) = inner.commands.pop_front() {
                // Without the lock: a command may take long (saving state), and the host may
                // ask for more meanwhile.
                drop(inner);
                command(target);
                inner = lock(&self.inner);
            }
            match inner.request {
                Request::Stop => return Resume::Stop,
                Request::Run => {
                    inner.state = VcpuState::Running;
                    self.changed.notify_all();
                    return Resume::Run;
                }
                Request::Pause => {
                    inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Whether the running thread must go back to its park (checked before every `KVM_RUN`).
    pub fn should_leave(&self) -> bool {
        self.leave.load(Ordering::SeqCst)
    }

    /// The thread is leaving for good.
    pub fn exited(&self) {
        let mut inner = lock(&self.inner);
        inner.state = VcpuState::Exited;
        inner.commands.clear();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    /// A stand-in vCPU thread: "runs" by counting until asked to leave, as the real loop
    /// checks before each `KVM_RUN`.
    fn spawn_fake(
        control: Arc<RunControl<u64>>,
        work: Arc<AtomicU64>,
    ) -> std::thread::JoinHandle<u64> {
        std::thread::spawn(move || {
            let mut target = 0u64;
            loop {
                if control.park(&mut target) == Resume::Stop {
                    break;
                }
                while !control.should_leave() {
                    work.fetch_add(1, Ordering::SeqCst);
                    std::thread::yield_now();
                }
            }
            control.exited();
            target
        })
    }

    #[test]
    fn starts_paused_and_does_nothing_until_asked() {
        let control = Arc::new(RunControl::new());
        let work = Arc::new(AtomicU64::new(0));
        let thread = spawn_fake(control.clone(), work.clone());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(control.state(), VcpuState::Paused);
        assert_eq!(work.load(Ordering::SeqCst), 0);
        control.request(Request::Stop, || {});
        control.wait_until_exited();
        assert_eq!(control.state(), VcpuState::Exited);
        thread.join().unwrap();
    }

    #[test]
    fn pause_waits_for_the_thread_and_freezes_it() {
        let control = Arc::new(RunControl::new());
        let work = Arc::new(AtomicU64::new(0));
        let thread = spawn_fake(control.clone(), work.clone());
        let kicks = AtomicU64::new(0);
        for _ in 0..50 {
            control.request(Request::Run, || panic!("no kick to run"));
            while work.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            control.request(Request::Pause, || {
                kicks.fetch_add(1, Ordering::SeqCst);
            });
            control.wait_until_parked();
            assert_eq!(control.state(), VcpuState::Paused);
            let frozen = work.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(work.load(Ordering::SeqCst), frozen, "ran while paused");
            // Pausing again changes nothing and kicks nobody.
            control.request(Request::Pause, || panic!("kicked a parked thread"));
            control.wait_until_parked();
            work.store(0, Ordering::SeqCst);
        }
        assert_eq!(kicks.load(Ordering::SeqCst), 50, "one kick per pause");
        control.request(Request::Stop, || {});
        thread.join().unwrap();
    }

    #[test]
    fn resume_then_pause_at_once_is_not_lost() {
        let control = Arc::new(RunControl::new());
        let work = Arc::new(AtomicU64::new(0));
        let thread = spawn_fake(control.clone(), work.clone());
        for _ in 0..1000 {
            control.request(Request::Run, || {});
            control.request(Request::Pause, || {});
            control.wait_until_parked();
            assert_eq!(control.state(), VcpuState::Paused);
        }
        control.request(Request::Stop, || {});
        thread.join().unwrap();
    }

    #[test]
    fn stop_is_final_and_reaches_running_and_parked_threads() {
        for running in [false, true] {
            let control = Arc::new(RunControl::new());
            let work = Arc::new(AtomicU64::new(0));
            let thread = spawn_fake(control.clone(), work.clone());
            if running {
                control.request(Request::Run, || {});
            }
            control.request(Request::Stop, || {});
            control.request(Request::Run, || panic!("no kick after stop"));
            control.request(Request::Pause, || panic!("no kick after stop"));
            control.wait_until_exited();
            thread.join().unwrap();
            assert_eq!(control.state(), VcpuState::Exited);
            // Requests after the end are ignored, commands refused.
            control.request(Request::Run, || panic!("kicked an exited thread"));
            assert!(!control.submit(Box::new(|_| {})));
        }
    }

    #[test]
    fn commands_run_on_the_parked_thread() {
        let control = Arc::new(RunControl::new());
        let work = Arc::new(AtomicU64::new(0));
        let thread = spawn_fake(control.clone(), work.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        for add in [1u64, 2, 3] {
            let tx = tx.clone();
            assert!(control.submit(Box::new(move |target: &mut u64| {
                *target += add;
                tx.send(*target).unwrap();
            })));
        }
        assert_eq!(
            (0..3).map(|_| rx.recv().unwrap()).collect::<Vec<_>>(),
            [1, 3, 6]
        );
        assert_eq!(control.state(), VcpuState::Paused);
        control.request(Request::Stop, || {});
        assert_eq!(thread.join().unwrap(), 6);
    }
}
