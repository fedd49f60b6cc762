//! Compiles an OCI runtime-spec seccomp profile into a classic BPF program for
//! x86_64, without libseccomp.
//!
//! The output is meant for `prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)`
//! (or `seccomp(SECCOMP_SET_MODE_FILTER, filter_flags(..), &prog)` when the
//! profile carries flags, which `prctl` cannot express).
//!
//! # Program shape
//!
//! ```text
//!   A = arch;  if A != AUDIT_ARCH_X86_64            -> KILL_PROCESS
//!   A = nr;    if A >= X32_BIT && A != 0xffffffff   -> KILL_PROCESS
//!              if A > last && A != 0xffffffff       -> ERRNO(ENOSYS)  (only for some profiles)
//!   unconditional rule blocks, then conditional rule blocks
//!   RET default action
//! ```
//!
//! Every rule becomes a self-contained block that either returns or falls
//! through to the next block. Conditional BPF jumps only carry 8-bit offsets,
//! so the generator never lets a conditional jump leave its own small group:
//! syscall-number checks are emitted in groups of at most [`MAX_GROUP`], and a
//! failed argument comparison lands on a 32-bit `JA` placed right after it.
//! The program therefore scales to any profile size up to `BPF_MAXINSNS`.
//!
//! # Semantics
//!
//! A profile means what it means under runc, which hands each rule to
//! libseccomp (`libcontainer/seccomp/seccomp_linux.go: matchCall`):
//!
//! * A rule whose action (errno included) equals the default action is
//!   dropped: runc skips it because libseccomp refuses it
//!   (`seccomp_rule_add_array`: `-EACCES`).
//! * For one syscall, a rule without argument conditions overrides every
//!   conditional rule, wherever the rules stand in the profile, and the first
//!   such rule wins over later ones. libseccomp keeps one decision per syscall
//!   (`db.c: db_rule_add`): adding an unconditional rule deletes the
//!   syscall's argument tree, and a rule added after an unconditional one is
//!   discarded ("existing filter is at least as large as the new entry").
//!   There is no fallthrough from failed comparisons to an unconditional
//!   action. A rule whose conditions are all tautologies (`SCMP_CMP_MASKED_EQ`
//!   with mask 0, for which libseccomp emits no comparison) is unconditional.
//! * Conditional rules for one syscall are tried in profile order and the
//!   first match wins. libseccomp instead sorts its argument tree by argument,
//!   operator and value, and refuses (`-EEXIST`, a runc error) some overlaps
//!   with different actions. Both agree whenever a syscall's conditional
//!   rules do not overlap with different actions, which is the case for the
//!   usual profiles; reproducing the tree is not worth a second libseccomp.
//! * Argument conditions of a rule are ANDed, except that when two or more
//!   conditions of one rule share an argument index, each condition is
//!   treated as an alternative (OR), as runc does (libseccomp refuses the
//!   repeated index, so runc adds one rule per condition).
//! * `SCMP_CMP_MASKED_EQ`: `value` is the mask and `valueTwo` (0 if absent)
//!   the datum, and the test is `(arg & mask) == (datum & mask)`: libseccomp
//!   masks the datum when it builds the rule (`db.c: _db_node_mask_fixup`),
//!   so datum bits outside the mask never matter.
//! * When the default action is neither allow, log nor trace and the profile
//!   lists `SCMP_ARCH_X86_64` (or `SCMP_ARCH_NATIVE`) in `architectures`, a
//!   syscall numbered above the highest number the profile names gets
//!   `ENOSYS` instead of the default action, as runc's `patchbpf` stub gives
//!   it: the profile predates such syscalls, and `ENOSYS` is what makes libc
//!   fall back on an older one (clone3 to clone, say) where `EPERM` would be
//!   a hard failure. As in runc, a highest number of 0 means no stub, and
//!   `nr == -1` skips it; a default that already answers `ENOSYS` needs none.
//! * Syscall names unknown on x86_64 are skipped, as runc does.
//! * `errnoRet` defaults to `EPERM` for `SCMP_ACT_ERRNO` and `SCMP_ACT_TRACE`.
//!
//! Where this runtime deliberately differs from runc:
//!
//! * Only x86_64 is supported: `architectures` only decides the `ENOSYS` stub.
//!   Any other audit arch (including 32-bit `int 0x80` calls, even if the
//!   profile lists `SCMP_ARCH_X86`) kills the process.
//! * x32 syscalls (nr with bit 30 set) kill the process rather than taking the
//!   default action, so that an allow-by-default profile cannot be bypassed
//!   by re-issuing a denied call through the x32 ABI. `nr == -1` is exempt: a
//!   tracer uses it to skip a syscall, and it falls to the default action.
//! * `SCMP_ACT_NOTIFY` is rejected: there is no notify agent in the guest.
//!
//! Unknown action or operator strings cannot reach this module: `oci-spec`
//! models them as closed enums and rejects them while deserializing.

use std::collections::HashSet;
use std::mem::offset_of;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};

mod table {
    include!(concat!(env!("OUT_DIR"), "/syscall_table_x86_64.rs"));
}

/// `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`; `libc` does not export it.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Syscall numbers with this bit set belong to the x32 ABI.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// seccomp_data.args has six entries.
const MAX_ARG_INDEX: usize = 5;
/// Syscall-number checks that share one return instruction. The first check's
/// jump over its siblings must fit in 8 bits, so this must stay below 255.
const MAX_GROUP: usize = 200;
/// The kernel rejects longer classic BPF programs.
pub const MAX_INSNS: usize = libc::BPF_MAXINSNS as usize;

const OFF_NR: u32 = offset_of!(libc::seccomp_data, nr) as u32;
const OFF_ARCH: u32 = offset_of!(libc::seccomp_data, arch) as u32;
const OFF_ARGS: u32 = offset_of!(libc::seccomp_data, args) as u32;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const ALU_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const JMP_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JMP_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JMP_JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JMP_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Why a profile could not be turned into a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeccompError {
    /// The profile asks for something this runtime deliberately lacks.
    #[error("unsupported seccomp feature: {0}")]
    Unsupported(&'static str),
    /// seccomp only exposes six syscall arguments.
    #[error(
        "seccomp rule #{rule}: argument index {index} is out of range (must be 0..={MAX_ARG_INDEX})"
    )]
    ArgIndex { rule: usize, index: usize },
    /// Larger values would spill into the action bits of the return value.
    #[error(
        "seccomp {context}: errno/trace value {value} does not fit in the 16-bit SECCOMP_RET_DATA field"
    )]
    ErrnoOutOfRange { context: String, value: u32 },
    /// The kernel refuses programs longer than `BPF_MAXINSNS`.
    #[error(
        "seccomp profile compiles to {len} BPF instructions, more than the kernel limit of {max}"
    )]
    TooLong { len: usize, max: usize },
    /// A generator bug, never a property of the profile; reported instead of
    /// emitting a program the kernel would misinterpret or reject.
    #[error("internal error: BPF jump at instruction {at} cannot be encoded")]
    BadJump { at: usize },
}

/// The x86_64 number of syscall `name`, or `None` if x86_64 has no such syscall.
pub fn syscall_number(name: &str) -> Option<u32> {
    table::SYSCALLS
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table::SYSCALLS[i].1)
}

/// `SECCOMP_FILTER_FLAG_*` bits requested by the profile, for the `flags`
/// argument of `seccomp(SECCOMP_SET_MODE_FILTER, ...)`.
pub fn filter_flags(profile: &LinuxSeccomp) -> Result<u32, SeccompError> {
    let mut bits = 0u32;
    for flag in profile.flags().iter().flatten() {
        bits |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(SeccompError::Unsupported(
                    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (only meaningful with SCMP_ACT_NOTIFY)",
                ));
            }
        } as u32;
    }
    Ok(bits)
}

