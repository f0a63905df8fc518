//! Device management of local users (SPEC-E2EE §2.6, §7.3) and what `/sync`
//! reports of the device plane (§2.5): list, read, rename and delete a
//! user's devices, each one store call, and after every change that
//! committed the device-list wake-up (`E2ee::device_list_changed`); the key
//! counts and `device_lists.changed` of a sync. Like the rest of `e2ee` it
//! knows nothing of HTTP: the client API and the RPC parse requests into
//! these calls, and `error` maps `DeviceRejected` to Matrix errors.

use std::collections::{BTreeMap, BTreeSet};

use super::E2ee;
use crate::store::keys::{DeviceQuery, KeyCounts};
use crate::store::{DeviceKey, StoreError};

/// The longest display name, in characters (Synapse's limit).
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;
/// The most device IDs one `POST /delete_devices` may name (Synapse deletes
/// in batches of this size).
pub const MAX_DEVICES_PER_DELETE: usize = 1_000;
/// The one-time key algorithm `/sync` always reports, with 0 too: clients
/// that miss it assume 0 and keep uploading (SPEC-E2EE §2.5).
pub const SIGNED_CURVE25519: &str = "signed_curve25519";

/// Which API asked for a change (the `api` label of the device metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Client,
    Rpc,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Client => "client",
            Via::Rpc => "rpc",
        }
    }
}

/// A device as `GET /devices` shows it. Courier does not record where or
/// when a device was last seen, so there is no `last_seen_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub device_id: String,
    pub display_name: Option<String>,
}

/// A device with its key state, for the homeserver (RPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub device_id: String,
    pub display_name: Option<String>,
    /// Whether the device has uploaded device keys.
    pub has_device_keys: bool,
    /// Unclaimed one-time keys per algorithm (`signed_curve25519` always).
    pub one_time_keys: BTreeMap<String, u64>,
    /// Algorithms whose fallback key has not been handed out.
    pub unused_fallback_key_types: Vec<String>,
}

/// Every device of a user with its key state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDeviceStates {
    /// The user's device-list `stream_id` (0 before the first change).
    pub stream_id: i64,
    /// Sorted by device ID.
    pub devices: Vec<DeviceState>,
}

/// What a sync learns of the device-list change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListNews {
    /// The log position the answer covers (the next token carries it).
    pub position: i64,
    /// Users with a change after the token's position, up to `position`:
    /// the syncing user and the users it tracks, sorted.
    pub changed: Vec<String>,
    /// Users the syncing user stopped tracking in that range, sorted.
    pub left: Vec<String>,
}

