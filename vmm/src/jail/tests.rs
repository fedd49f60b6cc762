use super::*;

/// Runs `body` in a forked child jailed as `role` and returns how the child ended: `Ok(code)`
/// for an exit, `Err(signal)` for a kill. The child makes only raw system calls (a forked
/// child of a threaded process must not take locks another thread may hold).
fn in_jailed_child(role: Role, body: fn() -> i32) -> Result<i32, i32> {
    let jail = Jail::new_enforcing();
    // SAFETY: the child only enters the jail (system calls on memory compiled before the
    // fork) and runs `body`, then leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match jail.enter(role) {
            Ok(()) => body(),
            Err(_) => 100,
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is ours.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(libc::WTERMSIG(status))
    }
}

impl Jail {
    /// The filters whatever the process-wide switch says (tests run in one process).
    fn new_enforcing() -> Jail {
        Jail {
            filters: Some(Filters {
                vcpu: compile(Role::Vcpu).unwrap(),
                devices: compile(Role::Devices).unwrap(),
                files: compile(Role::Files).unwrap(),
            }),
        }
    }
}

fn socket(domain: libc::c_int) -> i32 {
    // SAFETY: makes a socket, or is refused; no memory of ours is touched.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
    if fd >= 0 { 0 } else { 1 }
}

#[test]
fn a_forbidden_call_kills_the_whole_vmm() {
    // A device thread taken over by the guest cannot reach the network or the file system.
    assert_eq!(
        in_jailed_child(Role::Devices, || socket(libc::AF_INET)),
        Err(libc::SIGSYS)
    );
    assert_eq!(
        in_jailed_child(Role::Devices, || {
            // SAFETY: a NUL-terminated path; the call is expected to be fatal.
            unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) }
        }),
        Err(libc::SIGSYS)
    );
    assert_eq!(
        in_jailed_child(Role::Vcpu, || {
            let mut fds = [0; 2];
            // SAFETY: pipe2 would fill our array; it is not allowed, so this must kill.
            unsafe { libc::pipe2(fds.as_mut_ptr(), 0) }
        }),
        Err(libc::SIGSYS)
    );
    // A vCPU thread makes no sockets at all, and no process.
    assert_eq!(
        in_jailed_child(Role::Vcpu, || socket(libc::AF_UNIX)),
        Err(libc::SIGSYS)
    );
    assert_eq!(
        in_jailed_child(Role::Vcpu, || {
            // SAFETY: fork is expected to be fatal here.
            unsafe { libc::fork() }
        }),
        Err(libc::SIGSYS)
    );
}

#[test]
fn the_file_server_opens_files_but_makes_no_socket_and_runs_nothing() {
    assert_eq!(
        in_jailed_child(Role::Files, || {
            // SAFETY: a NUL-terminated path; the descriptor is closed again.
            let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_PATH) };
            // SAFETY: ours.
            (fd < 0 || unsafe { libc::close(fd) } != 0) as i32
        }),
        Ok(0)
    );
    assert_eq!(
        in_jailed_child(Role::Files, || socket(libc::AF_UNIX)),
        Err(libc::SIGSYS)
    );
    assert_eq!(
        in_jailed_child(Role::Files, || {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            // SAFETY: NUL-terminated path and argv; expected to be fatal.
            unsafe { libc::execv(c"/bin/true".as_ptr(), argv.as_ptr()) }
        }),
        Err(libc::SIGSYS)
    );
    assert_eq!(
        in_jailed_child(Role::Files, || {
            // SAFETY: expected to be fatal.
            unsafe { libc::ioctl(0, libc::FIONREAD, std::ptr::null_mut::<i32>()) }
        }),
        Err(libc::SIGSYS)
    );
}

#[test]
fn what_a_thread_needs_still_works_in_the_jail() {
    assert_eq!(
        in_jailed_child(Role::Devices, || socket(libc::AF_UNIX)),
        Ok(0)
    );
    assert_eq!(
        in_jailed_child(Role::Vcpu, || {
            // SAFETY: an anonymous read-write mapping, unmapped again.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return 1;
            }
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(p, 4096) }
        }),
        Ok(0)
    );
}

#[test]
fn executable_memory_cannot_be_made() {
    assert_eq!(
        in_jailed_child(Role::Devices, || {
            // SAFETY: expected to be fatal: an executable mapping.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            (p == libc::MAP_FAILED) as i32
        }),
        Err(libc::SIGSYS)
    );
}