/// Compiles `profile` into a classic BPF seccomp program for x86_64.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let default_ret = action_ret(
        profile.default_action(),
        profile.default_errno_ret(),
        || "default action".to_owned(),
    )?;

    let mut rules: Vec<Rule<'_>> = Vec::new();
    // Counts rules that are dropped below too: runc's stub looks at every name.
    let mut highest_nr: Option<u32> = None;
    for (idx, rule) in profile.syscalls().iter().flatten().enumerate() {
        // Validate before skipping, so a profile's errors do not depend on
        // which of its names this architecture happens to know.
        let ret = action_ret(rule.action(), rule.errno_ret(), || format!("rule #{idx}"))?;
        let args: &[LinuxSeccompArg] = rule.args().as_deref().unwrap_or_default();
        if let Some(bad) = args.iter().find(|a| a.index() > MAX_ARG_INDEX) {
            return Err(SeccompError::ArgIndex {
                rule: idx,
                index: bad.index(),
            });
        }

        let mut nrs: Vec<u32> = Vec::new();
        for nr in rule.names().iter().filter_map(|n| syscall_number(n)) {
            highest_nr = highest_nr.max(Some(nr));
            if !nrs.contains(&nr) {
                nrs.push(nr);
            }
        }
        if ret == default_ret || nrs.is_empty() {
            continue;
        }
        let alternatives = alternatives(args);
        // One tautological alternative makes the whole rule match every call.
        let alternatives = if alternatives.iter().any(Vec::is_empty) {
            Vec::new()
        } else {
            alternatives
        };
        rules.push(Rule {
            nrs,
            alternatives,
            ret,
        });
    }

    let mut asm = Asm::default();
    emit_prologue(&mut asm, enosys_above(profile, default_ret, highest_nr));

    // Unconditional rules go first so that no conditional block can answer
    // for a syscall they decide; see the module docs for why they win.
    let mut decided: HashSet<u32> = HashSet::new();
    for rule in rules.iter().filter(|r| r.alternatives.is_empty()) {
        let nrs: Vec<u32> = rule
            .nrs
            .iter()
            .copied()
            .filter(|&nr| decided.insert(nr))
            .collect();
        for group in nrs.chunks(MAX_GROUP) {
            emit_plain_group(&mut asm, group, rule.ret);
        }
    }

    // Argument checks overwrite the accumulator; track when `nr` must be reloaded.
    let mut acc_holds_nr = true;
    for rule in rules.iter().filter(|r| !r.alternatives.is_empty()) {
        let nrs: Vec<u32> = rule
            .nrs
            .iter()
            .copied()
            .filter(|nr| !decided.contains(nr))
            .collect();
        for group in nrs.chunks(MAX_GROUP) {
            if !acc_holds_nr {
                asm.load(OFF_NR);
            }
            emit_conditional_group(&mut asm, group, &rule.alternatives, rule.ret);
            acc_holds_nr = false;
        }
    }

    asm.ret(default_ret);
    asm.finish()
}

/// A rule that survived validation and can still match something.
struct Rule<'a> {
    /// Its x86_64 syscall numbers, each once.
    nrs: Vec<u32>,
    /// Empty for an unconditional rule.
    alternatives: Vec<Vec<&'a LinuxSeccompArg>>,
    ret: u32,
}

/// The number above which runc's `patchbpf` would answer `ENOSYS`, if it
/// would add its stub to this profile at all.
fn enosys_above(profile: &LinuxSeccomp, default_ret: u32, highest_nr: Option<u32>) -> Option<u32> {
    // A tracer or an allow-by-default profile is expected to cope with new
    // syscalls itself (runc: isAllowAction).
    let permissive = matches!(
        profile.default_action(),
        LinuxSeccompAction::ScmpActAllow
            | LinuxSeccompAction::ScmpActLog
            | LinuxSeccompAction::ScmpActTrace
    );
    // runc only patches the architectures the profile lists. It refuses
    // SCMP_ARCH_NATIVE, but here native can only mean x86_64.
    let lists_x86_64 = profile
        .architectures()
        .iter()
        .flatten()
        .any(|a| matches!(a, Arch::ScmpArchX86_64 | Arch::ScmpArchNative));
    let already_enosys = default_ret == libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    if permissive || !lists_x86_64 || already_enosys {
        return None;
    }
    // runc treats a highest number of 0 (only `read`) as "no syscalls found".
    highest_nr.filter(|&nr| nr != 0)
}

/// Kills anything that is not a native x86_64 syscall before rules run, so
/// rules only ever compare x86_64 numbers, and answers `ENOSYS` for numbers
/// above `enosys_above`, which no rule names.
fn emit_prologue(asm: &mut Asm, enosys_above: Option<u32>) {
    let kill = libc::SECCOMP_RET_KILL_PROCESS;
    let arch_ok = asm.label();
    asm.load(OFF_ARCH);
    asm.jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, To::L(arch_ok), To::Next);
    asm.ret(kill);
    asm.bind(arch_ok);

    let rules = asm.label();
    let native = asm.label();
    asm.load(OFF_NR);
    asm.jump(JMP_JGE_K, X32_SYSCALL_BIT, To::Next, To::L(native));
    // -1 skips the ENOSYS test too: it is no syscall, new or old.
    asm.jump(JMP_JEQ_K, u32::MAX, To::L(rules), To::Next);
    asm.ret(kill);
    asm.bind(native);
    if let Some(last) = enosys_above {
        asm.jump(JMP_JGT_K, last, To::Next, To::L(rules));
        asm.ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    }
    asm.bind(rules);
}

/// `if nr in group: return ret` — one compare per syscall, one shared return.
fn emit_plain_group(asm: &mut Asm, group: &[u32], ret: u32) {
    let hit = asm.label();
    let miss = asm.label();
    for (i, &nr) in group.iter().enumerate() {
        let on_miss = if i + 1 == group.len() {
            To::L(miss)
        } else {
            To::Next
        };
        asm.jump(JMP_JEQ_K, nr, To::L(hit), on_miss);
    }
    asm.bind(hit);
    asm.ret(ret);
    asm.bind(miss);
}

/// `if nr in group && any(all(alt) for alt in alternatives): return ret`.
fn emit_conditional_group(
    asm: &mut Asm,
    group: &[u32],
    alternatives: &[Vec<&LinuxSeccompArg>],
    ret: u32,
) {
    let matched = asm.label();
    let next_rule = asm.label();
    for &nr in group {
        asm.jump(JMP_JEQ_K, nr, To::L(matched), To::Next);
    }
    asm.goto(next_rule);
    asm.bind(matched);

    for (i, conds) in alternatives.iter().enumerate() {
        let next_alt = if i + 1 == alternatives.len() {
            next_rule
        } else {
            asm.label()
        };
        for cond in conds {
            emit_condition(asm, cond, next_alt);
        }
        asm.ret(ret);
        if i + 1 != alternatives.len() {
            asm.bind(next_alt);
        }
    }
    asm.bind(next_rule);
}

/// runc's rule: conditions are ANDed unless an argument index repeats, in
/// which case every condition becomes its own alternative. Conditions that
/// always hold are left out, as libseccomp leaves them out of its tree, so an
/// empty alternative matches every call.
fn alternatives(args: &[LinuxSeccompArg]) -> Vec<Vec<&LinuxSeccompArg>> {
    let mut seen = [false; MAX_ARG_INDEX + 1];
    let repeats = args
        .iter()
        .any(|a| std::mem::replace(&mut seen[a.index()], true));
    let tested = |a: &&LinuxSeccompArg| !always_holds(a);
    if repeats {
        args.iter()
            .map(|a| std::iter::once(a).filter(tested).collect())
            .collect()
    } else {
        vec![args.iter().filter(tested).collect()]
    }
}

/// `(arg & 0) == (datum & 0)` is true for every argument.
fn always_holds(cond: &LinuxSeccompArg) -> bool {
    cond.op() == LinuxSeccompOperator::ScmpCmpMaskedEq && cond.value() == 0
}

