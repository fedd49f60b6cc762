//! What the host side of cocoon and the guest agent agree on: the boot self-check, the guest
//! status page, and the agent protocol (framing, messages, and the host's client), and how both read an OCI spec.

pub mod boot_check;
pub mod client;
pub mod frame;
pub mod message;
pub mod spec;

/// The guest status page lives with the VMM, which must not depend on this crate.
pub use cocoon_vmm_abi::guest_status;

/// Copies `from` to `to` until EOF or an error, for the stdio relays on both sides.
///
/// Not `std::io::copy`: on Linux it splices when one side is a pipe, and a splice between a
/// socket and a pipe holds the pipe's lock while it sleeps on the socket. A relay feeding a
/// container's stdin then keeps the container from even closing that pipe as it exits.
pub fn relay_until_eof(from: &mut impl std::io::Read, to: &mut impl std::io::Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO is how a pty master says the last slave fd closed.
            Err(_) => break,
        }
    }
}