/// The `/proc` status of a forked child once it has jailed itself as `role`.
fn jailed_status(role: Role) -> String {
    let jail = Jail::new_enforcing();
    let mut fds = [0; 2];
    // SAFETY: pipe fills our array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let [hold, release] = fds;
    // SAFETY: the child enters the jail, blocks reading the pipe until the parent closes it,
    // and leaves with _exit: raw system calls only.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: the child's copy of the write end: with it open, the read below never ends.
        unsafe { libc::close(release) };
        let code = match jail.enter(role) {
            Ok(()) => {
                let mut byte = 0u8;
                // SAFETY: reads into our byte; returns 0 once the parent closes its end.
                unsafe { libc::read(hold, (&raw mut byte).cast(), 1) };
                0
            }
            Err(_) => 100,
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let path = format!("/proc/{pid}/status");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let status = std::fs::read_to_string(&path).unwrap();
        if status.contains("Seccomp:\t2") || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    // SAFETY: our pipe ends, closed once; the child then leaves.
    unsafe {
        libc::close(release);
        libc::close(hold);
    }
    let mut code = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut code, 0) }, pid);
    assert!(
        libc::WIFEXITED(code) && libc::WEXITSTATUS(code) == 0,
        "{code:#x}"
    );
    status
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

#[test]
fn a_jailed_thread_keeps_no_privilege() {
    for role in [Role::Vcpu, Role::Devices] {
        let status = jailed_status(role);
        assert_eq!(field(&status, "Seccomp"), "2", "{role:?}: {status}");
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{role:?}");
        assert_eq!(field(&status, "CapEff"), "0000000000000000", "{role:?}");
        assert_eq!(field(&status, "CapPrm"), "0000000000000000", "{role:?}");
    }
    // The file server keeps what it needs to act for the guest's users on shared files (the
    // tests run as root), and nothing else: no CAP_SYS_ADMIN, CAP_NET_*, CAP_SETUID, ...
    let status = jailed_status(Role::Files);
    assert_eq!(field(&status, "Seccomp"), "2");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "CapEff"), "000000000000000b");
    assert_eq!(field(&status, "CapPrm"), "000000000000000b");
    assert_eq!(field(&status, "CapInh"), "0000000000000000");
    // The jail is per thread: this (unjailed) one has no no_new_privs.
    // SAFETY: PR_GET_NO_NEW_PRIVS reads a flag of this thread.
    let no_new_privs = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    assert_eq!(no_new_privs, 0);
}

#[test]
fn ioctl_numbers_are_the_kernels() {
    // From <linux/kvm.h> and <linux/if_tun.h> as the kernel computes them on x86-64.
    assert_eq!(ioctls::KVM_RUN, 0xae80);
    assert_eq!(ioctls::KVM_GET_TSC_KHZ, 0xaea3);
    assert_eq!(ioctls::VCPU_STATE_READS[0], 0x8090_ae81); // KVM_GET_REGS
    assert_eq!(ioctls::VCPU_STATE_READS[1], 0x8138_ae83); // KVM_GET_SREGS
    assert_eq!(ioctls::VCPU_STATE_READS[2], 0xc008_ae88); // KVM_GET_MSRS
    assert_eq!(ioctls::VCPU_STATE_READS[4], 0x8400_ae8e); // KVM_GET_LAPIC
    assert_eq!(ioctls::VCPU_STATE_READS[5], 0xc008_ae91); // KVM_GET_CPUID2
    assert_eq!(ioctls::VCPU_STATE_READS[9], 0x9000_aea4); // KVM_GET_XSAVE
    assert_eq!(ioctls::TUNSETOFFLOAD, 0x4004_54d0);
}

#[test]
fn the_vmm_process_is_not_dumpable_and_guest_memory_not_dumped() {
    let size = 1 << 20;
    // SAFETY: an anonymous read-write mapping standing for guest memory, unmapped at the end.
    let memory = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(memory, libc::MAP_FAILED);
    // SAFETY: the child only makes system calls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        harden_process(&[(memory as usize, size)]);
        // SAFETY: PR_GET_DUMPABLE reads a flag of this process.
        let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(dumpable) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 0, "the process stayed dumpable");
    // SAFETY: our mapping, unmapped once.
    unsafe { libc::munmap(memory, size) };
}
