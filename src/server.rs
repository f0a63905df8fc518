//! Wiring and lifecycle: `run` takes a validated config, already-bound
//! listeners and a cancellation token, builds every component, serves the
//! three listeners (federation over TLS; client and RPC over plain HTTP)
//! through `listener`, which owns their timeouts and caps, and on
//! cancellation stops accepting, drains in-flight work for a bounded time
//! and returns. Tests start relays on port 0 through this function.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::federation::keyring::KeyRing;
use crate::federation::outbound::client::FederationClient;
use crate::federation::sender::{Sender, SenderHandle};
use crate::keys::ServerSigningKey;
use crate::listener::{DRAIN_TIMEOUT, Listener, serve};
use crate::notify::Notifier;
use crate::state::AppState;
use crate::todevice::ToDevice;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("federation client: {0}")]
    Client(#[from] crate::federation::outbound::client_error::ClientError),
    // Not `source`: a caller printing the error chain would show the OS
    // error twice.
    #[error("binding {what} on {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// The three bound listeners of a relay.
pub struct Listeners {
    pub federation: TcpListener,
    pub client: TcpListener,
    pub rpc: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &Config) -> Result<Listeners, ServerError> {
        let bind = |what: &'static str, addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|error| ServerError::Bind { what, addr, error })
        };
        Ok(Listeners {
            federation: bind("federation", config.federation.bind).await?,
            client: bind("client", config.client.bind).await?,
            rpc: bind("rpc", config.rpc.bind).await?,
        })
    }
}

/// Runs a relay until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    crate::tls::install_crypto_provider();
    let config = Arc::new(config);
    let signing_key = Arc::new(ServerSigningKey::load(&config.signing_key_path)?);
    let tls = crate::tls::server_config(&config.federation.tls_cert, &config.federation.tls_key)?;
    let store = crate::store::open(
        &config.store,
        &config.federation.extra_ca,
        &config.worker.name,
        config.worker.lease_duration,
    )
    .await?;
    // The trace journal is on unless `[store] trace_retention_hours = 0`.
    store
        .set_trace_journal(!config.pruning.trace_retention.is_zero())
        .await?;
    // A key id must never name two keys: peers that cached the other one
    // would reject everything we sign (issue 18). Courier does not record
    // its own keys; it checks the config's old keys and, should the key
    // cache hold our own name, that too.
    let own_cached: Vec<(String, String)> = store
        .server_keys(config.server_name.as_str())
        .await?
        .into_iter()
        .map(|k| (k.key_id, k.public_key))
        .collect();
    crate::keys::check_key_id_unique(&signing_key, &config.old_verify_keys, &own_cached)?;

    let notifier = Arc::new(Notifier::new());
    let (sender_handle, sender_commands) = SenderHandle::channel();
    let federation_client = Arc::new(FederationClient::new(config.clone(), signing_key.clone())?);
    let keyring = Arc::new(KeyRing::new(
        config.clone(),
        store.clone(),
        federation_client.clone(),
    ));
    let todevice = Arc::new(
        ToDevice::new(
            config.server_name.clone(),
            store.clone(),
            notifier.clone(),
            sender_handle.clone(),
        )
        .with_limits(config.client.send_limits),
    );
    let e2ee = Arc::new(crate::e2ee::E2ee::new(
        config.server_name.clone(),
        store.clone(),
        notifier.clone(),
        federation_client.clone(),
        config.e2ee.clone(),
        Arc::new(sender_handle.clone()),
    ));
    let state = AppState {
        config: config.clone(),
        store: store.clone(),
        signing_key,
        notifier,
        sender: sender_handle,
        todevice,
        e2ee,
        federation_client: federation_client.clone(),
        keyring,
        inbound: Arc::new(crate::federation::inbound::InboundState::default()),
        metrics: crate::metrics::MetricsHandle::install(),
    };

    let tasks = TaskTracker::new();
    let sender = Sender::new(
        config.clone(),
        store.clone(),
        federation_client,
        sender_commands,
    );
    tasks.spawn(sender.run(shutdown.child_token()));
    // Device-list resyncs of stale remote users (issue 16).
    if let Some(resync) = state.e2ee.take_resync_scheduler() {
        tasks.spawn(resync.run(shutdown.child_token()));
    }
    tasks.spawn(
        crate::store::pruner::Pruner::new(store.clone(), &config.pruning)
            .with_expiry(config.retention.clone())
            .run(shutdown.child_token()),
    );
    // Several workers on one database: leases and cross-worker wake-ups.
    tasks.spawn(crate::cluster::run_leases(
        store.clone(),
        config.worker.clone(),
        state.sender.clone(),
        shutdown.child_token(),
    ));
    tasks.spawn(crate::cluster::forward_wakeups(
        store.clone(),
        state.notifier.clone(),
        state.sender.clone(),
        shutdown.child_token(),
    ));

    let federation_app = crate::federation::router(state.clone())
        .layer(DefaultBodyLimit::max(config.federation.max_request_bytes));
    let client_app = crate::client_api::router(state.clone())
        .layer(DefaultBodyLimit::max(config.client.max_request_bytes));
    let rpc_app = crate::rpc::router(state.clone());

    tracing::info!(
        server_name = %config.server_name,
        federation = %local_addr(&listeners.federation),
        client = %local_addr(&listeners.client),
        rpc = %local_addr(&listeners.rpc),
        "courier is serving"
    );
    // Each listener enforces its own timeouts and caps (`crate::listener`).
    let federation_listener = Listener {
        name: "federation",
        tcp: listeners.federation,
        tls: Some(TlsAcceptor::from(tls)),
        limits: config.federation.listener,
        max_body_bytes: config.federation.max_request_bytes,
    };
    let client_listener = Listener {
        name: "client",
        tcp: listeners.client,
        tls: None,
        limits: config.client.listener,
        max_body_bytes: config.client.max_request_bytes,
    };
    // The RPC router takes the client body limit (`rpc::router`).
    let rpc_listener = Listener {
        name: "rpc",
        tcp: listeners.rpc,
        tls: None,
        limits: config.rpc.listener,
        max_body_bytes: config.client.max_request_bytes,
    };
    tasks.spawn(serve(federation_listener, federation_app, shutdown.clone()));
    tasks.spawn(serve(client_listener, client_app, shutdown.clone()));
    tasks.spawn(serve(rpc_listener, rpc_app, shutdown.clone()));
    tasks.close();

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    // Open long-polls answer at once so connections can drain.
    state.todevice.stop_long_polls();
    if tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(2), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    crate::cluster::release(&*store, &config.worker).await;
    // Last: the queued writes finish and (SQLite) the WAL is checkpointed.
    // Handles still held elsewhere (a test's) see `StoreError::Closed`.
    if let Err(error) = store.close().await {
        tracing::warn!(%error, "closing the store failed");
    }
    Ok(())
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}
