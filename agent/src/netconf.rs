//! The engine's network made again in the guest (`GuestSetup::network`): each virtio-net NIC,
//! found by the MAC the VMM gave it, gets the engine's interface name, MAC, MTU and addresses,
//! then the routes are added, so that `ip addr` and `ip route` in a container show what they
//! show under runc. All of it over rtnetlink ([`crate::netlink`]) in the calling thread's
//! network namespace, the guest's root one. NICs no network names are parked out of sight
//! ([`crate::nic_park`]), and come back when one names them.

use std::fmt;
use std::net::IpAddr;

use cocoon_agent_protocol::message::{
    AgentError, ErrorKind, GuestInterface, GuestRoute, IpPrefix, NetworkSetup,
};

use crate::netlink::{self, Link, Message, Netlink, NetlinkError};
use crate::nic_park::{Parking, Spares};

/// The smallest MTU the kernel allows an Ethernet device, and the smallest IPv6 works with
/// (below it the kernel drops the device's IPv6 addresses).
const MIN_MTU: u32 = 68;
const MIN_IPV6_MTU: u32 = 1280;
const IFF_UP: u32 = libc::IFF_UP as u32;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network: {0}")]
    Invalid(String),
    #[error("network: no network device has MAC {mac} (for interface {name})")]
    NoDevice { mac: Mac, name: String },
    #[error("network: {what}: {source}")]
    Failed {
        what: String,
        #[source]
        source: NetlinkError,
    },
}

impl From<NetworkError> for AgentError {
    fn from(e: NetworkError) -> AgentError {
        let kind = match e {
            NetworkError::Invalid(_) => ErrorKind::InvalidArgument,
            NetworkError::NoDevice { .. } => ErrorKind::NotFound,
            NetworkError::Failed { .. } => ErrorKind::Failed,
        };
        AgentError::new(kind, e.to_string())
    }
}

/// A MAC as `ip link` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

struct Prefix<'a>(&'a IpPrefix);

impl fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.addr, self.0.prefix)
    }
}

/// A route as `ip route` would write it, for messages.
struct Route<'a>(&'a GuestRoute);

impl fmt::Display for Route<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        match &r.destination {
            Some(d) => write!(f, "route {}", Prefix(d))?,
            None => write!(f, "route default")?,
        }
        if let Some(gateway) = r.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(device) = &r.device {
            write!(f, " dev {device}")?;
        }
        if let Some(metric) = r.metric {
            write!(f, " metric {metric}")?;
        }
        Ok(())
    }
}

fn invalid(message: String) -> NetworkError {
    NetworkError::Invalid(message)
}

/// What the kernel accepts as a device name (`dev_valid_name`), less `lo`, the loopback's.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name != "lo"
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

fn unicast(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac != [0; 6]
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// Whether `p` has bits set past its prefix (`10.88.0.1/16` as a route destination).
fn has_host_bits(p: &IpPrefix) -> bool {
    match p.addr {
        IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(p.prefix)).unwrap_or(0) != 0,
        IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(p.prefix)).unwrap_or(0) != 0,
    }
}

/// A route's family, from its destination, gateway or source (which must agree); IPv4 when it
/// has none of them, as with `ip route add default dev eth0`.
fn route_family(route: &GuestRoute) -> Result<bool, NetworkError> {
    let addrs = [
        route.destination.map(|d| d.addr),
        route.gateway,
        route.source,
    ];
    let mut families = addrs.iter().flatten().map(|a| a.is_ipv4());
    let first = families.next().unwrap_or(true);
    if families.any(|f| f != first) {
        return Err(invalid(format!(
            "{} mixes IPv4 and IPv6 addresses",
            Route(route)
        )));
    }
    Ok(first)
}

