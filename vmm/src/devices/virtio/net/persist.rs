//! What a snapshot keeps of a network device: the TAP it is attached to and the MAC the guest
//! was given. A frame read from the TAP but not yet delivered is dropped, as a NIC drops frames
//! it has no buffer for; the guest's TCP resends.

use serde::{Deserialize, Serialize};

use super::Net;
use super::tap::Tap;
use crate::config::NetConfig;
use crate::devices::virtio::persist::PersistError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub tap: String,
    pub mac: [u8; 6],
}

impl NetState {
    pub fn save(net: &Net) -> NetState {
        NetState {
            tap: net.tap_name().to_owned(),
            mac: net.mac(),
        }
    }

    /// Attaches to the TAP (`over`'s if given, else the saved one). The MAC is not the host's
    /// to change: the guest read it at probe and keeps using it, so an override naming another
    /// MAC is refused rather than silently not applied.
    pub fn restore(&self, id: &str, over: Option<&NetConfig>) -> Result<Net, PersistError> {
        if self.mac[0] & 1 != 0 {
            return Err(PersistError::Device {
                id: id.into(),
                reason: format!("saved MAC {} is multicast", fmt_mac(&self.mac)),
            });
        }
        if let Some(net) = over
            && net.mac != self.mac
        {
            return Err(PersistError::Device {
                id: id.into(),
                reason: format!(
                    "the guest uses MAC {}; a restore cannot give it {} (the TAP may change, \
                     the MAC must be the guest's)",
                    fmt_mac(&self.mac),
                    fmt_mac(&net.mac)
                ),
            });
        }
        let name = over.map_or(self.tap.as_str(), |n| n.tap.as_str());
        let tap = Tap::open(name).map_err(|source| PersistError::Tap {
            id: id.into(),
            source,
        })?;
        Net::new(tap, self.mac).map_err(|source| PersistError::Io {
            id: id.into(),
            what: "create the TAP's epoll".into(),
            source,
        })
    }
}

fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
