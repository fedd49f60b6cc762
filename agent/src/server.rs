//! The agent's control service: framed requests on vsock port [`CONTROL_PORT`], one thread per
//! connection, answered in order. A malformed request gets an error reply; an oversized or
//! torn frame closes the connection (its boundaries can no longer be trusted).

use std::fs::File;
use std::sync::OnceLock;

use cocoon_agent_protocol::frame::{FrameError, read_frame_bytes, write_frame};
use cocoon_agent_protocol::message::{
    AgentError, AgentInfo, CONTROL_PORT, ErrorKind, PROTOCOL_VERSION, Reply, ReplyEnvelope,
    Request, RequestEnvelope,
};

use crate::container::Containers;
use crate::{counters, guest, power, vsock};

fn containers() -> &'static Containers {
    static CONTAINERS: OnceLock<Containers> = OnceLock::new();
    CONTAINERS.get_or_init(Containers::default)
}

/// Serves the control port forever.
pub fn serve() -> ! {
    let listener = match vsock::Listener::bind(CONTROL_PORT) {
        Ok(l) => l,
        Err(e) => {
            crate::console::line(&format!(
                "cocoon-agent: cannot listen on vsock port {CONTROL_PORT}: {e}"
            ));
            power::power_off();
        }
    };
    loop {
        match listener.accept() {
            Ok(conn) => {
                let _ = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || serve_connection(conn));
            }
            Err(e) => crate::console::line(&format!("cocoon-agent: control accept: {e}")),
        }
    }
}

fn serve_connection(mut conn: File) {
    loop {
        let body = match read_frame_bytes(&mut conn) {
            Ok(body) => body,
            Err(FrameError::Closed) => return,
            Err(e) => {
                let reply = ReplyEnvelope {
                    id: 0,
                    result: Err(AgentError::new(ErrorKind::BadRequest, e.to_string())),
                };
                let _ = write_frame(&mut conn, &reply);
                return;
            }
        };
        let (id, result, power_off) = match serde_json::from_slice::<RequestEnvelope>(&body) {
            Err(e) => (
                request_id(&body),
                Err(AgentError::new(ErrorKind::BadRequest, e.to_string())),
                false,
            ),
            Ok(envelope) if envelope.version != PROTOCOL_VERSION => (
                envelope.id,
                Err(AgentError::new(
                    ErrorKind::Version,
                    format!(
                        "protocol version {} is not {PROTOCOL_VERSION}",
                        envelope.version
                    ),
                )),
                false,
            ),
            Ok(envelope) => {
                let power_off = matches!(envelope.request, Request::PowerOff);
                (envelope.id, handle(envelope.request), power_off)
            }
        };
        if write_frame(&mut conn, &ReplyEnvelope { id, result }).is_err() {
            return;
        }
        if power_off {
            power::power_off();
        }
    }
}

/// The id of a request that did not decode, when at least that much of it is readable, so the
/// client can match the error to its request.
fn request_id(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("id")?.as_u64())
        .unwrap_or(0)
}

fn handle(request: Request) -> Result<Reply, AgentError> {
    let containers = containers();
    match request {
        Request::Hello => Ok(Reply::Hello(AgentInfo {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: crate::kernel_release(),
            cpus: crate::online_cpus() as u32,
            memory_mib: crate::memory_mib(),
        })),
        Request::SetupGuest(setup) => guest::setup(&setup).map(|()| Reply::Done),
        Request::CreateContainer(create) => containers.create(create).map(Reply::Pid),
        Request::StartContainer { container_id } => containers.start(&container_id).map(Reply::Pid),
        Request::ExecProcess(exec) => containers.exec(exec).map(Reply::Pid),
        Request::Signal {
            container_id,
            exec_id,
            signal,
            all,
        } => containers
            .signal(&container_id, exec_id.as_deref(), signal, all)
            .map(|()| Reply::Done),
        Request::Wait {
            container_id,
            exec_id,
        } => containers
            .wait(&container_id, exec_id.as_deref())
            .map(Reply::Exited),
        Request::ResizeTerminal {
            container_id,
            exec_id,
            rows,
            cols,
        } => containers
            .resize(&container_id, exec_id.as_deref(), rows, cols)
            .map(|()| Reply::Done),
        Request::State { container_id } => containers.state(&container_id).map(Reply::State),
        Request::Stats { container_id } => containers.stats(&container_id).map(Reply::Stats),
        Request::UpdateResources {
            container_id,
            resources,
        } => containers
            .update(&container_id, &resources)
            .map(|()| Reply::Done),
        Request::ListProcesses { container_id } => {
            containers.processes(&container_id).map(Reply::Processes)
        }
        Request::RemoveContainer { container_id } => {
            containers.remove(&container_id).map(|()| Reply::Done)
        }
        Request::Counters => Ok(Reply::Counters(counters::read())),
        Request::PowerOff => Ok(Reply::Done),
    }
}