/// Checks everything before anything changes, so a bad request changes nothing.
pub fn validate(net: &NetworkSetup) -> Result<(), NetworkError> {
    for (i, iface) in net.interfaces.iter().enumerate() {
        let name = &iface.name;
        if !valid_name(name) {
            return Err(invalid(format!(
                "interface name {name:?} is not 1 to 15 bytes without '/', ':' or spaces \
                 (nor lo)"
            )));
        }
        let earlier = &net.interfaces[..i];
        if earlier.iter().any(|e| e.name == *name) {
            return Err(invalid(format!("interface {name} is given twice")));
        }
        if earlier.iter().any(|e| e.device_mac == iface.device_mac) {
            return Err(invalid(format!(
                "device MAC {} of interface {name} is another interface's too",
                Mac(iface.device_mac)
            )));
        }
        for (what, mac) in [("device MAC", iface.device_mac), ("MAC", iface.mac)] {
            if !unicast(mac) {
                return Err(invalid(format!(
                    "{what} {} of interface {name} is not a unicast address",
                    Mac(mac)
                )));
            }
        }
        if !(MIN_MTU..=65535).contains(&iface.mtu) {
            return Err(invalid(format!(
                "MTU {} of interface {name} is not between {MIN_MTU} and 65535",
                iface.mtu
            )));
        }
        for address in &iface.addresses {
            let shown = Prefix(address);
            if address.prefix > max_prefix(address.addr) {
                return Err(invalid(format!(
                    "address {shown} of interface {name} has too long a prefix"
                )));
            }
            if address.addr.is_unspecified() || address.addr.is_multicast() {
                return Err(invalid(format!(
                    "address {shown} of interface {name} is not a unicast address"
                )));
            }
            if address.addr.is_ipv6() && iface.mtu < MIN_IPV6_MTU {
                return Err(invalid(format!(
                    "interface {name} has IPv6 address {shown} but an MTU of {} (IPv6 needs \
                     {MIN_IPV6_MTU})",
                    iface.mtu
                )));
            }
        }
    }
    for route in &net.routes {
        let shown = Route(route);
        route_family(route)?;
        if let Some(destination) = &route.destination {
            if destination.prefix > max_prefix(destination.addr) {
                return Err(invalid(format!("{shown} has too long a prefix")));
            }
            if has_host_bits(destination) {
                return Err(invalid(format!(
                    "{shown}: the destination has bits set past its prefix"
                )));
            }
        }
        if route
            .gateway
            .is_some_and(|g| g.is_unspecified() || g.is_multicast())
        {
            return Err(invalid(format!("{shown}: the gateway is not unicast")));
        }
        match &route.device {
            Some(device) if !net.interfaces.iter().any(|i| i.name == *device) => {
                return Err(invalid(format!(
                    "{shown}: {device} is not one of the interfaces"
                )));
            }
            None if route.gateway.is_none() => {
                return Err(invalid(format!(
                    "{shown} has neither a gateway nor a device"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Applies a network [`validate`] accepted. Interfaces one by one, then routes in order; the
/// first failure stops it and names the interface or route. What already exists (an address
/// or route from an earlier identical request, a connected route the kernel added itself) is
/// taken as done. Then the NICs left down, which no network named, are parked, so that an
/// empty network (a template's, a clone's without one) leaves the guest's namespace with
/// loopback only: with nothing to park, that is one link dump.
pub fn apply(net: &NetworkSetup) -> Result<(), NetworkError> {
    apply_with(net, Parking::global()?)
}

/// [`apply`] with the spare NICs of `parking`, whose namespace is the calling thread's.
pub fn apply_with(net: &NetworkSetup, parking: &Parking) -> Result<(), NetworkError> {
    // Held throughout: no container create parks a NIC this has down to rename.
    let mut spares = parking.lock();
    let failed = |what: &str| {
        let what = what.to_owned();
        move |source| NetworkError::Failed { what, source }
    };
    let mut netlink = Netlink::open()
        .map_err(NetlinkError::from)
        .map_err(failed("open a netlink socket"))?;
    let mut links = netlink
        .links()
        .map_err(failed("list the network devices"))?;
    for iface in &net.interfaces {
        configure(&mut netlink, &mut links, &mut spares, iface)?;
    }
    for route in &net.routes {
        add_route(&mut netlink, &links, route).map_err(|source| NetworkError::Failed {
            what: format!("add {}", Route(route)),
            source,
        })?;
    }
    // `links` is as configure() left the devices: the ones it configured are up.
    spares.park(&mut netlink, &links)?;
    Ok(())
}

/// RTM_NEWLINK on an existing link (no NLM_F_CREATE), as `ip link set` sends it: `change` says
/// which bits of `flags` to set or clear; attributes added to it change the rest.
fn set_link(index: i32, flags: u32, change: u32) -> Message {
    Message::new(
        netlink::RTM_NEWLINK,
        0,
        &netlink::ifinfomsg(index, flags, change),
    )
}

/// The link that is `iface`'s device: by its MAC as found, or, after an earlier request changed
/// that, the one it came with (which virtio-net keeps); failing that (a device without one),
/// the interface as it was made.
fn find(links: &[Link], iface: &GuestInterface) -> Option<usize> {
    links
        .iter()
        .position(|l| l.mac == Some(iface.device_mac))
        .or_else(|| {
            links
                .iter()
                .position(|l| l.permanent_mac == Some(iface.device_mac))
        })
        .or_else(|| {
            links
                .iter()
                .position(|l| l.name == iface.name && l.mac == Some(iface.mac))
        })
}

/// Gives the link whose device MAC is `iface.device_mac` the interface's name, MAC, MTU and
/// addresses, and brings it up. A link not in the namespace may be a parked one: it is moved
/// back first (`links` is listed again then).
fn configure(
    netlink: &mut Netlink,
    links: &mut Vec<Link>,
    spares: &mut Spares<'_>,
    iface: &GuestInterface,
) -> Result<(), NetworkError> {
    let name = &iface.name;
    let no_device = || NetworkError::NoDevice {
        mac: Mac(iface.device_mac),
        name: name.clone(),
    };
    let pos = match find(links, iface) {
        Some(pos) => pos,
        None => {
            if !spares.unpark(links, |parked| find(parked, iface))? {
                return Err(no_device());
            }
            *links = netlink.links().map_err(|source| NetworkError::Failed {
                what: "list the network devices".into(),
                source,
            })?;
            find(links, iface).ok_or_else(no_device)?
        }
    };
    // Before any change: a failure below may leave it down, and it is still not spare.
    spares.configured(links[pos].index);
    let index = links[pos].index;
    let device = links[pos].name.clone();
    let step = |what: &str| {
        let what = format!("{what} of interface {name} (device {device})");
        move |source| NetworkError::Failed { what, source }
    };
    let rename = links[pos].name != *name;
    let new_mac = links[pos].mac != Some(iface.mac);
    // A device is renamed, and may only take a new MAC, while it is down.
    if links[pos].flags & IFF_UP != 0 && (rename || new_mac) {
        netlink
            .request(set_link(index, 0, IFF_UP))
            .map_err(step("bring down"))?;
        links[pos].flags &= !IFF_UP;
    }
    if rename {
        if let Some(other) = links.iter().position(|l| l.name == *name) {
            // Another device has the name (the kernel's eth0 for the second NIC when the engine's
            // eth0 is the first): it moves aside to a name of its own, and gets its engine name,
            // if it has one, when its turn comes.
            let aside = format!("cocoon{}", links[other].index);
            let up = links[other].flags & IFF_UP != 0;
            let other_index = links[other].index;
            let what = format!("rename device {name} to {aside} to free its name");
            let moved = (|| -> Result<(), NetlinkError> {
                if up {
                    netlink.request(set_link(other_index, 0, IFF_UP))?;
                }
                netlink
                    .request(set_link(other_index, 0, 0).attr_str(netlink::IFLA_IFNAME, &aside))?;
                if up {
                    netlink.request(set_link(other_index, IFF_UP, IFF_UP))?;
                }
                Ok(())
            })();
            moved.map_err(|source| NetworkError::Failed { what, source })?;
            links[other].name = aside;
        }
        netlink
            .request(set_link(index, 0, 0).attr_str(netlink::IFLA_IFNAME, name))
            .map_err(step("rename"))?;
        links[pos].name = name.clone();
    }
    let step = |what: &str| {
        let what = format!("{what} of interface {name}");
        move |source| NetworkError::Failed { what, source }
    };
    if new_mac {
        netlink
            .request(set_link(index, 0, 0).attr(netlink::IFLA_ADDRESS, &iface.mac))
            .map_err(step("set the MAC"))?;
        links[pos].mac = Some(iface.mac);
    }
    if links[pos].mtu != Some(iface.mtu) {
        netlink
            .request(set_link(index, 0, 0).attr_u32(netlink::IFLA_MTU, iface.mtu))
            .map_err(step("set the MTU"))?;
        links[pos].mtu = Some(iface.mtu);
    }
    if links[pos].flags & IFF_UP == 0 {
        netlink
            .request(set_link(index, IFF_UP, IFF_UP))
            .map_err(step("bring up"))?;
        links[pos].flags |= IFF_UP;
    }
    for address in &iface.addresses {
        netlink
            .request(address_message(index, address))
            .or_else(exists_is_done)
            .map_err(|source| NetworkError::Failed {
                what: format!("add address {} to interface {name}", Prefix(address)),
                source,
            })?;
    }
    Ok(())
}

fn exists_is_done(e: NetlinkError) -> Result<(), NetlinkError> {
    if e.errno() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(e)
    }
}

fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// RTM_NEWADDR for `address` on link `index`. IPv4 gets the subnet's broadcast address as
/// `ip addr add ... brd +` gives it; IPv6 skips duplicate address detection (IFA_F_NODAD), so
/// the address is usable at once instead of after a second or more of emulated probing: the
/// engine checked it already.
pub fn address_message(index: i32, address: &IpPrefix) -> Message {
    let local = addr_bytes(&address.addr);
    let create = netlink::NLM_F_CREATE | netlink::NLM_F_EXCL;
    match address.addr {
        IpAddr::V4(a) => {
            let message = Message::new(
                netlink::RTM_NEWADDR,
                create,
                &netlink::ifaddrmsg(libc::AF_INET as u8, address.prefix, 0, index),
            )
            .attr(netlink::IFA_LOCAL, &local)
            .attr(netlink::IFA_ADDRESS, &local);
            // A /31 or /32 has no broadcast address (RFC 3021).
            if address.prefix >= 31 {
                return message;
            }
            let host_mask = u32::MAX >> address.prefix;
            let broadcast = (u32::from(a) | host_mask).to_be_bytes();
            message.attr(netlink::IFA_BROADCAST, &broadcast)
        }
        IpAddr::V6(_) => Message::new(
            netlink::RTM_NEWADDR,
            create,
            &netlink::ifaddrmsg(
                libc::AF_INET6 as u8,
                address.prefix,
                netlink::IFA_F_NODAD,
                index,
            ),
        )
        .attr(netlink::IFA_LOCAL, &local)
        .attr(netlink::IFA_ADDRESS, &local),
    }
}

/// RTM_NEWROUTE for `route`, with the device as link `oif`.
pub fn route_message(route: &GuestRoute, oif: Option<i32>) -> Message {
    let ipv4 = route_family(route).unwrap_or(true);
    let family = if ipv4 { libc::AF_INET } else { libc::AF_INET6 } as u8;
    // As `ip route add` scopes it: a route straight onto a link is scope link.
    let scope = if route.scope_link || (route.gateway.is_none() && oif.is_some()) {
        netlink::RT_SCOPE_LINK
    } else {
        netlink::RT_SCOPE_UNIVERSE
    };
    let dst_len = route.destination.map_or(0, |d| d.prefix);
    let mut message = Message::new(
        netlink::RTM_NEWROUTE,
        netlink::NLM_F_CREATE | netlink::NLM_F_EXCL,
        &netlink::rtmsg(family, dst_len, scope),
    );
    if let Some(destination) = &route.destination {
        message = message.attr(netlink::RTA_DST, &addr_bytes(&destination.addr));
    }
    if let Some(gateway) = &route.gateway {
        message = message.attr(netlink::RTA_GATEWAY, &addr_bytes(gateway));
    }
    if let Some(oif) = oif {
        message = message.attr_u32(netlink::RTA_OIF, oif as u32);
    }
    if let Some(metric) = route.metric {
        message = message.attr_u32(netlink::RTA_PRIORITY, metric);
    }
    if let Some(source) = &route.source {
        message = message.attr(netlink::RTA_PREFSRC, &addr_bytes(source));
    }
    message
}

fn add_route(
    netlink: &mut Netlink,
    links: &[Link],
    route: &GuestRoute,
) -> Result<(), NetlinkError> {
    let oif = match &route.device {
        // validate() made sure the device is one of the interfaces, which configure() named.
        Some(device) => Some(
            links
                .iter()
                .find(|l| l.name == *device)
                .map(|l| l.index)
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENODEV))?,
        ),
        None => None,
    };
    netlink
        .request(route_message(route, oif))
        .or_else(exists_is_done)
}

#[cfg(test)]
mod tests;
