//! Traffic between an engine's interface and the TAP the VM's NIC sits on, mirrored with `tc`
//! (Kata's default model): an ingress qdisc on each, and a filter that matches every frame and
//! redirects it out of the other. The engine's interface keeps its addresses and routes; what
//! arrives on it goes to the guest, and what the guest sends leaves through it.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};

use super::netlink::Netlink;

/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// `ETH_P_ALL` in network byte order, as tc wants a filter's protocol.
const ALL_PROTOCOLS: u32 = (libc::ETH_P_ALL as u16).to_be() as u32;
const FILTER_PRIORITY: u32 = 1;

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut message = TcMessage::with_index(index as i32);
    message.header.handle = INGRESS_HANDLE;
    message.header.parent = TcHandle::INGRESS;
    message.attributes.push(TcAttribute::Kind("ingress".into()));
    message
}

/// A u32 filter on `from`'s ingress matching every frame (one key, mask 0), redirecting it
/// out of `to` and stealing it from `from`'s own stack.
fn redirect_filter(from: u32, to: u32) -> TcMessage {
    let mut message = TcMessage::with_index(from as i32);
    message.header.parent = INGRESS_HANDLE;
    message.header.info = (FILTER_PRIORITY << 16) | ALL_PROTOCOLS;
    let mut generic = TcActionGeneric::default();
    generic.action = TcActionType::Stolen;
    let mut mirror = TcMirror::default();
    mirror.generic = generic;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    message.attributes = vec![
        TcAttribute::Kind("u32".into()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    message
}

/// Mirrors `interface` and `tap` both ways. An interface that already has an ingress qdisc
/// is refused (`EEXIST`): cocoon does not change what someone else set up.
pub fn add(netlink: &mut Netlink, interface: u32, tap: u32) -> std::io::Result<()> {
    let create = NLM_F_CREATE | NLM_F_EXCL;
    netlink.change(
        RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(interface)),
        create,
    )?;
    let rest = (|| {
        netlink.change(
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(tap)),
            create,
        )?;
        netlink.change(
            RouteNetlinkMessage::NewTrafficFilter(redirect_filter(interface, tap)),
            create,
        )?;
        netlink.change(
            RouteNetlinkMessage::NewTrafficFilter(redirect_filter(tap, interface)),
            create,
        )
    })();
    if rest.is_err() {
        let _ = remove(netlink, interface);
    }
    rest
}

/// Removes the ingress qdisc of `interface`, and with it the filter; one already gone is not
/// an error. (The TAP's goes with the TAP.)
pub fn remove(netlink: &mut Netlink, interface: u32) -> std::io::Result<()> {
    match netlink.change(
        RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(interface)),
        0,
    ) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    #[test]
    fn the_filter_matches_everything_and_redirects_to_the_other_side() {
        let filter = redirect_filter(7, 9);
        let mut bytes = vec![0u8; filter.buffer_len()];
        filter.emit(&mut bytes);
        let parsed = TcMessage::parse(bytes.as_slice()).unwrap();
        assert_eq!(parsed.header.index, 7);
        assert_eq!(parsed.header.parent, INGRESS_HANDLE);
        assert_eq!(parsed.header.info, 0x0001_0300, "priority 1, ETH_P_ALL");
        let text = format!("{parsed:?}");
        assert!(text.contains("EgressRedir"), "{text}");
        assert!(text.contains("ifindex: 9"), "{text}");
        assert!(text.contains("mask: 0"), "{text}");
    }
}
