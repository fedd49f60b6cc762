//! Which extended register state guest user space can use, against what the guest kernel
//! saves across context switches, and what the agent does when the two differ.
//!
//! On PVM hosts the guest kernel runs with `noxsave` (XSAVE is fatal in its emulated kernel
//! mode) and so saves only x87 and SSE registers, while user mode runs natively with the host's
//! XCR0, AVX-512 included. Two guest processes that use AVX then overwrite each other's
//! registers. The VMM puts a `GLIBC_TUNABLES` that turns glibc's AVX code paths off on the
//! kernel command line (the kernel hands it to init); the agent passes it on to every
//! container process, so glibc programs stay on SSE.

use std::sync::OnceLock;

/// XCR0 bits for x87 and SSE state: what FXSAVE saves.
const FXSAVE_STATE: u64 = 0x3;

pub struct ExtendedState {
    /// XCR0 as XGETBV shows it to user mode; `None` when OSXSAVE is off (no XGETBV).
    pub user_xcr0: Option<u64>,
    /// Whether the kernel saves extended state with XSAVE (`xsave` in /proc/cpuinfo).
    pub kernel_xsave: bool,
}

impl ExtendedState {
    pub fn read() -> ExtendedState {
        let osxsave = std::arch::x86_64::__cpuid(1).ecx & (1 << 27) != 0;
        let user_xcr0 = osxsave.then(|| {
            let (lo, hi): (u32, u32);
            // SAFETY: XGETBV with ECX=0 reads XCR0; OSXSAVE set means user mode may run it.
            unsafe {
                std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                    options(nomem, nostack, preserves_flags));
            }
            u64::from(hi) << 32 | u64::from(lo)
        });
        let kernel_xsave = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                let flags = info.lines().find(|l| l.starts_with("flags"))?.to_owned();
                Some(flags.split_whitespace().any(|f| f == "xsave"))
            })
            .unwrap_or(false);
        ExtendedState {
            user_xcr0,
            kernel_xsave,
        }
    }

    /// Whether user space can use registers that no context switch preserves.
    pub fn unsaved(&self) -> bool {
        !self.kernel_xsave && self.user_xcr0.is_some_and(|xcr0| xcr0 & !FXSAVE_STATE != 0)
    }

    /// The boot check's report:
    /// `cocoon-agent: user xcr0 0xN|none, kernel xsave yes|no, glibc avx on|off`.
    pub fn line(&self) -> String {
        let xcr0 = self
            .user_xcr0
            .map_or_else(|| "none".to_owned(), |x| format!("{x:#x}"));
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let avx = if container_env().is_some() {
            "off"
        } else {
            "on"
        };
        format!(
            "cocoon-agent: user xcr0 {xcr0}, kernel xsave {}, glibc avx {avx}",
            yes_no(self.kernel_xsave)
        )
    }
}

/// `GLIBC_TUNABLES=...` to add to every container process's environment, when user space
/// can use registers the kernel does not save and the agent was started with the tunables.
pub fn container_env() -> Option<&'static str> {
    static ENV: OnceLock<Option<String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let tunables = std::env::var("GLIBC_TUNABLES").ok()?;
        ExtendedState::read()
            .unsaved()
            .then(|| format!("GLIBC_TUNABLES={tunables}"))
    })
    .as_deref()
}

/// `env` with `extra` (`NAME=value`) added: a process's own setting of the same variable keeps
/// its value and gets `extra`'s appended after a `:` (tunables are `:`-separated, later wins).
pub fn with_env(env: &[String], extra: &str) -> Vec<String> {
    let Some((name, value)) = extra.split_once('=') else {
        return env.to_vec();
    };
    let prefix = format!("{name}=");
    let mut out = env.to_vec();
    match out.iter_mut().find(|e| e.starts_with(&prefix)) {
        Some(own) if own.len() > prefix.len() => {
            own.push(':');
            own.push_str(value);
        }
        Some(own) => *own = extra.to_owned(),
        None => out.push(extra.to_owned()),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsaved_state_is_wider_than_fxsave_without_kernel_xsave() {
        let state = |xcr0, kernel_xsave| ExtendedState {
            user_xcr0: xcr0,
            kernel_xsave,
        };
        assert!(state(Some(0xe7), false).unsaved());
        assert!(!state(Some(0x3), false).unsaved());
        assert!(!state(None, false).unsaved());
        assert!(!state(Some(0xe7), true).unsaved());
    }

    #[test]
    fn tunables_are_added_or_appended() {
        let t = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX";
        assert_eq!(with_env(&["A=1".into()], t), ["A=1", t]);
        assert_eq!(
            with_env(&["GLIBC_TUNABLES=glibc.malloc.check=3".into()], t),
            ["GLIBC_TUNABLES=glibc.malloc.check=3:glibc.cpu.hwcaps=-AVX"]
        );
        assert_eq!(with_env(&["GLIBC_TUNABLES=".into()], t), [t]);
    }
}
