//! Timing marks for a container's start and end: debug lines with the milliseconds since the
//! process started (`--debug`; `bench/runtime.py` reads them).

use std::sync::OnceLock;
use std::time::Instant;

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Records when this process started, for [`phase`].
pub fn mark_start() {
    STARTED.get_or_init(Instant::now);
}

/// A debug line marking a phase.
pub fn phase(name: &str) {
    let elapsed = STARTED.get_or_init(Instant::now).elapsed();
    tracing::debug!(
        phase = name,
        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
        "{name}"
    );
}
