//! The engine's network carried into the VM. An engine (its CNI plugins) gives the container a
//! network namespace holding one or more ethernet interfaces (a veth end, a macvlan). For each,
//! the runtime makes a TAP in that namespace, mirrors the two into each other with tc
//! (`mirror`), hands the TAP to the VM's NIC, and tells the agent the interface's name, MAC,
//! MTU, addresses and routes (`inspect`), so the guest looks like the namespace did. `delete`
//! removes the mirroring; the TAPs go with the VMM that held them. See docs/networking.md.

pub mod inspect;
pub mod mirror;
pub mod netlink;
pub mod netns;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cocoon_agent_protocol::message::{GuestInterface, NetworkSetup};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

use netlink::Netlink;

/// Written by the monitor into the container's directory once the network is carried, read
/// by `delete` to undo it.
pub const NETWORK_FILE: &str = "network.json";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {reason}")]
    Netns { path: PathBuf, reason: String },
    #[error("cannot enter the container's network namespace: {0}")]
    Enter(std::io::Error),
    #[error("cannot {0}: {1}")]
    Netlink(&'static str, std::io::Error),
    #[error(
        "interface {name} ({kind}) cannot be carried into the microVM: cocoon carries ethernet \
         interfaces (veth, macvlan, ipvlan)"
    )]
    Unsupported { name: String, kind: String },
    #[error(
        "the network namespace is carried into another cocoon microVM already (it holds \
         cocoon's TAP {tap}): containers in microVMs cannot share one (`--network container:`)"
    )]
    AlreadyCarried { tap: String },
    #[error("cannot make TAP {name} for the microVM: {source}")]
    Tap {
        name: String,
        source: cocoon_vmm::devices::virtio::net::tap::TapError,
    },
    #[error("cannot mirror interface {interface} into TAP {tap}: {source}{hint}", hint = if source.raw_os_error() == Some(libc::EEXIST) { " (it already has an ingress qdisc)" } else { "" })]
    Mirror {
        interface: String,
        tap: String,
        source: std::io::Error,
    },
}

/// How cocoon's TAPs end (`tap0_cocoon`): a namespace holding one is carried already.
pub const TAP_SUFFIX: &str = "_cocoon";

/// The MAC the VMM gives NIC `slot`: how the agent finds the device to configure (a VM from a
/// template was made before its container's MACs were known).
pub fn nic_mac(slot: usize) -> [u8; 6] {
    [0x02, 0xc0, 0xc0, 0x00, 0x00, (slot as u8).wrapping_add(1)]
}

/// The network namespace a spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecNetns {
    /// The engine's, at this path.
    Engine(PathBuf),
    /// A new, empty one (a namespace entry without a path).
    New,
    /// None: the host's network.
    Host,
}

pub fn netns_of(spec: &Spec) -> SpecNetns {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    match namespaces
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)
    {
        Some(ns) => ns.path().clone().map_or(SpecNetns::New, SpecNetns::Engine),
        None => SpecNetns::Host,
    }
}

