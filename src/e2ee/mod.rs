//! The E2EE device plane's domain core (DESIGN §7), beside `todevice`:
//! device keys, one-time and fallback keys, cross-signing keys and device
//! management for local users, answered to local clients (`client_api`) and
//! to other servers (`federation::inbound`), and the fan-out of queries and
//! claims for remote users through `RemoteKeys` (implemented by the outbound
//! federation client). Device-list updates (issue 16): inbound EDUs applied
//! to the cache of tracked remote users (`device_lists`, `device_list_edus`),
//! the resync scheduler (`resync`), and the wake-ups after a change (the
//! user's devices, the devices of the users tracking it, and the sender for
//! the interested servers, through `DestinationWaker`). Like `todevice` it
//! knows nothing of HTTP: handlers parse requests into its types and map its
//! errors to Matrix errors. Each operation is one store call
//! (`store::KeyStore`, `store::device_lists::DeviceListStore`).

pub mod claim;
pub mod cross_signing;
pub mod device_list_edus;
pub mod device_lists;
pub mod devices;
pub mod error;
mod fanout;
pub mod objects;
pub mod query;
pub mod remote;
pub mod resync;
pub mod signatures;
pub mod upload;

use std::sync::{Arc, Mutex};

use crate::config::E2eeConfig;
use crate::identifiers::ServerName;
use crate::notify::Notifier;
use crate::store::{DeviceKey, Store};

pub use remote::RemoteKeys;
pub use resync::{ResyncHandle, ResyncScheduler};

/// Wakes the federation sender for a destination whose outbox just got
/// rows (implemented by `federation::sender::SenderHandle`; `e2ee` does
/// not name the sender itself).
pub trait DestinationWaker: Send + Sync {
    fn wake(&self, destination: &str);
}

/// The E2EE domain core: one per relay, shared by the handlers.
pub struct E2ee {
    pub(crate) server_name: ServerName,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) remote: Arc<dyn RemoteKeys>,
    pub(crate) config: E2eeConfig,
    pub(crate) destinations: Arc<dyn DestinationWaker>,
    pub(crate) resync: ResyncHandle,
    /// The scheduler behind `resync`, until `take_resync_scheduler` hands
    /// it to the task that runs it.
    scheduler: Mutex<Option<ResyncScheduler>>,
}

impl E2ee {
    pub fn new(
        server_name: ServerName,
        store: Arc<dyn Store>,
        notifier: Arc<Notifier>,
        remote: Arc<dyn RemoteKeys>,
        config: E2eeConfig,
        destinations: Arc<dyn DestinationWaker>,
    ) -> E2ee {
        let (resync, scheduler) = ResyncScheduler::new(
            store.clone(),
            remote.clone(),
            config.clone(),
            notifier.clone(),
        );
        E2ee {
            server_name,
            store,
            notifier,
            remote,
            config,
            destinations,
            resync,
            scheduler: Mutex::new(Some(scheduler)),
        }
    }

    /// The resync scheduler of this core, once (`server::run` spawns its
    /// `run`; until it runs, scheduled resyncs wait in its queue).
    pub fn take_resync_scheduler(&self) -> Option<ResyncScheduler> {
        crate::sync::lock(&self.scheduler).take()
    }

    /// The handle that schedules resyncs of remote users' device lists.
    pub fn resync_handle(&self) -> &ResyncHandle {
        &self.resync
    }

    /// After a change to one of `user_id`'s devices (or cross-signing keys)
    /// has committed: wakes the `/sync` long-polls of all the user's
    /// devices and of the devices of local users tracking the user, whose
    /// next response names the user in `device_lists.changed`, and the
    /// sender for every server interested in the user (the store queued
    /// their EDUs in the change's transaction). Best effort: a store error
    /// only delays the news to the poll's timeout or the sender's next
    /// round.
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
        self.wake_trackers(vec![user_id.to_owned()]).await;
        match self
            .store
            .device_list_destinations(user_id, crate::clock::now_ms())
            .await
        {
            Ok(destinations) => {
                for destination in &destinations {
                    self.destinations.wake(destination);
                }
            }
            Err(error) => {
                tracing::warn!(user_id, %error, "listing destinations to wake after a device change");
            }
        }
    }

    /// Wakes the long-polls of every local user tracking any of `users`.
    pub(crate) async fn wake_trackers(&self, users: Vec<String>) {
        resync::wake_trackers(&*self.store, &self.notifier, users).await;
    }
}
