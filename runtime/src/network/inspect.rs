//! What the engine configured in its network namespace, read over netlink: the ethernet
//! interfaces with their MAC, MTU and addresses, and the routes the guest must have too.

use std::net::IpAddr;

use cocoon_agent_protocol::message::{GuestRoute, IpPrefix};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::NetworkError;
use super::netlink::Netlink;

/// One interface the engine made, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// `veth`, `macvlan`, ... or empty for a device without a link kind (a physical NIC).
    pub kind: String,
}

/// The interface kinds whose frames a TAP can stand in for: ethernet, one MAC each.
const CARRIED_KINDS: &[&str] = &["", "veth", "macvlan", "macvtap", "ipvlan", "dummy"];

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::MacVlan => "macvlan".into(),
        InfoKind::MacVtap => "macvtap".into(),
        InfoKind::IpVlan => "ipvlan".into(),
        InfoKind::Dummy => "dummy".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The devices the kernel makes in every new namespace when a tunnel module is loaded on the
/// host (Calico and others load them): down, and nothing of the engine's.
const FALLBACK_TUNNELS: &[&str] = &[
    "sit0", "tunl0", "ip6tnl0", "gre0", "gretap0", "erspan0", "ip_vti0", "ip6_vti0", "ip6gre0",
];

/// The namespace's interfaces other than loopback (and the kernel's fallback tunnels); one that
/// cannot be carried (not ethernet, or a bridge, tunnel, TAP, ...) is an error naming it, and
/// a TAP of cocoon's says another container's microVM has the namespace already.
pub fn links(netlink: &mut Netlink) -> Result<Vec<Link>, NetworkError> {
    let replies = netlink
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(|e| NetworkError::Netlink("list the interfaces", e))?;
    let mut links = Vec::new();
    for reply in replies {
        let RouteNetlinkMessage::NewLink(link) = reply else {
            continue;
        };
        if link.header.link_layer_type == LinkLayerType::Loopback {
            continue;
        }
        let mut found = Link {
            index: link.header.index,
            name: String::new(),
            mac: [0; 6],
            mtu: 1500,
            kind: String::new(),
        };
        let mut mac_len = 0;
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::IfName(name) => found.name = name.clone(),
                LinkAttribute::Mtu(mtu) => found.mtu = *mtu,
                LinkAttribute::Address(bytes) => {
                    mac_len = bytes.len();
                    if let Ok(mac) = <[u8; 6]>::try_from(bytes.as_slice()) {
                        found.mac = mac;
                    }
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            found.kind = kind_name(kind);
                        }
                    }
                }
                _ => {}
            }
        }
        let up = link.header.flags.contains(LinkFlags::Up);
        if !up && FALLBACK_TUNNELS.contains(&found.name.as_str()) {
            continue;
        }
        if found.kind == "tun" && found.name.ends_with(super::TAP_SUFFIX) {
            return Err(NetworkError::AlreadyCarried { tap: found.name });
        }
        let ethernet = link.header.link_layer_type == LinkLayerType::Ether && mac_len == 6;
        if !ethernet || !CARRIED_KINDS.contains(&found.kind.as_str()) {
            let kind = if found.kind.is_empty() {
                format!("{:?}", link.header.link_layer_type).to_lowercase()
            } else {
                found.kind.clone()
            };
            return Err(NetworkError::Unsupported {
                name: found.name,
                kind,
            });
        }
        links.push(found);
    }
    links.sort_by_key(|l| l.index);
    Ok(links)
}

/// The addresses of interface `index` the guest needs: all but IPv6 link-local ones, which
/// the guest's kernel derives from the MAC itself, as the engine's did.
pub fn addresses(netlink: &mut Netlink, index: u32) -> Result<Vec<IpPrefix>, NetworkError> {
    let replies = netlink
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .map_err(|e| NetworkError::Netlink("list the addresses", e))?;
    let mut found = Vec::new();
    for reply in replies {
        let RouteNetlinkMessage::NewAddress(address) = reply else {
            continue;
        };
        if address.header.index != index {
            continue;
        }
        // IPv4's own address is IFA_LOCAL (IFA_ADDRESS is the peer's on point-to-point links);
        // IPv6 has only IFA_ADDRESS.
        let mut local = None;
        let mut any = None;
        for attribute in &address.attributes {
            match attribute {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => any = Some(*ip),
                _ => {}
            }
        }
        let Some(addr) = local.or(any) else { continue };
        if let IpAddr::V6(v6) = addr
            && v6.segments()[0] & 0xffc0 == 0xfe80
        {
            continue;
        }
        found.push(IpPrefix {
            addr,
            prefix: address.header.prefix_len,
        });
    }
    Ok(found)
}

/// The main table's routes through the carried interfaces, except those the guest's kernel
/// makes itself when it is given the addresses (`proto kernel`).
pub fn routes(netlink: &mut Netlink, links: &[Link]) -> Result<Vec<GuestRoute>, NetworkError> {
    let mut found = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        let replies = netlink
            .dump(RouteNetlinkMessage::GetRoute(request))
            .map_err(|e| NetworkError::Netlink("list the routes", e))?;
        for reply in replies {
            if let RouteNetlinkMessage::NewRoute(route) = reply
                && let Some(route) = guest_route(&route, links)
            {
                found.push(route);
            }
        }
    }
    Ok(found)
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn guest_route(route: &RouteMessage, links: &[Link]) -> Option<GuestRoute> {
    let mut table = u32::from(route.header.table);
    let mut destination = None;
    let mut carried = GuestRoute::default();
    let mut oif = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => destination = address(a),
            RouteAttribute::Gateway(a) => carried.gateway = address(a),
            RouteAttribute::PrefSource(a) => carried.source = address(a),
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Priority(metric) => carried.metric = Some(*metric),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || route.header.kind != RouteType::Unicast
        || route.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    // A route through an interface that is not carried (there is none but loopback) has no
    // meaning in the guest.
    let link = links.iter().find(|l| Some(l.index) == oif)?;
    carried.device = Some(link.name.clone());
    carried.scope_link = route.header.scope == RouteScope::Link;
    carried.destination = match (route.header.destination_prefix_length, destination) {
        (0, _) => None,
        (prefix, Some(addr)) => Some(IpPrefix { addr, prefix }),
        (_, None) => return None,
    };
    if carried.destination.is_none() && carried.gateway.is_none() {
        // `default dev IF`: nothing in it says which family; the guest gets the routes that
        // say so.
        tracing::warn!(
            "not carried into the VM: a default route through {} without a gateway",
            link.name
        );
        return None;
    }
    Some(carried)
}