/// Falls through when `cond` holds and jumps to `fail` otherwise.
///
/// The 64-bit argument is compared as two 32-bit words (classic BPF loads are
/// 32-bit). Every conditional jump stays within this small sequence; the exit
/// to `fail` goes through a trailing `JA`, whose offset is 32-bit.
fn emit_condition(asm: &mut Asm, cond: &LinuxSeccompArg, fail: Label) {
    let lo_off = OFF_ARGS + 8 * cond.index() as u32;
    let hi_off = lo_off + 4;
    let (v_hi, v_lo) = split(cond.value());

    let ok = asm.label();
    let no = asm.label();
    let (yes, nope) = (To::L(ok), To::L(no));

    match cond.op() {
        LinuxSeccompOperator::ScmpCmpEq => {
            asm.load(hi_off);
            asm.jump(JMP_JEQ_K, v_hi, To::Next, nope);
            asm.load(lo_off);
            asm.jump(JMP_JEQ_K, v_lo, yes, nope);
        }
        LinuxSeccompOperator::ScmpCmpNe => {
            asm.load(hi_off);
            asm.jump(JMP_JEQ_K, v_hi, To::Next, yes);
            asm.load(lo_off);
            asm.jump(JMP_JEQ_K, v_lo, nope, yes);
        }
        // For the ordering operators the high word decides unless it is equal.
        LinuxSeccompOperator::ScmpCmpGt | LinuxSeccompOperator::ScmpCmpGe => {
            let lo_cmp = if cond.op() == LinuxSeccompOperator::ScmpCmpGt {
                JMP_JGT_K
            } else {
                JMP_JGE_K
            };
            asm.load(hi_off);
            asm.jump(JMP_JGT_K, v_hi, yes, To::Next);
            asm.jump(JMP_JEQ_K, v_hi, To::Next, nope);
            asm.load(lo_off);
            asm.jump(lo_cmp, v_lo, yes, nope);
        }
        // a < v is !(a >= v) and a <= v is !(a > v): same tests, swapped exits.
        LinuxSeccompOperator::ScmpCmpLt | LinuxSeccompOperator::ScmpCmpLe => {
            let lo_cmp = if cond.op() == LinuxSeccompOperator::ScmpCmpLt {
                JMP_JGE_K
            } else {
                JMP_JGT_K
            };
            asm.load(hi_off);
            asm.jump(JMP_JGT_K, v_hi, nope, To::Next);
            asm.jump(JMP_JEQ_K, v_hi, To::Next, yes);
            asm.load(lo_off);
            asm.jump(lo_cmp, v_lo, nope, yes);
        }
        // `value` is the mask. The datum is masked too, as libseccomp masks
        // it, and a word whose mask is 0 needs no test (`always_holds` keeps
        // both words from being 0).
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let (w_hi, w_lo) = split(cond.value_two().unwrap_or(0) & cond.value());
            if v_hi != 0 {
                asm.load(hi_off);
                asm.alu_and(v_hi);
                let on_eq = if v_lo == 0 { yes } else { To::Next };
                asm.jump(JMP_JEQ_K, w_hi, on_eq, nope);
            }
            if v_lo != 0 {
                asm.load(lo_off);
                asm.alu_and(v_lo);
                asm.jump(JMP_JEQ_K, w_lo, yes, nope);
            }
        }
    }
    asm.bind(no);
    asm.goto(fail);
    asm.bind(ok);
}

fn split(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

/// The `SECCOMP_RET_*` value for `action`.
fn action_ret(
    action: LinuxSeccompAction,
    errno: Option<u32>,
    context: impl FnOnce() -> String,
) -> Result<u32, SeccompError> {
    let data = || {
        let value = errno.unwrap_or(libc::EPERM as u32);
        if value > libc::SECCOMP_RET_DATA {
            return Err(SeccompError::ErrnoOutOfRange {
                context: context(),
                value,
            });
        }
        Ok(value)
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            libc::SECCOMP_RET_KILL_THREAD
        }
        LinuxSeccompAction::ScmpActKillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => libc::SECCOMP_RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => libc::SECCOMP_RET_ERRNO | data()?,
        LinuxSeccompAction::ScmpActTrace => libc::SECCOMP_RET_TRACE | data()?,
        LinuxSeccompAction::ScmpActLog => libc::SECCOMP_RET_LOG,
        LinuxSeccompAction::ScmpActAllow => libc::SECCOMP_RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Unsupported(
                "SCMP_ACT_NOTIFY (no seccomp notify agent in the guest)",
            ));
        }
    })
}

/// A position in the program, resolved when the program is finished.
#[derive(Debug, Clone, Copy)]
struct Label(usize);

/// Where a conditional jump goes: the next instruction, or a label.
#[derive(Debug, Clone, Copy)]
enum To {
    Next,
    L(Label),
}

#[derive(Debug)]
enum Op {
    Stmt { code: u16, k: u32 },
    Cond { code: u16, k: u32, t: To, f: To },
    Goto(Label),
}

