//! The two development relays of `config/dev/`, started inside this process
//! for `courier demo` and `courier bench`: each gets a fresh store and a
//! fresh signing key in a temporary directory, real listeners on loopback
//! and real TLS federation between them. Each relay runs on its own tokio
//! runtime (worker threads named `relay-a` / `relay-b`), so the two relays
//! and the caller do not share worker threads, and per-thread CPU time can
//! be told apart. This module also holds the little RPC and client-API
//! helpers both tools need (wait until ready, register a device with a
//! known access token). It does not drive any workload.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, StoreConfig};
use crate::keys::ServerSigningKey;
use crate::server::{Listeners, ServerError, run};
use crate::tools::plain_http::{JsonClient, encode_segment};

/// How long `wait_ready` waits for a relay's client API to answer.
const READY_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DevPairError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("preparing the relays: {0}")]
    Setup(String),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Http(#[from] crate::tools::plain_http::HttpError),
    #[error("{0}")]
    Failed(String),
}

/// One running relay as a client sees it.
#[derive(Debug, Clone)]
pub struct DevRelay {
    /// `A` or `B`.
    pub name: &'static str,
    pub server_name: String,
    /// `http://…` of the client listener.
    pub client_url: String,
    /// `http://…` of the RPC listener.
    pub rpc_url: String,
    pub rpc_secret: String,
}

/// Where and how to start the pair.
#[derive(Debug, Clone)]
pub struct DevPairOptions {
    pub config_a: PathBuf,
    pub config_b: PathBuf,
    /// Parent of the temporary data directory (stores and keys); the system
    /// temporary directory when `None`. Put it on the disk you mean to
    /// measure: the stores fsync every commit.
    pub data_parent: Option<PathBuf>,
    /// Worker threads of each relay's runtime.
    pub worker_threads: usize,
    /// Raise each relay's client-listener caps (connections and requests
    /// in flight, in all and per address) to at least this, for a load
    /// generator that holds one connection per device.
    pub client_connections: Option<usize>,
}

/// Two relays running in this process. Stop them with `stop`.
pub struct DevPair {
    pub a: DevRelay,
    pub b: DevRelay,
    shutdown: CancellationToken,
    handles: Vec<JoinHandle<Result<(), ServerError>>>,
    runtimes: Vec<tokio::runtime::Runtime>,
    data: tempfile::TempDir,
}

impl DevPair {
    /// Loads both configs, points their stores and keys into a fresh
    /// temporary directory, binds every listener (failing here if a port is
    /// taken) and starts both relays. Returns once both answer
    /// `GET /_matrix/client/versions`.
    pub async fn start(options: &DevPairOptions) -> Result<DevPair, DevPairError> {
        crate::tls::install_crypto_provider();
        let mut builder = tempfile::Builder::new();
        builder.prefix("courier-pair-");
        let data = match &options.data_parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .map_err(|e| DevPairError::Setup(format!("temporary directory: {e}")))?;
        let mut config_a = prepare_config(&options.config_a, &data.path().join("relay-a"))?;
        let mut config_b = prepare_config(&options.config_b, &data.path().join("relay-b"))?;
        if let Some(wanted) = options.client_connections {
            for config in [&mut config_a, &mut config_b] {
                let limits = &mut config.client.listener;
                for cap in [
                    &mut limits.max_connections,
                    &mut limits.max_connections_per_ip,
                    &mut limits.max_concurrent_requests,
                    &mut limits.max_concurrent_requests_per_ip,
                ] {
                    *cap = (*cap).max(wanted);
                }
            }
        }
        let a = describe("A", &config_a);
        let b = describe("B", &config_b);

        let shutdown = CancellationToken::new();
        let mut pair = DevPair {
            a,
            b,
            shutdown: shutdown.clone(),
            handles: Vec::new(),
            runtimes: Vec::new(),
            data,
        };
        for (thread_name, config) in [("relay-a", config_a), ("relay-b", config_b)] {
            // Bind here so a taken port fails now, then move the sockets to
            // the relay's own runtime.
            let listeners = Listeners::bind(&config).await.map_err(|e| {
                DevPairError::Setup(format!(
                    "{e} (is another demo, bench or relay running on the dev ports?)"
                ))
            })?;
            let std_listeners =
                [listeners.federation, listeners.client, listeners.rpc].map(|l| l.into_std());
            let [federation, client, rpc] = std_listeners;
            let (federation, client, rpc) = (
                federation.map_err(setup_io)?,
                client.map_err(setup_io)?,
                rpc.map_err(setup_io)?,
            );
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(options.worker_threads.max(1))
                .thread_name(thread_name)
                .enable_all()
                .build()
                .map_err(|e| DevPairError::Setup(format!("{thread_name} runtime: {e}")))?;
            let token = shutdown.clone();
            pair.handles.push(runtime.spawn(async move {
                let from_std = |l: std::net::TcpListener| {
                    tokio::net::TcpListener::from_std(l).map_err(|error| ServerError::Bind {
                        what: "listener handover",
                        addr: ([127, 0, 0, 1], 0).into(),
                        error,
                    })
                };
                let listeners = Listeners {
                    federation: from_std(federation)?,
                    client: from_std(client)?,
                    rpc: from_std(rpc)?,
                };
                run(config, listeners, token).await
            }));
            pair.runtimes.push(runtime);
        }
        let http = JsonClient::new(Duration::from_secs(10));
        for relay in [pair.a.clone(), pair.b.clone()] {
            if let Err(error) = wait_ready(&http, &relay).await {
                // Report why a relay failed to come up, if it did.
                let stopped = pair.stop().await;
                return Err(stopped.err().unwrap_or(error));
            }
        }
        Ok(pair)
    }

