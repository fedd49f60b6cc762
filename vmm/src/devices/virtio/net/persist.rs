//! What a snapshot keeps of a network device: the TAP it is attached to, by name (a TAP passed
//! as an fd cannot be saved: the NIC is saved detached) and the MAC the guest was given. A
//! frame read from the TAP but not yet delivered is dropped, as a NIC drops frames it has no
//! buffer for; the guest's TCP resends. The features the driver accepted are the transport's;
//! a restore hands them back so the TAP gets the offloads they allow.

use serde::{Deserialize, Serialize};

use super::Net;
use super::tap::Tap;
use crate::config::{NetConfig, TapSource};
use crate::devices::virtio::persist::PersistError;

/// The host side of a saved NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedTap {
    /// Reattached by name at restore (unless overridden).
    Name(String),
    /// No host side until a restore gives one.
    Detached,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub tap: SavedTap,
    pub mac: [u8; 6],
}

impl NetState {
    pub fn save(net: &Net) -> NetState {
        let tap = match net.tap() {
            Some(tap) if tap.by_name => SavedTap::Name(tap.name.clone()),
            _ => SavedTap::Detached,
        };
        NetState {
            tap,
            mac: net.mac(),
        }
    }

    /// Attaches to the TAP (`over`'s if given, else the saved one), with the offloads the
    /// driver's accepted `features` allow (0 if it had not activated the device). The MAC is
    /// not the host's to change: the guest read it at probe and keeps using it, so an override
    /// naming another MAC is refused rather than silently not applied.
    pub fn restore(
        &self,
        id: &str,
        over: Option<&NetConfig>,
        features: u64,
    ) -> Result<Net, PersistError> {
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
        let source = match (over, &self.tap) {
            (Some(net), _) => net.tap.clone(),
            (None, SavedTap::Name(name)) => TapSource::Name(name.clone()),
            (None, SavedTap::Detached) => TapSource::Detached,
        };
        let tap = Tap::from_source(&source).map_err(|source| PersistError::Tap {
            id: id.into(),
            source,
        })?;
        let io_err = |source| PersistError::Io {
            id: id.into(),
            what: "create the TAP's epoll".into(),
            source,
        };
        // Features first, so the TAP gets its offloads as it is attached.
        let mut net = Net::new(None, self.mac).map_err(io_err)?;
        net.restore_features(features);
        if let Some(tap) = tap {
            net.attach(tap).map_err(io_err)?;
        }
        Ok(net)
    }
}

fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
