//! In-process wake-ups for `/sync` long-polls: a writer that stored inbox rows
//! calls `wake`, and every long-poll waiting on one of those devices returns
//! early. It carries no data and no durability: a long-poll always re-reads
//! the store after waking (and before sleeping), so a lost wake-up costs at
//! most one timeout, never a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use crate::store::DeviceKey;

/// Device-keyed wake-up registry. Entries exist only while someone waits.
#[derive(Default)]
pub struct Notifier {
    waiters: Mutex<HashMap<DeviceKey, Arc<Notify>>>,
}

/// A registered interest in one device. Create it *before* reading the
/// store, then await `wait()`: a wake between the read and the wait is not
/// lost, because the `Notified` future is already enabled.
pub struct DeviceWaiter<'a> {
    notifier: &'a Notifier,
    device: DeviceKey,
    notify: Arc<Notify>,
    notified: std::pin::Pin<Box<OwnedNotified>>,
}

impl Notifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers interest in `device`.
    pub fn subscribe(&self, device: DeviceKey) -> DeviceWaiter<'_> {
        let notify = {
            let mut waiters = crate::sync::lock(&self.waiters);
            waiters.entry(device.clone()).or_default().clone()
        };
        let mut notified = Box::pin(notify.clone().notified_owned());
        notified.as_mut().enable();
        DeviceWaiter {
            notifier: self,
            device,
            notify,
            notified,
        }
    }

    /// Wakes every long-poll waiting on any of `devices`.
    pub fn wake<'d>(&self, devices: impl IntoIterator<Item = &'d DeviceKey>) {
        let waiters = crate::sync::lock(&self.waiters);
        for device in devices {
            if let Some(notify) = waiters.get(device) {
                notify.notify_waiters();
            }
        }
    }

    /// How many devices currently have a waiter (for metrics and tests).
    pub fn waiting_devices(&self) -> usize {
        crate::sync::lock(&self.waiters).len()
    }
}

impl DeviceWaiter<'_> {
    /// Resolves when the device is woken (after `subscribe`).
    pub async fn wait(&mut self) {
        self.notified.as_mut().await;
    }
}

impl Drop for DeviceWaiter<'_> {
    fn drop(&mut self) {
        let mut waiters = crate::sync::lock(&self.notifier.waiters);
        // The map holds one reference and this waiter one; anything more
        // means another waiter still uses the entry.
        let last_waiter = waiters.get(&self.device).is_some_and(|existing| {
            Arc::ptr_eq(existing, &self.notify) && Arc::strong_count(existing) <= 3
        });
        if last_waiter {
            waiters.remove(&self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dev(d: &str) -> DeviceKey {
        DeviceKey {
            user_id: "@a:x".into(),
            device_id: d.into(),
        }
    }

    #[tokio::test]
    async fn a_wake_after_subscribe_is_not_lost() {
        let n = Notifier::new();
        let mut w = n.subscribe(dev("A"));
        n.wake([&dev("A")]);
        tokio::time::timeout(Duration::from_secs(5), w.wait())
            .await
            .expect("woken");
    }

    #[tokio::test(start_paused = true)]
    async fn other_devices_are_not_woken_and_entries_are_dropped() {
        let n = Notifier::new();
        {
            let mut w = n.subscribe(dev("A"));
            n.wake([&dev("B")]);
            let r = tokio::time::timeout(Duration::from_secs(1), w.wait()).await;
            assert!(r.is_err(), "A must not be woken by B");
            assert_eq!(n.waiting_devices(), 1);
        }
        assert_eq!(n.waiting_devices(), 0);
    }
}
