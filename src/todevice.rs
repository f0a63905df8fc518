//! The to-device domain core: validates a send, splits recipients into local
//! inbox rows and remote outbox EDUs, writes them in one store transaction,
//! and wakes long-polls and destinations. It knows nothing of HTTP.
//! (Contract only; the to-device work fills it in.)

use std::sync::Arc;

use crate::federation::sender::SenderHandle;
use crate::identifiers::ServerName;
use crate::notify::Notifier;
use crate::store::Store;

pub struct ToDevice {
    pub server_name: ServerName,
    pub store: Arc<dyn Store>,
    pub notifier: Arc<Notifier>,
    pub sender: SenderHandle,
}

impl ToDevice {
    pub fn new(
        server_name: ServerName,
        store: Arc<dyn Store>,
        notifier: Arc<Notifier>,
        sender: SenderHandle,
    ) -> Self {
        ToDevice {
            server_name,
            store,
            notifier,
            sender,
        }
    }
}
