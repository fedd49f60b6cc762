//! `cocoon`: the runc-compatible OCI runtime CLI (each container a microVM).
//!
//! Not implemented yet: the VMM (`cocoon-vmm`) and the guest agent come first. Until then this
//! binary refuses every command clearly instead of pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-v") {
        println!("cocoon version {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "cocoon: the OCI runtime commands are not implemented yet; boot a microVM with cocoon-vmm"
    );
    ExitCode::from(1)
}
