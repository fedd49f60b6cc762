//! The agent protocol's frame decoder from both ends. The host side matters most: a hostile
//! guest agent answers the host's client with whatever the input holds (torn or oversized
//! frames, wrong ids, replies of the wrong kind, out-of-range numbers), and every client call
//! must fail cleanly or return only what a real guest could report. The agent side decodes
//! arbitrary request frames.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use cocoon_agent_protocol::client::AgentClient;
use cocoon_agent_protocol::frame::read_frame;
use cocoon_agent_protocol::message::{ExecProcess, RequestEnvelope};
use libfuzzer_sys::fuzz_target;

const PID_MAX: i32 = 1 << 22;

/// What the hostile agent sends: the input after the selector byte, either as raw stream
/// bytes or, to get past the id check more often, as the `result` of well-formed envelopes
/// with the ids the client will use (bodies separated by 0xff).
fn agent_bytes(framed: bool, body: &[u8]) -> Vec<u8> {
    if !framed {
        return body.to_vec();
    }
    let mut out = Vec::new();
    for (i, result) in body.split(|&b| b == 0xff).enumerate() {
        let mut json = format!("{{\"id\":{},\"result\":", i + 1).into_bytes();
        json.extend_from_slice(result);
        json.push(b'}');
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(&json);
    }
    out
}

fn call(client: &mut AgentClient, method: u8) -> bool {
    match method % 10 {
        0 => client.hello().is_ok(),
        1 => match client.exec_process(exec()) {
            Ok(pid) => {
                assert!((1..=PID_MAX).contains(&pid), "pid {pid}");
                true
            }
            Err(_) => false,
        },
        2 => match client.start_container("c") {
            Ok(pid) => {
                assert!((1..=PID_MAX).contains(&pid), "pid {pid}");
                true
            }
            Err(_) => false,
        },
        3 => match client.wait("c", None) {
            Ok(status) => {
                let valid = match (status.code, status.signal) {
                    (Some(code), None) => (0..=255).contains(&code),
                    (None, Some(signal)) => (1..=64).contains(&signal),
                    _ => false,
                };
                assert!(valid, "{status:?}");
                true
            }
            Err(_) => false,
        },
        4 => match client.list_processes("c") {
            Ok(pids) => {
                assert!(pids.iter().all(|p| (1..=PID_MAX).contains(p)), "{pids:?}");
                true
            }
            Err(_) => false,
        },
        5 => client.state("c").is_ok(),
        6 => client.stats("c").is_ok(),
        7 => client.counters().is_ok(),
        8 => client.signal("c", None, 15, false).is_ok(),
        _ => client.remove_container("c").is_ok(),
    }
}

/// An exec's request (create_container's reply path is the same `Pid` check).
fn exec() -> ExecProcess {
    ExecProcess {
        container_id: "c".into(),
        exec_id: "e".into(),
        process: Box::default(),
        stdio: Default::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    if selector & 0x80 != 0 {
        // The agent's side: any request frame decodes or fails, never panics.
        let _ = read_frame::<_, RequestEnvelope>(&mut &body[..]);
        return;
    }
    let (ours, mut agent) = UnixStream::pair().unwrap();
    let bytes = agent_bytes(selector & 0x40 != 0, body);
    // Socket buffers hold far more than the inputs libFuzzer makes; a write cut short only
    // gives the client a torn stream, which it must handle too.
    agent.set_nonblocking(true).unwrap();
    let _ = agent.write_all(&bytes);
    agent.shutdown(std::net::Shutdown::Write).unwrap();
    let mut client = AgentClient::over(ours);
    // Up to four calls on one connection, as a monitor makes them; after a failed call the
    // stream is out of step and the host drops it, so stop there.
    for i in 0..4u8 {
        let method = (selector & 0x3f).wrapping_add(i.wrapping_mul(7));
        if !call(&mut client, method) {
            break;
        }
    }
    drop(agent);
});
