//! Spare NICs kept out of sight. A VM restored from a template has the template's NICs, and a
//! container the engine gave no network must not see one; a network namespace of its own for
//! such a container costs about 1.3 s of emulated guest kernel code on every start (and as much
//! again to tear it down). Instead the agent moves the NICs no network names into a namespace of
//! its own that nothing runs in (the hidden one), made once, the first time there is one to
//! park, and kept for the life of the guest; a network naming one later (`GuestSetup::network`,
//! also after a container was created) moves it back. Containers then share the guest's root
//! namespace, which holds loopback only until the engine's network comes.
//!
//! A netlink socket belongs to the namespace its creating thread was in, for good, and can be
//! used from any thread: the hidden namespace's is made by the thread that makes the namespace.
//! A link moves with RTM_NEWLINK and `IFLA_NET_NS_FD`, an fd of the target namespace, sent on a
//! socket of the namespace the link is in; the kernel takes the link down as it moves it (and
//! so drops its addresses and routes).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::netconf::{Mac, NetworkError};
use crate::netlink::{self, Link, Message, Netlink, NetlinkError};

const IFF_UP: u32 = libc::IFF_UP as u32;

fn failed(what: String) -> impl FnOnce(NetlinkError) -> NetworkError {
    move |source| NetworkError::Failed { what, source }
}

/// The hidden namespace: its fd (which keeps it alive) and a netlink socket in it.
struct Hidden {
    fd: OwnedFd,
    netlink: Netlink,
}

impl Hidden {
    /// Makes the namespace in a thread of its own, which ends once it has opened the two fds:
    /// the agent's threads stay in the root namespace.
    fn make() -> std::io::Result<Hidden> {
        let thread = std::thread::Builder::new()
            .name("spare-netns".into())
            .spawn(|| -> std::io::Result<Hidden> {
                // SAFETY: unshare(CLONE_NEWNET) moves only this thread, which does nothing in
                // the new namespace but open the two fds below, and then ends.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net")?);
                let netlink = Netlink::open()?;
                Ok(Hidden { fd, netlink })
            })?;
        thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread making it panicked")))
    }
}

struct State {
    /// Made the first time a NIC is parked.
    hidden: Option<Hidden>,
    /// Root-namespace links (by index) a network named: never spare, even when down (the
    /// container may take its interface down; it stays the container's).
    configured: Vec<i32>,
}

/// The spare NICs of one namespace (the guest's root one in the agent, the test thread's in
/// tests), and the lock that every change to its links takes: a container being created must
/// not park a NIC that a `GuestSetup` on another connection has down to rename it.
pub struct Parking {
    /// The namespace the NICs are used in, to move one back into.
    root: OwnedFd,
    state: Mutex<State>,
}

impl Parking {
    /// The namespace at `path` (`/proc/.../ns/net`), which must be the calling thread's: links
    /// are listed and parked over sockets the calling thread opens.
    pub fn open(path: &str) -> std::io::Result<Parking> {
        Ok(Parking {
            root: OwnedFd::from(std::fs::File::open(path)?),
            state: Mutex::new(State {
                hidden: None,
                configured: Vec::new(),
            }),
        })
    }

    /// The agent's: its root namespace. `/proc/self` is the main thread, which never leaves it.
    pub fn global() -> Result<&'static Parking, NetworkError> {
        static GLOBAL: OnceLock<Parking> = OnceLock::new();
        if let Some(parking) = GLOBAL.get() {
            return Ok(parking);
        }
        let parking = Parking::open("/proc/self/ns/net")
            .map_err(NetlinkError::from)
            .map_err(failed("open the guest's network namespace".into()))?;
        // Two first callers at once: one of the two fds is dropped.
        Ok(GLOBAL.get_or_init(|| parking))
    }

    pub fn lock(&self) -> Spares<'_> {
        Spares {
            root: self.root.as_fd(),
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// The parking, locked.
pub struct Spares<'a> {
    root: BorrowedFd<'a>,
    state: MutexGuard<'a, State>,
}