/// Gives the calling thread (the monitor's main thread, before it starts others) a network
/// namespace of its own, for a spec that asks for a new one. The container's process is the
/// monitor as far as the engine can tell, and engines that configure the network in a hook
/// (Docker's `libnetwork-setkey` prestart hook) move interfaces into
/// `/proc/MONITOR/ns/net`: that must not be the host's.
pub fn unshare_for(spec: &Spec) -> Result<(), NetworkError> {
    if netns_of(spec) != SpecNetns::New {
        return Ok(());
    }
    // SAFETY: unshare(2) with a namespace flag only; it changes this thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(NetworkError::Enter(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Checks, at `create`, that the spec's network namespace exists and is one.
pub fn check(spec: &Spec) -> Result<(), NetworkError> {
    match netns_of(spec) {
        SpecNetns::Engine(path) => netns::open(&path).map(drop),
        _ => Ok(()),
    }
}

/// What `delete` needs to undo the mirroring.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub netns: PathBuf,
    pub interfaces: Vec<MirroredInterface>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirroredInterface {
    pub name: String,
    pub index: u32,
    pub tap: String,
}

/// The network carried: the TAPs for the VM's NICs (in order), what the agent is to set up,
/// and what `delete` undoes.
#[derive(Debug, Default)]
pub struct Carried {
    pub taps: Vec<Arc<OwnedFd>>,
    pub setup: NetworkSetup,
    pub record: NetworkRecord,
}

/// Carries the network of `spec` into the VM-to-be (see the module's comment). No namespace
/// in the spec is host networking, which a VM cannot share: loopback only, with a warning.
pub fn carry(spec: &Spec) -> Result<Carried, NetworkError> {
    match netns_of(spec) {
        SpecNetns::Engine(path) => carry_from(&path),
        SpecNetns::New => Ok(Carried::default()),
        SpecNetns::Host => {
            tracing::warn!(
                "the spec has no network namespace (host networking): a microVM cannot share \
                 the host's network, the container gets loopback only"
            );
            Ok(Carried::default())
        }
    }
}

/// Carries what the engine has put, since the VM started, into the namespace this process
/// made for itself ([`unshare_for`]): Docker's prestart hook moves the container's interface
/// into `/proc/MONITOR/ns/net` during `create`. The namespace is the engine's to remove, with
/// its interfaces; cocoon's TAPs go with the VMM.
pub fn carry_own() -> Result<Carried, NetworkError> {
    carry_from(Path::new("/proc/self/ns/net"))
}

fn carry_from(path: &Path) -> Result<Carried, NetworkError> {
    let netns = netns::open(path)?;
    netns::within(&netns, || {
        let mut netlink = Netlink::open().map_err(|e| NetworkError::Netlink("open netlink", e))?;
        let links = inspect::links(&mut netlink)?;
        let routes = inspect::routes(&mut netlink, &links)?;
        let mut carried = Carried {
            record: NetworkRecord {
                netns: path.to_owned(),
                interfaces: Vec::new(),
            },
            ..Carried::default()
        };
        for (slot, link) in links.iter().enumerate() {
            if let Err(e) = carry_link(&mut netlink, slot, link, &mut carried) {
                undo(&mut netlink, &carried.record);
                return Err(e);
            }
        }
        carried.setup.routes = routes;
        Ok(carried)
    })
}

fn carry_link(
    netlink: &mut Netlink,
    slot: usize,
    link: &inspect::Link,
    carried: &mut Carried,
) -> Result<(), NetworkError> {
    let addresses = inspect::addresses(netlink, link.index)?;
    let name = format!("tap{slot}{TAP_SUFFIX}");
    let tap = cocoon_vmm::devices::virtio::net::tap::Tap::open(&name).map_err(|source| {
        NetworkError::Tap {
            name: name.clone(),
            source,
        }
    })?;
    let tap_index = tap_up(netlink, &name, link.mtu)?;
    mirror::add(netlink, link.index, tap_index).map_err(|source| NetworkError::Mirror {
        interface: link.name.clone(),
        tap: name.clone(),
        source,
    })?;
    carried.record.interfaces.push(MirroredInterface {
        name: link.name.clone(),
        index: link.index,
        tap: name,
    });
    carried.taps.push(Arc::new(OwnedFd::from(tap.file)));
    carried.setup.interfaces.push(GuestInterface {
        device_mac: nic_mac(slot),
        name: link.name.clone(),
        mac: link.mac,
        mtu: link.mtu,
        addresses,
    });
    Ok(())
}

/// Gives the TAP the interface's MTU and brings it up; its index. The TAP is a wire, not a
/// host: IPv6 is off on it so the namespace's kernel sends nothing of its own into the guest.
fn tap_up(netlink: &mut Netlink, name: &str, mtu: u32) -> Result<u32, NetworkError> {
    let c_name = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: a NUL-terminated name we own; the call reads it only.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(NetworkError::Netlink(
            "find the TAP just made",
            std::io::Error::last_os_error(),
        ));
    }
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), b"1");
    let mut message = LinkMessage::default();
    message.header.index = index;
    message.header.flags = LinkFlags::Up;
    message.header.change_mask = LinkFlags::Up;
    message.attributes.push(LinkAttribute::Mtu(mtu));
    netlink
        .change(RouteNetlinkMessage::SetLink(message), 0)
        .map_err(|e| NetworkError::Netlink("bring the TAP up", e))?;
    Ok(index)
}

fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    // SAFETY: the buffer is IFNAMSIZ bytes, as if_indextoname requires.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

fn undo(netlink: &mut Netlink, record: &NetworkRecord) {
    for interface in &record.interfaces {
        if let Err(e) = mirror::remove(netlink, interface.index) {
            tracing::warn!("cannot stop mirroring {}: {e}", interface.name);
        }
    }
}

/// Undoes [`carry`]: the engine's interfaces lose the ingress qdisc cocoon gave them. A
/// namespace that is gone (the engine removed it first) leaves nothing to do.
pub fn release(record: &NetworkRecord) -> Result<(), NetworkError> {
    if record.interfaces.is_empty() {
        return Ok(());
    }
    let netns = match netns::open(&record.netns) {
        Ok(netns) => netns,
        Err(_) if !record.netns.exists() => return Ok(()),
        Err(e) => return Err(e),
    };
    netns::within(&netns, || {
        let mut netlink = Netlink::open().map_err(|e| NetworkError::Netlink("open netlink", e))?;
        for interface in &record.interfaces {
            // Only the interface cocoon mirrored: same index and name.
            if interface_name(interface.index).as_deref() == Some(interface.name.as_str()) {
                mirror::remove(&mut netlink, interface.index).map_err(|source| {
                    NetworkError::Mirror {
                        interface: interface.name.clone(),
                        tap: interface.tap.clone(),
                        source,
                    }
                })?;
            }
        }
        Ok(())
    })
}
