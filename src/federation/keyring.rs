//! Remote server keys for verifying X-Matrix: a memory cache over the store's
//! cache over fetching `GET /_matrix/key/v2/server` from the origin.
//! (Contract only; the inbound federation work fills it in.)

use std::sync::Arc;

use ed25519_dalek::VerifyingKey;

use crate::config::Config;
use crate::federation::client::FederationClient;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("no valid key {key_id} for {server_name}: {reason}")]
    Unavailable {
        server_name: String,
        key_id: String,
        reason: String,
    },
}

pub struct KeyRing {
    _private: (),
}

impl KeyRing {
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, client: Arc<FederationClient>) -> Self {
        let _ = (config, store, client);
        KeyRing { _private: () }
    }

    /// The current verify key `key_id` of `server_name`, valid now.
    pub async fn verify_key(
        &self,
        server_name: &str,
        key_id: &str,
    ) -> Result<VerifyingKey, KeyRingError> {
        Err(KeyRingError::Unavailable {
            server_name: server_name.to_owned(),
            key_id: key_id.to_owned(),
            reason: "remote key fetching is not built yet".to_owned(),
        })
    }
}