impl Spares<'_> {
    /// Link `index` of the root namespace is the engine's: it is not parked from now on.
    pub fn configured(&mut self, index: i32) {
        if !self.state.configured.contains(&index) {
            self.state.configured.push(index);
        }
    }

    /// Moves the parked link `find` picks (among the hidden namespace's links) back into the
    /// root namespace, whose links are `root_links`. False when none is picked or nothing was
    /// ever parked; the root's links are to be listed again after true (the link may have a
    /// new index there).
    pub fn unpark(
        &mut self,
        root_links: &[Link],
        find: impl Fn(&[Link]) -> Option<usize>,
    ) -> Result<bool, NetworkError> {
        let root = self.root.as_raw_fd();
        let Some(hidden) = self.state.hidden.as_mut() else {
            return Ok(false);
        };
        let parked = hidden
            .netlink
            .links()
            .map_err(failed("list the parked network devices".into()))?;
        let Some(pos) = find(&parked) else {
            return Ok(false);
        };
        let link = &parked[pos];
        let what = format!("move the parked device {} back", shown(link));
        move_link(&mut hidden.netlink, link, root, &parked, root_links).map_err(failed(what))?;
        Ok(true)
    }

    /// Moves the root namespace's spare links (see [`spare`]) among `root_links` into the
    /// hidden namespace, made now if this is the first; returns their indices. Nothing spare
    /// costs nothing more.
    pub fn park(
        &mut self,
        root: &mut Netlink,
        root_links: &[Link],
    ) -> Result<Vec<i32>, NetworkError> {
        let spare: Vec<&Link> = root_links
            .iter()
            .filter(|l| spare(l, &self.state.configured))
            .collect();
        if spare.is_empty() {
            return Ok(Vec::new());
        }
        let hidden = match &mut self.state.hidden {
            Some(hidden) => hidden,
            empty => empty.insert(Hidden::make().map_err(NetlinkError::from).map_err(failed(
                "make the network namespace for spare devices".into(),
            ))?),
        };
        let mut parked = hidden
            .netlink
            .links()
            .map_err(failed("list the parked network devices".into()))?;
        let mut parked_indices = Vec::with_capacity(spare.len());
        for link in spare {
            let what = format!("park the spare device {}", shown(link));
            let name = move_link(root, link, hidden.fd.as_raw_fd(), root_links, &parked)
                .map_err(failed(what))?;
            // Its name is taken in the hidden namespace now (its index there is not needed).
            parked.push(Link {
                name,
                ..link.clone()
            });
            parked_indices.push(link.index);
        }
        Ok(parked_indices)
    }
}

/// A link as error messages name it: its name and MAC.
fn shown(link: &Link) -> String {
    match link.mac {
        Some(mac) => format!("{} ({})", link.name, Mac(mac)),
        None => link.name.clone(),
    }
}

/// Whether `link` of the root namespace is to be parked: a NIC (ethernet; not loopback) that
/// is down, which no network brought up, and that no network named.
pub fn spare(link: &Link, configured: &[i32]) -> bool {
    link.link_type == netlink::ARPHRD_ETHER
        && link.flags & IFF_UP == 0
        && !configured.contains(&link.index)
}

/// Whether a namespace with `links` has nothing but loopback.
pub fn only_loopback(links: &[Link]) -> bool {
    links
        .iter()
        .all(|l| l.link_type == netlink::ARPHRD_LOOPBACK)
}

/// A device name that no link of `namespaces` has.
pub fn free_name(namespaces: &[&[Link]]) -> String {
    let taken = |name: &str| {
        namespaces
            .iter()
            .any(|ls| ls.iter().any(|l| l.name == name))
    };
    (0u32..)
        .map(|n| format!("parked{n}"))
        .find(|name| !taken(name))
        .expect("fewer links than u32 numbers")
}

/// RTM_NEWLINK moving link `index` into the network namespace `netns` (an fd of the sending
/// process), as `ip link set DEV netns` sends it.
pub fn move_message(index: i32, netns: RawFd) -> Message {
    Message::new(netlink::RTM_NEWLINK, 0, &netlink::ifinfomsg(index, 0, 0))
        .attr_u32(netlink::IFLA_NET_NS_FD, netns as u32)
}

