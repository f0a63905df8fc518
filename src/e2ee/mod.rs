//! The E2EE device plane's domain core (DESIGN §7), beside `todevice`:
//! device keys, one-time and fallback keys, cross-signing keys and device
//! management for local users, answered to local clients (`client_api`) and
//! to other servers (`federation::inbound`), and the fan-out of queries and
//! claims for remote users through `RemoteKeys` (implemented by the outbound
//! federation client). Like `todevice` it knows nothing of HTTP: handlers
//! parse requests into its types and map its errors to Matrix errors. Each
//! operation is one store call (`store::KeyStore`).

pub mod claim;
pub mod cross_signing;
pub mod device_lists;
pub mod devices;
pub mod error;
mod fanout;
pub mod objects;
pub mod query;
pub mod remote;
pub mod signatures;
pub mod upload;

use std::sync::Arc;

use crate::config::E2eeConfig;
use crate::identifiers::ServerName;
use crate::notify::Notifier;
use crate::store::{DeviceKey, Store};

pub use remote::RemoteKeys;

/// The E2EE domain core: one per relay, shared by the handlers.
pub struct E2ee {
    pub(crate) server_name: ServerName,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) remote: Arc<dyn RemoteKeys>,
    pub(crate) config: E2eeConfig,
}

impl E2ee {
    pub fn new(
        server_name: ServerName,
        store: Arc<dyn Store>,
        notifier: Arc<Notifier>,
        remote: Arc<dyn RemoteKeys>,
        config: E2eeConfig,
    ) -> E2ee {
        E2ee {
            server_name,
            store,
            notifier,
            remote,
            config,
        }
    }

    /// After a change to one of `user_id`'s devices has committed: wakes
    /// the `/sync` long-polls of all the user's devices, whose next
    /// response names the user in `device_lists.changed`. (Best effort: a
    /// store error only delays the news to the poll's timeout.)
    pub async fn device_list_changed(&self, user_id: &str) {
        match self.store.list_devices(user_id).await {
            Ok(devices) => {
                let devices: Vec<DeviceKey> = devices
                    .into_iter()
                    .map(|device_id| DeviceKey {
                        user_id: user_id.to_owned(),
                        device_id,
                    })
                    .collect();
                self.notifier.wake(&devices);
            }
            Err(error) => {
                tracing::warn!(user_id, %error, "listing devices to wake after a device change");
            }
        }
    }
}
