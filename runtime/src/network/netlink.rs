//! A blocking rtnetlink socket: requests acknowledged one at a time and dumps read to their
//! end. The socket belongs to the network namespace of the thread that opened it, so the
//! caller opens it inside the engine's namespace (see `netns::within`) and may then use it
//! from any thread.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    /// A route socket in the calling thread's network namespace.
    pub fn open() -> std::io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> std::io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.sequence)
    }

    /// Reads the replies to request `sequence` until `done` says the last one came; the
    /// kernel's error replies become errors.
    fn replies(
        &mut self,
        sequence: u32,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> std::io::Result<()> {
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < buf.len() {
                let packet = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                    .map_err(|e| std::io::Error::other(format!("bad netlink reply: {e}")))?;
                let length = packet.header.length as usize;
                if length == 0 {
                    return Err(std::io::Error::other("netlink reply of length 0"));
                }
                offset += length;
                if packet.header.sequence_number != sequence {
                    continue;
                }
                match packet.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    _ => {}
                }
            }
        }
    }

    /// Sends a change (`flags` such as `NLM_F_CREATE | NLM_F_EXCL`) and waits for its ack.
    pub fn change(&mut self, message: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
        let sequence = self.send(message, NLM_F_ACK | flags)?;
        self.replies(sequence, |_| {})
    }

    /// Every object a `Get*` request dumps.
    pub fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        let sequence = self.send(message, NLM_F_DUMP)?;
        let mut all = Vec::new();
        self.replies(sequence, |m| all.push(m))?;
        Ok(all)
    }
}
