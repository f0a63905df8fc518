//! `AppState`: the shared handles every HTTP handler receives. Built once by
//! `server::run`; cheap to clone (everything is behind `Arc`). No process
//! globals: two relays in one test process have two `AppState`s.

use std::sync::Arc;

use crate::config::Config;
use crate::e2ee::E2ee;
use crate::federation::inbound::inbound_state::InboundState;
use crate::federation::keyring::KeyRing;
use crate::federation::outbound::client::FederationClient;
use crate::federation::sender::SenderHandle;
use crate::keys::ServerSigningKey;
use crate::notify::Notifier;
use crate::store::Store;
use crate::todevice::ToDevice;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub signing_key: Arc<ServerSigningKey>,
    /// Wakes `/sync` long-polls.
    pub notifier: Arc<Notifier>,
    /// Wakes destination tasks.
    pub sender: SenderHandle,
    /// The to-device domain core.
    pub todevice: Arc<ToDevice>,
    /// The E2EE device plane's domain core.
    pub e2ee: Arc<E2ee>,
    /// Outbound federation requests (sender, key fetching).
    pub federation_client: Arc<FederationClient>,
    /// Remote server keys for X-Matrix verification.
    pub keyring: Arc<KeyRing>,
    /// Inbound federation's rate limiter, transaction locks and counts.
    pub inbound: Arc<InboundState>,
    /// Renders `/metrics`.
    pub metrics: crate::metrics::MetricsHandle,
}