/// Why a device operation was refused. All but `Store` are the caller's
/// fault; each leaves the store unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRejected {
    #[error("display_name is {chars} characters, over the limit of {limit}")]
    DisplayNameTooLong { chars: usize, limit: usize },
    #[error("No device {device_id} found")]
    UnknownDevice { device_id: String },
    #[error("{count} devices in one request, over the limit of {limit}")]
    TooManyDevices { count: usize, limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuses a display name over `MAX_DISPLAY_NAME_CHARS` characters.
pub fn check_display_name(display_name: &str) -> Result<(), DeviceRejected> {
    let chars = display_name.chars().count();
    if chars > MAX_DISPLAY_NAME_CHARS {
        return Err(DeviceRejected::DisplayNameTooLong {
            chars,
            limit: MAX_DISPLAY_NAME_CHARS,
        });
    }
    Ok(())
}

impl E2ee {
    /// The registered devices of a local user, sorted by device ID.
    pub async fn devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError> {
        self.device_records(user_id, Vec::new()).await
    }

    /// One device of a local user; `None` when the user has no such device
    /// (another user's device included).
    pub async fn device(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Option<Device>, StoreError> {
        let records = self
            .device_records(user_id, vec![device_id.to_owned()])
            .await?;
        Ok(records
            .into_iter()
            .find(|device| device.device_id == device_id))
    }

    /// Sets (`Some`) or clears (`None`) a device's display name. A new
    /// name is logged as a device-list change and wakes the user's
    /// long-polls; the stored name again changes nothing (so the RPC's
    /// registration on every login logs nothing). `UnknownDevice` when the
    /// user has no such device.
    pub async fn rename_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        via: Via,
    ) -> Result<(), DeviceRejected> {
        if let Some(name) = display_name {
            check_display_name(name)?;
        }
        let unknown = || DeviceRejected::UnknownDevice {
            device_id: device_id.to_owned(),
        };
        let current = self.device(user_id, device_id).await?.ok_or_else(unknown)?;
        if current.display_name.as_deref() == display_name {
            return Ok(());
        }
        // Deleted since the read: unknown after all.
        let existed = self
            .store
            .set_display_name(user_id, device_id, display_name, crate::clock::now_ms())
            .await?;
        if !existed {
            return Err(unknown());
        }
        metrics::counter!("courier_device_renames_total", "api" => via.as_str()).increment(1);
        tracing::info!(user_id, device_id, api = via.as_str(), "device renamed");
        self.device_list_changed(user_id).await;
        Ok(())
    }

    /// Deletes devices of one user with their access tokens, inbox, device
    /// keys, one-time and fallback keys (one store transaction, which logs
    /// a change per deleted device), then wakes the user's remaining
    /// long-polls and those of the deleted devices. Unknown IDs (another
    /// user's devices included) are skipped. Returns the IDs deleted.
    pub async fn delete_devices(
        &self,
        user_id: &str,
        device_ids: &[String],
        via: Via,
    ) -> Result<Vec<String>, DeviceRejected> {
        if device_ids.len() > MAX_DEVICES_PER_DELETE {
            return Err(DeviceRejected::TooManyDevices {
                count: device_ids.len(),
                limit: MAX_DEVICES_PER_DELETE,
            });
        }
        let unique: BTreeSet<&String> = device_ids.iter().collect();
        let device_ids: Vec<String> = unique.into_iter().cloned().collect();
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        let deleted = self
            .store
            .delete_devices(user_id, &device_ids, crate::clock::now_ms())
            .await?;
        if deleted.is_empty() {
            return Ok(deleted);
        }
        metrics::counter!("courier_device_deletions_total", "api" => via.as_str())
            .increment(deleted.len() as u64);
        tracing::info!(user_id, devices = ?deleted, api = via.as_str(), "devices deleted");
        // A long-poll of a deleted device answers now instead of at its
        // timeout; its token no longer works for the next one.
        let gone: Vec<DeviceKey> = deleted
            .iter()
            .map(|device_id| DeviceKey {
                user_id: user_id.to_owned(),
                device_id: device_id.clone(),
            })
            .collect();
        self.notifier.wake(&gone);
        self.device_list_changed(user_id).await;
        Ok(deleted)
    }

    /// Every device of a local user with its key state (one query for the
    /// devices, then one key count per device).
    pub async fn device_states(&self, user_id: &str) -> Result<UserDeviceStates, StoreError> {
        let mut answer = self
            .store
            .user_devices(vec![DeviceQuery {
                user_id: user_id.to_owned(),
                device_ids: Vec::new(),
            }])
            .await?;
        let Some(user) = answer.pop() else {
            return Ok(UserDeviceStates {
                stream_id: 0,
                devices: Vec::new(),
            });
        };
        let mut devices = Vec::with_capacity(user.devices.len());
        for record in user.devices {
            let counts = self.sync_key_counts(user_id, &record.device_id).await?;
            devices.push(DeviceState {
                has_device_keys: record.keys_json.is_some(),
                device_id: record.device_id,
                display_name: record.display_name,
                one_time_keys: counts.one_time,
                unused_fallback_key_types: counts.unused_fallback,
            });
        }
        Ok(UserDeviceStates {
            stream_id: user.stream_id,
            devices,
        })
    }

    /// The key counts a sync reports: unclaimed one-time keys per
    /// algorithm, `signed_curve25519` always present (0 included), and the
    /// algorithms of unused fallback keys.
    pub async fn sync_key_counts(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<KeyCounts, StoreError> {
        Ok(sync_counts(
            self.store.key_counts(user_id, device_id).await?,
        ))
    }

    /// The device-list part of a sync: the current log position, and the
    /// users (the syncing user, and the users it tracks) with a change
    /// after `after` (the token's position; `None` for an initial sync,
    /// which reports nothing), and the users it stopped tracking. A token
    /// position ahead of the log (not one Courier minted) finds nothing,
    /// and the answer's position is the log's.
    pub async fn device_list_news(
        &self,
        user_id: &str,
        after: Option<i64>,
    ) -> Result<DeviceListNews, StoreError> {
        let position = self.store.device_list_position().await?;
        self.device_list_news_at(user_id, after, position).await
    }

    /// `device_list_news` with the log's position already read (by
    /// `Store::sync_read`).
    pub async fn device_list_news_at(
        &self,
        user_id: &str,
        after: Option<i64>,
        position: i64,
    ) -> Result<DeviceListNews, StoreError> {
        match after {
            Some(after) => self.news_between(user_id, after, position).await,
            None => Ok(DeviceListNews {
                position,
                changed: Vec::new(),
                left: Vec::new(),
            }),
        }
    }

    /// `GET /keys/changes?from&to`: the changes of the user and the users
    /// it tracks with a log position in `(from, to]`, `to` capped at the
    /// log's position (which the answer carries); `from` at or past `to`
    /// finds nothing.
    pub async fn key_changes(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<DeviceListNews, StoreError> {
        let position = self.store.device_list_position().await?;
        let mut news = self.news_between(user_id, from, to.min(position)).await?;
        news.position = to.min(position);
        Ok(news)
    }

    async fn news_between(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<DeviceListNews, StoreError> {
        if after >= up_to {
            return Ok(DeviceListNews {
                position: up_to,
                changed: Vec::new(),
                left: Vec::new(),
            });
        }
        let mut users = self.store.tracked_users(user_id).await?;
        users.push(user_id.to_owned());
        users.sort();
        users.dedup();
        let changed = self
            .store
            .users_with_changes(users, after, up_to)
            .await?
            .users;
        let left = self.store.left_users(user_id, after, up_to).await?;
        Ok(DeviceListNews {
            position: up_to,
            changed,
            left,
        })
    }

    /// The user's wanted devices (all with an empty `device_ids`) that
    /// exist, sorted by device ID.
    async fn device_records(
        &self,
        user_id: &str,
        device_ids: Vec<String>,
    ) -> Result<Vec<Device>, StoreError> {
        let answer = self
            .store
            .user_devices(vec![DeviceQuery {
                user_id: user_id.to_owned(),
                device_ids,
            }])
            .await?;
        Ok(answer
            .into_iter()
            .flat_map(|user| user.devices)
            .map(|record| Device {
                device_id: record.device_id,
                display_name: record.display_name,
            })
            .collect())
    }
}

/// Key counts as `/sync` and the RPC report them: `signed_curve25519` is
/// present even when none is left.
pub fn sync_counts(mut counts: KeyCounts) -> KeyCounts {
    counts
        .one_time
        .entry(SIGNED_CURVE25519.to_owned())
        .or_insert(0);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_are_counted_in_characters() {
        assert!(check_display_name(&"a".repeat(100)).is_ok());
        // 100 two-byte characters are 200 bytes and still allowed.
        assert!(check_display_name(&"é".repeat(100)).is_ok());
        match check_display_name(&"é".repeat(101)) {
            Err(DeviceRejected::DisplayNameTooLong { chars, limit }) => {
                assert_eq!((chars, limit), (101, 100));
            }
            other => panic!("expected DisplayNameTooLong, got {other:?}"),
        }
        assert!(check_display_name("").is_ok());
    }
}