/// A forward-only assembler: jumps name labels so offsets need not be
/// computed by hand, and every offset is range-checked when encoding.
#[derive(Debug, Default)]
struct Asm {
    ops: Vec<Op>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.ops.len());
    }

    fn load(&mut self, offset: u32) {
        self.ops.push(Op::Stmt {
            code: LD_W_ABS,
            k: offset,
        });
    }

    fn alu_and(&mut self, k: u32) {
        self.ops.push(Op::Stmt { code: ALU_AND_K, k });
    }

    fn ret(&mut self, k: u32) {
        self.ops.push(Op::Stmt { code: RET_K, k });
    }

    fn jump(&mut self, code: u16, k: u32, t: To, f: To) {
        self.ops.push(Op::Cond { code, k, t, f });
    }

    fn goto(&mut self, l: Label) {
        self.ops.push(Op::Goto(l));
    }

    /// Distance from the instruction after `at` to `to`; seccomp BPF only
    /// jumps forward.
    fn offset(&self, at: usize, to: To) -> Result<usize, SeccompError> {
        match to {
            To::Next => Ok(0),
            To::L(l) => self
                .labels
                .get(l.0)
                .copied()
                .flatten()
                .and_then(|target| target.checked_sub(at + 1))
                .ok_or(SeccompError::BadJump { at }),
        }
    }

    fn finish(self) -> Result<Vec<libc::sock_filter>, SeccompError> {
        if self.ops.len() > MAX_INSNS {
            return Err(SeccompError::TooLong {
                len: self.ops.len(),
                max: MAX_INSNS,
            });
        }
        let short = |at: usize, to: To| -> Result<u8, SeccompError> {
            u8::try_from(self.offset(at, to)?).map_err(|_| SeccompError::BadJump { at })
        };
        self.ops
            .iter()
            .enumerate()
            .map(|(at, op)| {
                Ok(match *op {
                    Op::Stmt { code, k } => insn(code, 0, 0, k),
                    Op::Cond { code, k, t, f } => insn(code, short(at, t)?, short(at, f)?, k),
                    Op::Goto(l) => {
                        let off = self.offset(at, To::L(l))?;
                        // Always fits: the program is at most MAX_INSNS long.
                        insn(JMP_JA, 0, 0, off as u32)
                    }
                })
            })
            .collect()
    }
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::syscall::{Errno, LinuxSyscall as RealSyscalls, Syscall};
    use oci_spec::runtime::{
        LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSyscall, LinuxSyscallBuilder,
    };
    use std::sync::atomic::{AtomicU32, Ordering};

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;

    fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }

    fn nr(name: &str) -> u32 {
        syscall_number(name).unwrap_or_else(|| panic!("{name} not in the x86_64 table"))
    }

    /// What the kernel hands the filter: `struct seccomp_data`, little-endian.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        fn call(nr: u32, args: &[u64]) -> Self {
            let mut a = [0u64; 6];
            a[..args.len()].copy_from_slice(args);
            Data {
                nr,
                arch: AUDIT_ARCH_X86_64,
                args: a,
            }
        }

        fn bytes(&self) -> [u8; 64] {
            let mut b = [0u8; 64];
            b[0..4].copy_from_slice(&self.nr.to_le_bytes());
            b[4..8].copy_from_slice(&self.arch.to_le_bytes());
            b[8..16].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
            for (i, a) in self.args.iter().enumerate() {
                b[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
            }
            b
        }
    }

    /// A classic-BPF interpreter for exactly the instructions the compiler
    /// emits; anything else, or anything the kernel verifier would refuse
    /// (misaligned or out-of-range loads, jumps past the end), panics.
    fn run(prog: &[libc::sock_filter], data: &Data) -> u32 {
        assert!(!prog.is_empty() && prog.len() <= MAX_INSNS);
        let mem = data.bytes();
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog
                .get(pc)
                .unwrap_or_else(|| panic!("fell off the end at {pc}"));
            let k = i.k;
            pc += 1;
            let jump = |cond: bool| pc + usize::from(if cond { i.jt } else { i.jf });
            match i.code {
                LD_W_ABS => {
                    let off = k as usize;
                    assert!(
                        off.is_multiple_of(4) && off + 4 <= mem.len(),
                        "bad load {off}"
                    );
                    acc = u32::from_le_bytes([mem[off], mem[off + 1], mem[off + 2], mem[off + 3]]);
                }
                ALU_AND_K => acc &= k,
                JMP_JA => pc += k as usize,
                JMP_JEQ_K => pc = jump(acc == k),
                JMP_JGT_K => pc = jump(acc > k),
                JMP_JGE_K => pc = jump(acc >= k),
                RET_K => return k,
                other => panic!("unexpected opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    /// Structural checks the kernel's verifier also makes: every jump lands
    /// inside the program and the last instruction returns.
    fn assert_well_formed(prog: &[libc::sock_filter]) {
        assert!(prog.len() <= MAX_INSNS);
        assert_eq!(prog.last().map(|i| i.code), Some(RET_K));
        for (pc, i) in prog.iter().enumerate() {
            let targets: Vec<usize> = match i.code {
                JMP_JA => vec![pc + 1 + i.k as usize],
                JMP_JEQ_K | JMP_JGT_K | JMP_JGE_K => {
                    vec![pc + 1 + usize::from(i.jt), pc + 1 + usize::from(i.jf)]
                }
                _ => vec![],
            };
            for t in targets {
                assert!(t < prog.len(), "jump at {pc} to {t} out of range");
            }
        }
    }

    fn rule(names: &[&str], action: LinuxSeccompAction) -> LinuxSyscall {
        LinuxSyscallBuilder::default()
            .names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .action(action)
            .build()
            .expect("rule")
    }

    fn rule_with_args(
        names: &[&str],
        action: LinuxSeccompAction,
        args: Vec<LinuxSeccompArg>,
    ) -> LinuxSyscall {
        let mut r = rule(names, action);
        r.set_args(Some(args));
        r
    }

    fn arg(index: usize, op: LinuxSeccompOperator, value: u64, value_two: u64) -> LinuxSeccompArg {
        LinuxSeccompArgBuilder::default()
            .index(index)
            .op(op)
            .value(value)
            .value_two(value_two)
            .build()
            .expect("arg")
    }

    fn profile(default: LinuxSeccompAction, rules: Vec<LinuxSyscall>) -> LinuxSeccomp {
        LinuxSeccompBuilder::default()
            .default_action(default)
            .syscalls(rules)
            .build()
            .expect("profile")
    }

    fn compile_ok(p: &LinuxSeccomp) -> Vec<libc::sock_filter> {
        let prog = compile(p).expect("compile");
        assert_well_formed(&prog);
        prog
    }

    fn raw(prog: &[libc::sock_filter]) -> Vec<(u16, u8, u8, u32)> {
        prog.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
    }

    use LinuxSeccompAction::*;
    use LinuxSeccompOperator::*;

    #[test]
    fn table_matches_the_x86_64_abi() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("mkdir"), Some(83));
        assert_eq!(syscall_number("clone3"), Some(435));
        assert_eq!(syscall_number("arm_fadvise64_64"), None);
        assert_eq!(syscall_number(""), None);
    }

    #[test]
    fn default_action_applies_to_unlisted_syscalls() {
        let p = profile(ScmpActErrno, vec![rule(&["read", "write"], ScmpActAllow)]);
        let prog = compile_ok(&p);
        assert_eq!(run(&prog, &Data::call(nr("read"), &[])), ALLOW);
        assert_eq!(run(&prog, &Data::call(nr("write"), &[])), ALLOW);
        assert_eq!(
            run(&prog, &Data::call(nr("openat"), &[])),
            errno(libc::EPERM)
        );

        let empty = compile_ok(&profile(ScmpActKillProcess, vec![]));
        assert_eq!(run(&empty, &Data::call(0, &[])), KILL_PROCESS);
    }

    #[test]
    fn denied_mkdir_with_everything_else_allowed() {
        let p = profile(ScmpActAllow, vec![rule(&["mkdir"], ScmpActErrno)]);
        let prog = compile_ok(&p);
        assert_eq!(
            run(&prog, &Data::call(nr("mkdir"), &[])),
            errno(libc::EPERM)
        );
        for other in ["read", "mkdirat", "getpid", "clone3"] {
            assert_eq!(run(&prog, &Data::call(nr(other), &[])), ALLOW, "{other}");
        }
    }

    #[test]
    fn each_rule_keeps_its_own_action() {
        let mut clone3 = rule(&["clone3"], ScmpActErrno);
        clone3.set_errno_ret(Some(libc::ENOSYS as u32));
        let p = profile(
            ScmpActErrno,
            vec![
                rule(&["read", "write", "clone", "exit_group"], ScmpActAllow),
                clone3,
                rule(&["ptrace"], ScmpActKillThread),
                rule(&["reboot"], ScmpActKill),
                rule(&["kexec_load"], ScmpActKillProcess),
                rule(&["acct"], ScmpActTrap),
                rule(&["swapon"], ScmpActLog),
                rule(&["swapoff"], ScmpActTrace),
            ],
        );
        let prog = compile_ok(&p);
        let expect = [
            ("read", ALLOW),
            ("clone", ALLOW),
            ("exit_group", ALLOW),
            ("clone3", errno(libc::ENOSYS)),
            ("ptrace", libc::SECCOMP_RET_KILL_THREAD),
            ("reboot", libc::SECCOMP_RET_KILL_THREAD),
            ("kexec_load", KILL_PROCESS),
            ("acct", libc::SECCOMP_RET_TRAP),
            ("swapon", libc::SECCOMP_RET_LOG),
            ("swapoff", libc::SECCOMP_RET_TRACE | libc::EPERM as u32),
            ("openat", errno(libc::EPERM)),
        ];
        for (name, want) in expect {
            assert_eq!(run(&prog, &Data::call(nr(name), &[])), want, "{name}");
        }
    }

    #[test]
    fn errno_ret_and_default_errno_ret_are_honoured() {
        let mut r = rule(&["mkdir"], ScmpActErrno);
        r.set_errno_ret(Some(libc::EACCES as u32));
        let mut trace = rule(&["rmdir"], ScmpActTrace);
        trace.set_errno_ret(Some(42));
        let mut p = profile(ScmpActErrno, vec![r, trace]);
        p.set_default_errno_ret(Some(libc::ENOSYS as u32));
        let prog = compile_ok(&p);
        assert_eq!(
            run(&prog, &Data::call(nr("mkdir"), &[])),
            errno(libc::EACCES)
        );
        assert_eq!(
            run(&prog, &Data::call(nr("rmdir"), &[])),
            libc::SECCOMP_RET_TRACE | 42
        );
        assert_eq!(
            run(&prog, &Data::call(nr("read"), &[])),
            errno(libc::ENOSYS)
        );
    }

    #[test]
    fn errno_wider_than_ret_data_is_rejected() {
        let mut r = rule(&["mkdir"], ScmpActErrno);
        r.set_errno_ret(Some(0x1_0000));
        let err = compile(&profile(ScmpActAllow, vec![r])).expect_err("must fail");
        assert!(matches!(
            err,
            SeccompError::ErrnoOutOfRange {
                value: 0x1_0000,
                ..
            }
        ));

        let mut p = profile(ScmpActErrno, vec![]);
        p.set_default_errno_ret(Some(u32::MAX));
        assert!(matches!(
            compile(&p),
            Err(SeccompError::ErrnoOutOfRange { .. })
        ));
    }

    #[test]
    fn foreign_arch_and_x32_are_killed() {
        let p = profile(ScmpActAllow, vec![rule(&["mkdir"], ScmpActErrno)]);
        let prog = compile_ok(&p);
        for arch in [
            0x4000_0003, /* i386 */
            0xc000_00b7, /* aarch64 */
            0,
        ] {
            let mut d = Data::call(nr("read"), &[]);
            d.arch = arch;
            assert_eq!(run(&prog, &d), KILL_PROCESS, "arch {arch:#x}");
        }
        let x32_mkdir = Data::call(X32_SYSCALL_BIT | nr("mkdir"), &[]);
        assert_eq!(run(&prog, &x32_mkdir), KILL_PROCESS);
        // A tracer's "skip this syscall" value goes to the default action.
        assert_eq!(run(&prog, &Data::call(u32::MAX, &[])), ALLOW);
    }

    type Holds = fn(u64, u64) -> bool;

    /// Every operator against every pair of values that differ only in the
    /// high word, only in the low word, or at the signed/unsigned boundary.
    #[test]
    fn comparison_operators_use_all_64_bits() {
        let interesting = [
            0,
            1,
            0xffff_ffff,
            0x1_0000_0000,
            0x1_0000_0001,
            0x1_ffff_ffff,
            0x2_0000_0000,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
            u64::MAX - 1,
            u64::MAX,
        ];
        let ops: [(LinuxSeccompOperator, Holds); 6] = [
            (ScmpCmpEq, |a, v| a == v),
            (ScmpCmpNe, |a, v| a != v),
            (ScmpCmpLt, |a, v| a < v),
            (ScmpCmpLe, |a, v| a <= v),
            (ScmpCmpGt, |a, v| a > v),
            (ScmpCmpGe, |a, v| a >= v),
        ];
        for (op, holds) in ops {
            for &value in &interesting {
                for index in [0, 3, 5] {
                    let p = profile(
                        ScmpActAllow,
                        vec![rule_with_args(
                            &["ioctl"],
                            ScmpActErrno,
                            vec![arg(index, op, value, 0)],
                        )],
                    );
                    let prog = compile_ok(&p);
                    for &a in &interesting {
                        let mut args = [0x5555_5555_5555_5555u64; 6];
                        args[index] = a;
                        let got = run(&prog, &Data::call(nr("ioctl"), &args));
                        let want = if holds(a, value) {
                            errno(libc::EPERM)
                        } else {
                            ALLOW
                        };
                        assert_eq!(got, want, "{op:?} arg{index}={a:#x} value={value:#x}");
                    }
                    // Other syscalls are unaffected by the argument rule.
                    assert_eq!(run(&prog, &Data::call(nr("read"), &[value; 6])), ALLOW);
                }
            }
        }
    }

    #[test]
    fn masked_eq_checks_both_words() {
        // Docker's clone rule shape: deny when any namespace flag is set,
        // with a mask that straddles the 32-bit boundary.
        let mask = 0x1_7e02_0000u64;
        let p = profile(
            ScmpActErrno,
            vec![rule_with_args(
                &["clone"],
                ScmpActAllow,
                vec![arg(0, ScmpCmpMaskedEq, mask, 0)],
            )],
        );
        let prog = compile_ok(&p);
        let call = |a: u64| run(&prog, &Data::call(nr("clone"), &[a]));
        assert_eq!(call(0x11), ALLOW);
        assert_eq!(call(0x8000_0011), ALLOW);
        assert_eq!(call(0x2_0000_0000), ALLOW);
        assert_eq!(call(0x1_0000_0000), errno(libc::EPERM));
        assert_eq!(call(libc::CLONE_NEWNS as u64), errno(libc::EPERM));

        // Non-zero valueTwo in both words.
        let p = profile(
            ScmpActAllow,
            vec![rule_with_args(
                &["fcntl"],
                ScmpActErrno,
                vec![arg(1, ScmpCmpMaskedEq, 0xff_0000_00ff, 0x12_0000_0034)],
            )],
        );
        let prog = compile_ok(&p);
        let fcntl = |a: u64| run(&prog, &Data::call(nr("fcntl"), &[0, a]));
        assert_eq!(fcntl(0xab12_cdef_ff34), errno(libc::EPERM));
        assert_eq!(fcntl(0x12_0000_0034), errno(libc::EPERM));
        assert_eq!(fcntl(0x13_0000_0034), ALLOW);
        assert_eq!(fcntl(0x12_0000_0035), ALLOW);
    }

    /// libseccomp masks the datum as well (`db.c: _db_node_mask_fixup`), so
    /// `valueTwo` bits outside the mask are ignored rather than making the
    /// condition unsatisfiable.
    #[test]
    fn masked_eq_masks_the_datum_too() {
        let p = profile(
            ScmpActAllow,
            vec![
                rule_with_args(
                    &["dup"],
                    ScmpActErrno,
                    vec![arg(0, ScmpCmpMaskedEq, 0xf0, 0x0f)],
                ),
                rule_with_args(
                    &["fcntl"],
                    ScmpActErrno,
                    vec![arg(1, ScmpCmpMaskedEq, 0xff_0000_0000, 0x1234_0000_5678)],
                ),
            ],
        );
        let prog = compile_ok(&p);
        let dup = |a: u64| run(&prog, &Data::call(nr("dup"), &[a]));
        // (a & 0xf0) == (0x0f & 0xf0) == 0
        assert_eq!(dup(0), errno(libc::EPERM));
        assert_eq!(dup(0x0f), errno(libc::EPERM));
        assert_eq!(dup(0xff0f), errno(libc::EPERM));
        assert_eq!(dup(0x10), ALLOW);
        assert_eq!(dup(0xff), ALLOW);
        let fcntl = |a: u64| run(&prog, &Data::call(nr("fcntl"), &[0, a]));
        // (a & 0xff_0000_0000) == 0x34_0000_0000; the low word is not tested.
        assert_eq!(fcntl(0x34_0000_0000), errno(libc::EPERM));
        assert_eq!(fcntl(0x1234_ffff_ffff), errno(libc::EPERM));
        assert_eq!(fcntl(0x1234_0000_5678), errno(libc::EPERM));
        assert_eq!(fcntl(0x35_0000_5678), ALLOW);
        assert_eq!(fcntl(0x5678), ALLOW);
    }

    #[test]
    fn conditions_on_distinct_args_are_anded_and_repeated_index_ors() {
        let p = profile(
            ScmpActErrno,
            vec![
                rule_with_args(
                    &["socket"],
                    ScmpActAllow,
                    vec![arg(0, ScmpCmpEq, 1, 0), arg(1, ScmpCmpEq, 2, 0)],
                ),
                rule_with_args(
                    &["personality"],
                    ScmpActAllow,
                    vec![arg(0, ScmpCmpEq, 0, 0), arg(0, ScmpCmpEq, 8, 0)],
                ),
            ],
        );
        let prog = compile_ok(&p);
        let socket = |a: &[u64]| run(&prog, &Data::call(nr("socket"), a));
        assert_eq!(socket(&[1, 2]), ALLOW);
        assert_eq!(socket(&[1, 3]), errno(libc::EPERM));
        assert_eq!(socket(&[2, 2]), errno(libc::EPERM));
        let pers = |a: u64| run(&prog, &Data::call(nr("personality"), &[a]));
        assert_eq!(pers(0), ALLOW);
        assert_eq!(pers(8), ALLOW);
        assert_eq!(pers(9), errno(libc::EPERM));
    }

    #[test]
    fn first_unconditional_rule_wins_and_later_ones_are_dropped() {
        let p = profile(
            ScmpActAllow,
            vec![
                rule(&["kill", "tkill"], ScmpActTrap),
                rule(&["kill"], ScmpActKillProcess),
                rule(&["tgkill", "tkill"], ScmpActErrno),
            ],
        );
        let prog = compile_ok(&p);
        let call = |name: &str| run(&prog, &Data::call(nr(name), &[1, 9]));
        assert_eq!(call("kill"), libc::SECCOMP_RET_TRAP);
        assert_eq!(call("tkill"), libc::SECCOMP_RET_TRAP);
        assert_eq!(call("tgkill"), errno(libc::EPERM));
        // Names already decided are emitted as nothing.
        let without = profile(
            ScmpActAllow,
            vec![
                rule(&["kill", "tkill"], ScmpActTrap),
                rule(&["tgkill"], ScmpActErrno),
            ],
        );
        assert_eq!(raw(&prog), raw(&compile_ok(&without)));
    }

    /// Among conditional rules for one syscall profile order decides (see the
    /// module docs for how that relates to libseccomp).
    #[test]
    fn first_matching_conditional_rule_wins() {
        let p = profile(
            ScmpActAllow,
            vec![
                rule_with_args(
                    &["kill"],
                    ScmpActErrno,
                    vec![arg(1, ScmpCmpEq, libc::SIGKILL as u64, 0)],
                ),
                rule_with_args(&["kill"], ScmpActTrap, vec![arg(0, ScmpCmpEq, 1, 0)]),
            ],
        );
        let prog = compile_ok(&p);
        let kill = |pid: u64, sig: i32| run(&prog, &Data::call(nr("kill"), &[pid, sig as u64]));
        assert_eq!(kill(1, libc::SIGKILL), errno(libc::EPERM));
        assert_eq!(kill(1, libc::SIGTERM), libc::SECCOMP_RET_TRAP);
        assert_eq!(kill(2, libc::SIGTERM), ALLOW);
    }

    /// runc skips a rule whose action is the default one (libseccomp would
    /// refuse it), so it can neither shadow nor be shadowed by other rules.
    #[test]
    fn rules_with_the_default_action_are_dropped() {
        // runc refuses socket(AF_VSOCK) here: only the conditional rule is left.
        let p = profile(
            ScmpActAllow,
            vec![
                rule(&["socket"], ScmpActAllow),
                rule_with_args(
                    &["socket"],
                    ScmpActErrno,
                    vec![arg(0, ScmpCmpEq, libc::AF_VSOCK as u64, 0)],
                ),
            ],
        );
        let prog = compile_ok(&p);
        let socket = |domain: i32| run(&prog, &Data::call(nr("socket"), &[domain as u64, 1, 0]));
        assert_eq!(socket(libc::AF_VSOCK), errno(libc::EPERM));
        assert_eq!(socket(libc::AF_INET), ALLOW);
        let without = profile(
            ScmpActAllow,
            p.syscalls().clone().unwrap_or_default()[1..].to_vec(),
        );
        assert_eq!(raw(&prog), raw(&compile_ok(&without)));

        // A dropped conditional rule does not hide a later one either.
        let p = profile(
            ScmpActErrno,
            vec![
                rule_with_args(
                    &["socket"],
                    ScmpActErrno,
                    vec![arg(0, ScmpCmpEq, libc::AF_VSOCK as u64, 0)],
                ),
                rule_with_args(
                    &["socket"],
                    ScmpActAllow,
                    vec![arg(1, ScmpCmpEq, libc::SOCK_STREAM as u64, 0)],
                ),
            ],
        );
        let prog = compile_ok(&p);
        let socket = |a: &[u64]| run(&prog, &Data::call(nr("socket"), a));
        assert_eq!(
            socket(&[libc::AF_VSOCK as u64, libc::SOCK_STREAM as u64]),
            ALLOW
        );
        assert_eq!(
            socket(&[libc::AF_VSOCK as u64, libc::SOCK_DGRAM as u64]),
            errno(libc::EPERM)
        );

        // The errno is part of the action; KILL and KILL_THREAD are one action.
        let mut eacces = rule(&["mkdir"], ScmpActErrno);
        eacces.set_errno_ret(Some(libc::EACCES as u32));
        let prog = compile_ok(&profile(ScmpActErrno, vec![eacces]));
        assert_eq!(
            run(&prog, &Data::call(nr("mkdir"), &[])),
            errno(libc::EACCES)
        );
        let p = profile(ScmpActKill, vec![rule(&["ptrace"], ScmpActKillThread)]);
        assert_eq!(
            raw(&compile_ok(&p)),
            raw(&compile_ok(&profile(ScmpActKill, vec![])))
        );
    }

    /// libseccomp keeps one decision per syscall: an unconditional rule
    /// replaces the syscall's argument tree, and conditional rules added
    /// after it are discarded (`db.c: db_rule_add`).
    #[test]
    fn unconditional_rule_wins_over_conditional_rules_in_any_order() {
        let mut vsock = rule_with_args(
            &["socket", "connect"],
            ScmpActErrno,
            vec![arg(0, ScmpCmpEq, libc::AF_VSOCK as u64, 0)],
        );
        vsock.set_errno_ret(Some(libc::EACCES as u32));
        let allow = rule(&["socket", "bind"], ScmpActAllow);
        for rules in [
            vec![vsock.clone(), allow.clone()],
            vec![allow.clone(), vsock.clone()],
        ] {
            let prog = compile_ok(&profile(ScmpActErrno, rules));
            let call = |name: &str, a0: i32| run(&prog, &Data::call(nr(name), &[a0 as u64]));
            assert_eq!(call("socket", libc::AF_VSOCK), ALLOW);
            assert_eq!(call("socket", libc::AF_INET), ALLOW);
            assert_eq!(call("bind", 3), ALLOW);
            // The conditional rule still decides for its other syscall.
            assert_eq!(call("connect", libc::AF_VSOCK), errno(libc::EACCES));
            assert_eq!(call("connect", 3), errno(libc::EPERM));
        }

        // The same with a denying unconditional rule under allow-by-default.
        let cond = rule_with_args(&["ptrace"], ScmpActErrno, vec![arg(0, ScmpCmpGe, 0, 0)]);
        let kill = rule(&["ptrace"], ScmpActKillProcess);
        for rules in [vec![cond.clone(), kill.clone()], vec![kill, cond]] {
            let prog = compile_ok(&profile(ScmpActAllow, rules));
            assert_eq!(run(&prog, &Data::call(nr("ptrace"), &[16])), KILL_PROCESS);
        }
    }

    /// libseccomp emits no comparison for a zero mask, so a rule made only of
    /// such conditions is unconditional, with an unconditional rule's
    /// precedence.
    #[test]
    fn masked_eq_with_zero_mask_makes_a_rule_unconditional() {
        let mut vsock = rule_with_args(
            &["socket"],
            ScmpActErrno,
            vec![arg(0, ScmpCmpEq, libc::AF_VSOCK as u64, 0)],
        );
        vsock.set_errno_ret(Some(libc::EACCES as u32));
        let p = profile(
            ScmpActErrno,
            vec![
                vsock,
                rule_with_args(
                    &["socket"],
                    ScmpActAllow,
                    vec![arg(2, ScmpCmpMaskedEq, 0, 5)],
                ),
                // With a repeated index each condition is a rule of its own.
                rule_with_args(
                    &["personality"],
                    ScmpActAllow,
                    vec![arg(0, ScmpCmpEq, 8, 0), arg(0, ScmpCmpMaskedEq, 0, 1)],
                ),
            ],
        );
        let prog = compile_ok(&p);
        let call = |name: &str, a: &[u64]| run(&prog, &Data::call(nr(name), a));
        assert_eq!(call("socket", &[libc::AF_VSOCK as u64, 1, 0]), ALLOW);
        assert_eq!(call("personality", &[1]), ALLOW);
        let unconditional = profile(
            ScmpActErrno,
            vec![
                rule(&["socket"], ScmpActAllow),
                rule(&["personality"], ScmpActAllow),
            ],
        );
        assert_eq!(raw(&prog), raw(&compile_ok(&unconditional)));
    }

    /// What Docker's default profile lists.
    fn docker_arches() -> Vec<Arch> {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    }

    /// runc's `patchbpf` stub: numbers above the highest one the profile
    /// names get ENOSYS, so that libc falls back on older syscalls.
    #[test]
    fn syscalls_above_the_profile_get_enosys() {
        let enosys = errno(libc::ENOSYS);
        let mut p = profile(
            ScmpActErrno,
            vec![
                rule(&["read", "write", "openat"], ScmpActAllow),
                // Dropped as the default action, but its number counts, as in runc.
                rule(&["clone3"], ScmpActErrno),
                rule(&["no_such_syscall"], ScmpActAllow),
            ],
        );
        p.set_architectures(Some(docker_arches()));
        let prog = compile_ok(&p);
        let call = |n: u32| run(&prog, &Data::call(n, &[]));
        assert_eq!(call(nr("openat")), ALLOW);
        assert_eq!(call(nr("mkdir")), errno(libc::EPERM));
        assert_eq!(call(nr("clone3")), errno(libc::EPERM));
        assert_eq!(call(nr("clone3") + 1), enosys);
        assert_eq!(call(4000), enosys);
        assert_eq!(call(X32_SYSCALL_BIT - 1), enosys);
        // Neither a tracer's -1 nor x32 is a new syscall.
        assert_eq!(call(u32::MAX), errno(libc::EPERM));
        assert_eq!(call(X32_SYSCALL_BIT | 4000), KILL_PROCESS);

        // Killing and trapping defaults get the stub too.
        for (default, ret) in [
            (ScmpActKillProcess, KILL_PROCESS),
            (ScmpActKill, libc::SECCOMP_RET_KILL_THREAD),
            (ScmpActTrap, libc::SECCOMP_RET_TRAP),
        ] {
            p.set_default_action(default);
            let prog = compile_ok(&p);
            assert_eq!(run(&prog, &Data::call(4000, &[])), enosys, "{default:?}");
            assert_eq!(
                run(&prog, &Data::call(nr("mkdir"), &[])),
                ret,
                "{default:?}"
            );
        }

        // SCMP_ARCH_NATIVE is x86_64 here.
        let mut p = profile(ScmpActErrno, vec![rule(&["openat"], ScmpActAllow)]);
        p.set_architectures(Some(vec![Arch::ScmpArchNative]));
        assert_eq!(run(&compile_ok(&p), &Data::call(4000, &[])), enosys);
    }

    /// Where runc adds no stub, new syscalls take the default action.
    #[test]
    fn no_enosys_stub_where_runc_adds_none() {
        let with = |default: LinuxSeccompAction, arches: Option<Vec<Arch>>| {
            let mut p = profile(default, vec![rule(&["openat"], ScmpActKillProcess)]);
            p.set_architectures(arches);
            p
        };
        // Permissive defaults: a tracer or an allow-list copes with new syscalls.
        for (default, ret) in [
            (ScmpActAllow, ALLOW),
            (ScmpActLog, libc::SECCOMP_RET_LOG),
            (ScmpActTrace, libc::SECCOMP_RET_TRACE | libc::EPERM as u32),
        ] {
            let prog = compile_ok(&with(default, Some(docker_arches())));
            assert_eq!(run(&prog, &Data::call(4000, &[])), ret, "{default:?}");
        }
        // x86_64 not among the architectures.
        for arches in [None, Some(vec![]), Some(vec![Arch::ScmpArchX86])] {
            let prog = compile_ok(&with(ScmpActErrno, arches));
            assert_eq!(run(&prog, &Data::call(4000, &[])), errno(libc::EPERM));
        }
        // A default that already says ENOSYS needs no stub.
        let mut p = with(ScmpActErrno, Some(docker_arches()));
        p.set_default_errno_ret(Some(libc::ENOSYS as u32));
        let mut plain = p.clone();
        plain.set_architectures(None);
        assert_eq!(raw(&compile_ok(&p)), raw(&compile_ok(&plain)));
        // runc takes a highest number of 0 (only `read`) for "no syscalls".
        let mut p = profile(ScmpActErrno, vec![rule(&["read"], ScmpActAllow)]);
        p.set_architectures(Some(docker_arches()));
        let prog = compile_ok(&p);
        assert_eq!(run(&prog, &Data::call(4000, &[])), errno(libc::EPERM));
    }

    /// More names than fit in one 8-bit jump, both as one rule and as one
    /// rule per name, plus names this architecture does not have.
    #[test]
    fn long_allow_lists_stay_in_jump_range() {
        let denied = ["mkdir", "ptrace", "reboot"];
        let mut names: Vec<String> = table::SYSCALLS
            .iter()
            .map(|(n, _)| n.to_string())
            .filter(|n| !denied.contains(&n.as_str()))
            .collect();
        let mut i = 0;
        while names.len() < 400 {
            names.push(format!("not_on_x86_64_{i}"));
            i += 1;
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();

        let one_rule = profile(ScmpActErrno, vec![rule(&refs, ScmpActAllow)]);
        let many_rules = profile(
            ScmpActErrno,
            refs.iter().map(|n| rule(&[n], ScmpActAllow)).collect(),
        );
        // One conditional rule over all names exercises grouping with args.
        let conditional = profile(
            ScmpActErrno,
            vec![rule_with_args(
                &refs,
                ScmpActAllow,
                vec![arg(2, ScmpCmpNe, 7, 0)],
            )],
        );
        for p in [&one_rule, &many_rules, &conditional] {
            let prog = compile_ok(p);
            for (name, number) in table::SYSCALLS {
                let want = if denied.contains(name) {
                    errno(libc::EPERM)
                } else {
                    ALLOW
                };
                assert_eq!(run(&prog, &Data::call(*number, &[])), want, "{name}");
            }
            // Numbers past the table are unlisted too.
            assert_eq!(run(&prog, &Data::call(4000, &[])), errno(libc::EPERM));
        }
        let prog = compile_ok(&conditional);
        assert_eq!(
            run(&prog, &Data::call(nr("read"), &[0, 0, 7])),
            errno(libc::EPERM)
        );
    }

    #[test]
    fn unknown_names_are_skipped() {
        let with = profile(
            ScmpActAllow,
            vec![
                rule(&["arm_fadvise64_64", "no_such_syscall"], ScmpActErrno),
                rule_with_args(
                    &["s390_pci_mmio_read"],
                    ScmpActErrno,
                    vec![arg(0, ScmpCmpEq, 1, 0)],
                ),
                rule(&["mkdir", "arm_sync_file_range"], ScmpActErrno),
            ],
        );
        let without = profile(ScmpActAllow, vec![rule(&["mkdir"], ScmpActErrno)]);
        let prog = compile_ok(&with);
        assert_eq!(raw(&prog), raw(&compile_ok(&without)));
        assert_eq!(
            run(&prog, &Data::call(nr("mkdir"), &[])),
            errno(libc::EPERM)
        );
    }

    #[test]
    fn notify_is_rejected() {
        let p = profile(ScmpActAllow, vec![rule(&["mkdir"], ScmpActNotify)]);
        assert!(matches!(compile(&p), Err(SeccompError::Unsupported(_))));
        // Even when no name in the rule exists on x86_64.
        let p = profile(
            ScmpActAllow,
            vec![rule(&["arm_fadvise64_64"], ScmpActNotify)],
        );
        assert!(matches!(compile(&p), Err(SeccompError::Unsupported(_))));
        let p = profile(ScmpActNotify, vec![]);
        assert!(matches!(compile(&p), Err(SeccompError::Unsupported(_))));
    }

    #[test]
    fn argument_index_above_five_is_rejected() {
        let p = profile(
            ScmpActAllow,
            vec![rule_with_args(
                &["read"],
                ScmpActErrno,
                vec![arg(6, ScmpCmpEq, 0, 0)],
            )],
        );
        assert_eq!(
            compile(&p).err(),
            Some(SeccompError::ArgIndex { rule: 0, index: 6 })
        );
    }

    #[test]
    fn programs_over_the_kernel_limit_are_rejected() {
        // Conditional rules are never deduplicated, so each adds a block.
        let rules: Vec<LinuxSyscall> = (0..600)
            .map(|i| rule_with_args(&["read"], ScmpActErrno, vec![arg(0, ScmpCmpGe, i, 0)]))
            .collect();
        let err = compile(&profile(ScmpActAllow, rules)).expect_err("must fail");
        assert!(matches!(err, SeccompError::TooLong { max: 4096, len } if len > 4096));
    }

    #[test]
    fn filter_flags_are_translated() {
        let mut p = profile(ScmpActAllow, vec![]);
        assert_eq!(filter_flags(&p), Ok(0));
        p.set_flags(Some(vec![
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow,
        ]));
        assert_eq!(filter_flags(&p), Ok(0b111));
        p.set_flags(Some(vec![
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv,
        ]));
        assert!(matches!(
            filter_flags(&p),
            Err(SeccompError::Unsupported(_))
        ));
    }

    fn fprog(code: &mut [libc::sock_filter]) -> libc::sock_fprog {
        libc::sock_fprog {
            len: u16::try_from(code.len()).expect("program length fits in u16"),
            filter: code.as_mut_ptr(),
        }
    }

    /// Runs `body` in a forked child after installing `code` as its seccomp
    /// filter, and returns the child's exit status (2 and 3 mean installing
    /// failed). `body` must stick to async-signal-safe calls.
    fn in_filtered_child(code: &mut [libc::sock_filter], body: &dyn Fn() -> i32) -> i32 {
        let prog = fprog(code);
        in_child(&|| {
            // SAFETY: `prog` points into `code`, which outlives the child.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return 2;
                }
                if libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
                {
                    return 3;
                }
            }
            body()
        })
    }

    /// Runs `body` in a forked child and returns the child's exit status.
    /// `body` must stick to calls that are safe after fork in a multi-threaded
    /// process.
    fn in_child(body: &dyn Fn() -> i32) -> i32 {
        // SAFETY: the child only makes async-signal-safe calls (or, in
        // `tsync_failure_is_an_error`, glibc's fork-safe pthread_create) on
        // memory prepared before the fork, so forking a multi-threaded test
        // process is sound.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let status = body();
            // SAFETY: _exit never returns into the harness.
            unsafe { libc::_exit(status) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our own child and `status` is a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(
            libc::WIFEXITED(status),
            "child did not exit normally: status {status:#x}"
        );
        libc::WEXITSTATUS(status)
    }

    fn last_errno() -> i32 {
        // SAFETY: __errno_location always returns this thread's errno slot.
        unsafe { *libc::__errno_location() }
    }

    fn temp_path(tag: &str) -> (std::path::PathBuf, std::ffi::CString) {
        let path = std::env::temp_dir().join(format!("seccomp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .expect("temp path has no NUL");
        (path, c)
    }

    /// The real kernel accepts the program and enforces it, including an
    /// argument comparison.
    #[test]
    fn kernel_enforces_compiled_filter_in_child() {
        let p = profile(
            ScmpActAllow,
            vec![
                rule(&["mkdir", "mkdirat"], ScmpActErrno),
                rule_with_args(
                    &["getpgid"],
                    ScmpActErrno,
                    vec![arg(0, ScmpCmpEq, 0x7777, 0)],
                ),
            ],
        );
        let (target, path) = temp_path("small");
        let status = in_filtered_child(&mut compile_ok(&p), &|| {
            // SAFETY: `path` is a valid NUL-terminated string; both calls
            // only read their arguments.
            unsafe {
                if libc::mkdir(path.as_ptr(), 0o700) != -1 || last_errno() != libc::EPERM {
                    return 1;
                }
                if libc::getpgid(0x7777) != -1 || last_errno() != libc::EPERM {
                    return 4;
                }
                if libc::getpgid(0) < 0 {
                    return 5;
                }
            }
            0
        });
        assert_eq!(status, 0, "child reported failure");
        assert!(!target.exists(), "mkdir went through the filter");
    }

    /// A long allow-list program with grouped checks, JA trampolines and
    /// argument tests passes the kernel verifier and behaves as interpreted.
    #[test]
    fn kernel_accepts_long_conditional_program() {
        let names: Vec<&str> = table::SYSCALLS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| !["mkdir", "mkdirat", "getppid"].contains(n))
            .collect();
        let p = profile(
            ScmpActErrno,
            vec![
                rule_with_args(
                    &["getppid"],
                    ScmpActAllow,
                    vec![arg(3, ScmpCmpLe, 1 << 40, 0)],
                ),
                rule_with_args(&names, ScmpActAllow, vec![arg(5, ScmpCmpNe, 1 << 33, 0)]),
            ],
        );
        let mut code = compile_ok(&p);
        assert!(names.len() > MAX_GROUP, "names should span several groups");
        let (target, path) = temp_path("long");
        let status = in_filtered_child(&mut code, &|| {
            // SAFETY: `path` is a valid NUL-terminated string and getppid
            // takes no pointers.
            unsafe {
                if libc::mkdir(path.as_ptr(), 0o700) != -1 || last_errno() != libc::EPERM {
                    return 1;
                }
                if libc::syscall(libc::SYS_getppid, 0, 0, 0, 1u64 << 40) <= 0 {
                    return 4;
                }
                if libc::syscall(libc::SYS_getppid, 0, 0, 0, (1u64 << 40) + 1) != -1
                    || last_errno() != libc::EPERM
                {
                    return 5;
                }
            }
            0
        });
        assert_eq!(status, 0, "child reported failure");
        assert!(!target.exists(), "mkdir went through the filter");
    }

    /// Set by [`filtered_thread`] once it has tried to install its filter.
    const THREAD_FILTERED: u32 = 1;
    const THREAD_UNFILTERED: u32 = 2;

    struct ThreadStart {
        prog: libc::sock_fprog,
        state: AtomicU32,
    }

    /// Installs a filter of its own, so that no other thread's filter can be
    /// synchronised onto it, and sleeps until the process exits.
    extern "C" fn filtered_thread(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is a ThreadStart that its creator keeps alive until
        // the process exits.
        let start = unsafe { &*(arg as *const ThreadStart) };
        // SAFETY: `prog` points at a program that lives as long as `start`.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &start.prog as *const libc::sock_fprog,
            )
        };
        let state = if rc == 0 {
            THREAD_FILTERED
        } else {
            THREAD_UNFILTERED
        };
        start.state.store(state, Ordering::SeqCst);
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    }

    /// With TSYNC the kernel reports a thread it cannot synchronise by
    /// returning its id, a positive number, and installs nothing.
    #[test]
    fn tsync_failure_is_an_error() {
        let mut own = compile_ok(&profile(ScmpActAllow, vec![]));
        let shared = compile_ok(&profile(ScmpActAllow, vec![rule(&["mkdir"], ScmpActErrno)]));
        let start = ThreadStart {
            prog: fprog(&mut own),
            state: AtomicU32::new(0),
        };
        let status = in_child(&|| {
            let mut thread: libc::pthread_t = 0;
            // SAFETY: `start` outlives the child's threads (the child never
            // returns from here), and no_new_privs only touches this task;
            // the new thread inherits it.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return 2;
                }
                let arg = &start as *const ThreadStart as *mut libc::c_void;
                if libc::pthread_create(&mut thread, std::ptr::null(), filtered_thread, arg) != 0 {
                    return 3;
                }
            }
            while start.state.load(Ordering::SeqCst) == 0 {
                std::hint::spin_loop();
            }
            if start.state.load(Ordering::SeqCst) != THREAD_FILTERED {
                return 4;
            }
            let tsync = libc::SECCOMP_FILTER_FLAG_TSYNC as u32;
            match RealSyscalls.install_seccomp(&shared, tsync) {
                Err(Errno(libc::ESRCH)) => 0,
                Ok(()) => 1,
                Err(_) => 5,
            }
        });
        assert_eq!(status, 0, "child reported failure");
    }
}