/// Moves `link`, a down link of the namespace of `netlink` (whose links are `from`), into the
/// namespace `to` (whose links are `to_links`); returns its name there. The kernel refuses a
/// link whose name the target has (the second NIC's `eth1` coming back after the first was
/// renamed `eth1`), so such a link is renamed first, to a name neither namespace has; a network
/// naming it renames it again.
fn move_link(
    netlink: &mut Netlink,
    link: &Link,
    to: RawFd,
    from: &[Link],
    to_links: &[Link],
) -> Result<String, NetlinkError> {
    let mut name = link.name.clone();
    if to_links.iter().any(|l| l.name == name) {
        // A rename needs the link down, which spare and parked links are.
        name = free_name(&[from, to_links]);
        netlink.request(
            Message::new(
                netlink::RTM_NEWLINK,
                0,
                &netlink::ifinfomsg(link.index, 0, 0),
            )
            .attr_str(netlink::IFLA_IFNAME, &name),
        )?;
    }
    netlink.request(move_message(link.index, to))?;
    Ok(name)
}

/// Parks the root namespace's spare NICs (see [`spare`]); returns the links left there. What a
/// container owning the guest is created after: one link dump when nothing is spare.
pub fn park_spare() -> Result<Vec<Link>, NetworkError> {
    park_spare_with(Parking::global()?)
}

pub fn park_spare_with(parking: &Parking) -> Result<Vec<Link>, NetworkError> {
    let mut spares = parking.lock();
    let mut netlink = Netlink::open()
        .map_err(NetlinkError::from)
        .map_err(failed("open a netlink socket".into()))?;
    let links = netlink
        .links()
        .map_err(failed("list the network devices".into()))?;
    let parked = spares.park(&mut netlink, &links)?;
    Ok(links
        .into_iter()
        .filter(|l| !parked.contains(&l.index))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: i32, link_type: u16, flags: u32, name: &str) -> Link {
        Link {
            index,
            link_type,
            flags,
            name: name.into(),
            mac: None,
            permanent_mac: None,
            mtu: None,
        }
    }

    #[test]
    fn the_namespace_fd_is_a_u32_attribute_of_a_link_change() {
        let mut message = move_message(4, 9);
        let bytes = message.bytes(2).to_vec();
        // header 16 + ifinfomsg 16 + IFLA_NET_NS_FD (4 + 4)
        assert_eq!(bytes.len(), 40);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 40);
        assert_eq!(
            u16::from_ne_bytes([bytes[4], bytes[5]]),
            netlink::RTM_NEWLINK
        );
        // No NLM_F_CREATE: a change of an existing link, found by index.
        assert_eq!(
            u16::from_ne_bytes([bytes[6], bytes[7]]),
            netlink::NLM_F_REQUEST
        );
        assert_eq!(i32::from_ne_bytes(bytes[20..24].try_into().unwrap()), 4);
        // No flag to change.
        assert_eq!(&bytes[24..32], &[0; 8]);
        assert_eq!(&bytes[32..36], &[8, 0, 28, 0]);
        assert_eq!(u32::from_ne_bytes(bytes[36..40].try_into().unwrap()), 9);
    }

    #[test]
    fn down_nics_no_network_named_are_spare() {
        let up = libc::IFF_UP as u32;
        let lo = link(1, netlink::ARPHRD_LOOPBACK, 0, "lo");
        let down = link(2, netlink::ARPHRD_ETHER, 0, "eth0");
        let configured_down = link(3, netlink::ARPHRD_ETHER, 0, "eth1");
        let running = link(4, netlink::ARPHRD_ETHER, up, "eth2");
        assert!(!spare(&lo, &[3]), "loopback, even down, stays");
        assert!(spare(&down, &[3]));
        assert!(!spare(&configured_down, &[3]));
        assert!(!spare(&running, &[3]));

        assert!(only_loopback(std::slice::from_ref(&lo)));
        assert!(only_loopback(&[]));
        assert!(!only_loopback(&[lo, running]));
    }

    #[test]
    fn a_free_name_is_free_in_both_namespaces() {
        let root = [link(2, 1, 0, "parked0"), link(3, 1, 0, "eth0")];
        let hidden = [link(2, 1, 0, "parked1")];
        assert_eq!(free_name(&[&root, &hidden]), "parked2");
        assert_eq!(free_name(&[&hidden]), "parked0");
        assert!(free_name(&[&root, &hidden]).len() < libc::IFNAMSIZ);
    }
}