    /// The temporary directory holding both stores.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Cancels both relays, waits for their drain, and drops their runtimes.
    pub async fn stop(mut self) -> Result<(), DevPairError> {
        self.shutdown.cancel();
        let mut first_error = None;
        for handle in self.handles.drain(..) {
            let outcome = match handle.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(DevPairError::Server(error)),
                Err(error) => Err(DevPairError::Setup(format!("relay task failed: {error}"))),
            };
            if let Err(error) = outcome {
                first_error.get_or_insert(error);
            }
        }
        for runtime in self.runtimes.drain(..) {
            // Every relay task has ended; this only releases idle threads
            // and is safe inside an async context.
            runtime.shutdown_background();
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl Drop for DevPair {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for runtime in self.runtimes.drain(..) {
            runtime.shutdown_background();
        }
    }
}

fn setup_io(error: std::io::Error) -> DevPairError {
    DevPairError::Setup(format!("listener handover: {error}"))
}

/// Loads a dev config and points its store and key into `dir`, creating a
/// fresh key, so every run starts clean.
fn prepare_config(path: &Path, dir: &Path) -> Result<Config, DevPairError> {
    let mut config = Config::load(path)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| DevPairError::Setup(format!("{}: {e}", dir.display())))?;
    let key_path = dir.join("signing.key");
    std::fs::write(
        &key_path,
        ServerSigningKey::generate("dev").to_file_contents(),
    )
    .map_err(|e| DevPairError::Setup(format!("{}: {e}", key_path.display())))?;
    config.signing_key_path = key_path;
    config.store = StoreConfig::Sqlite(dir.join("courier.db"));
    Ok(config)
}

fn describe(name: &'static str, config: &Config) -> DevRelay {
    DevRelay {
        name,
        server_name: config.server_name.to_string(),
        client_url: format!("http://{}", config.client.bind),
        rpc_url: format!("http://{}", config.rpc.bind),
        rpc_secret: config.rpc.secret.clone(),
    }
}

/// The access token `register_device` gives `user`'s `device`.
pub fn dev_token(user: &str, device: &str) -> String {
    format!(
        "dev_{}_{}",
        user.trim_start_matches('@').replace([':', '.'], "_"),
        device
    )
}

/// Waits until the relay's client API answers `GET /versions`.
pub async fn wait_ready(http: &JsonClient, relay: &DevRelay) -> Result<(), DevPairError> {
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        let url = format!("{}/_matrix/client/versions", relay.client_url);
        if let Ok(r) = http.request("GET", &url, None, None).await
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DevPairError::Failed(format!(
                "relay {} did not become ready",
                relay.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `user`'s `device` over the RPC with the access token
/// `dev_token(user, device)`, and returns that token.
pub async fn register_device(
    http: &JsonClient,
    relay: &DevRelay,
    user: &str,
    device: &str,
) -> Result<String, DevPairError> {
    let url = format!(
        "{}/_courier/v1/devices/{}/{}",
        relay.rpc_url,
        encode_segment(user),
        encode_segment(device)
    );
    let token = dev_token(user, device);
    let body = json!({ "access_token": token });
    let r = http
        .request("PUT", &url, Some(&relay.rpc_secret), Some(&body))
        .await?;
    if r.status != 200 {
        return Err(DevPairError::Failed(format!(
            "registering {user}/{device} on relay {}: {} {}",
            relay.name, r.status, r.body
        )));
    }
    Ok(token)
}
