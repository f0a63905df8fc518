//! The command line: one clap-derived enum of subcommands and their
//! implementations. This is the only library module that uses `anyhow`;
//! everything it calls returns typed errors.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::keys::ServerSigningKey;

/// Courier: a Matrix federation relay for send-to-device messages.
#[derive(Debug, Parser)]
#[command(name = "courier", version, about)]
pub struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the two development relays (config/dev/) on loopback, exchange
    /// messages between them over real TLS federation, and report.
    Demo {
        #[arg(long, default_value = "config/dev/relay-a.toml")]
        config_a: PathBuf,
        #[arg(long, default_value = "config/dev/relay-b.toml")]
        config_b: PathBuf,
        /// Messages in the batch scenario.
        #[arg(long, default_value_t = 3000)]
        batch: usize,
    },
    /// Run a relay.
    Serve {
        /// The TOML configuration file.
        #[arg(long, env = "COURIER_CONFIG")]
        config: PathBuf,
    },
    /// Write a new ed25519 signing key in Synapse's key file format, with a
    /// fresh key id `ed25519:a_<6 random letters and digits>`.
    Keygen {
        /// Where to write the key (refuses to overwrite unless --rotate).
        #[arg(long)]
        out: PathBuf,
        /// The key version (`ed25519:<version>`), letters, digits and `_`.
        /// Default: `a_` and six random letters and digits.
        #[arg(long)]
        version: Option<String>,
        /// Replace the key in --out with a new one: the old file is moved to
        /// `<out>.old-<old version>` and its public key must be published
        /// under `old_verify_keys` (printed, or appended to --config).
        #[arg(long)]
        rotate: bool,
        /// With --rotate: the configuration file to append the old key's
        /// `[[old_verify_keys]]` entry to.
        #[arg(long, requires = "rotate")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and report every problem at once.
    CheckConfig {
        #[arg(long, env = "COURIER_CONFIG")]
        config: PathBuf,
    },
    /// Write a development CA and a localhost certificate signed by it
    /// (dev-ca.crt/.key, localhost.crt/.key). For development and tests only.
    DevCerts {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
    },
    /// Enqueue a to-device message through a relay's internal RPC.
    Send {
        /// The relay's RPC base URL, e.g. http://127.0.0.1:8009.
        #[arg(long, env = "COURIER_RPC_URL")]
        rpc: String,
        /// The RPC shared secret (`rpc.secret` in the relay's config).
        #[arg(long, env = "COURIER_RPC_SECRET", hide_env_values = true)]
        secret: String,
        /// The sending user, a user of the relay's server.
        #[arg(long)]
        sender: String,
        /// The event type, e.g. m.room.encrypted.
        #[arg(long = "type")]
        event_type: String,
        /// A recipient as @user:server/DEVICE (DEVICE may be *); repeatable.
        #[arg(long, required = true)]
        to: Vec<String>,
        /// The message content, a JSON object (the same for every recipient).
        #[arg(long)]
        content: String,
        /// The transaction id (default: a fresh random one).
        #[arg(long)]
        txn_id: Option<String>,
    },
    /// Print a relay's destinations: queue depth, age, backoff, last error.
    Status {
        /// The relay's RPC base URL, e.g. http://127.0.0.1:8009.
        #[arg(long, env = "COURIER_RPC_URL")]
        rpc: String,
        /// The RPC shared secret.
        #[arg(long, env = "COURIER_RPC_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Quarantined EDUs (those a destination refused on their own).
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Trace messages: when accepted, which EDU and transactions carried
    /// them (each attempt and its outcome), which inbox and which /sync
    /// delivered them, or where they were quarantined or expired. Exits 1
    /// when the relay has no record of it.
    Trace {
        /// The relay's RPC base URL, e.g. http://127.0.0.1:8009.
        #[arg(long, env = "COURIER_RPC_URL")]
        rpc: String,
        /// The RPC shared secret.
        #[arg(long, env = "COURIER_RPC_SECRET", hide_env_values = true)]
        secret: String,
        /// A message_id, a txn_id (a client's txnId or a federation
        /// transaction id) or a user ID (@user:server: its recent messages).
        target: String,
        /// With a user ID: only this device.
        device: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load generator: measure to-device throughput and latency between two
    /// servers over the client-server API (by default the two config/dev/
    /// relays, started in this process). Exits non-zero if any accepted
    /// message is not delivered exactly once.
    Bench(Box<crate::tools::bench::BenchArgs>),
}

/// `courier quarantine ...`.
#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Put every quarantined EDU of a destination back at the end of its
    /// queue, in their original order, and wake the destination.
    Requeue {
        /// The destination server name, as `courier status` shows it.
        destination: String,
        /// The relay's RPC base URL, e.g. http://127.0.0.1:8009.
        #[arg(long, env = "COURIER_RPC_URL")]
        rpc: String,
        /// The RPC shared secret.
        #[arg(long, env = "COURIER_RPC_SECRET", hide_env_values = true)]
        secret: String,
    },
}

impl Cli {
    /// The log level when none is configured: the serving commands log
    /// their work; the interactive tools print tables and log only warnings.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Serve { .. } => "info",
            _ => "warn",
        }
    }
}

/// A failed command: the error and the process exit code it maps to.
pub struct Failure {
    pub error: anyhow::Error,
    pub exit_code: u8,
}

fn runtime_failure(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        error: error.into(),
        exit_code: 1,
    }
}

fn usage_failure(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        error: error.into(),
        exit_code: 2,
    }
}

/// Logs to stderr; `RUST_LOG` (or `COURIER_LOG`) sets the filter.
/// `default_level` applies when neither variable is set.
pub fn init_tracing(json: bool, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("COURIER_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Demo {
            config_a,
            config_b,
            batch,
        } => {
            let options = crate::tools::demo::DemoOptions {
                config_a,
                config_b,
                batch,
            };
            let results = crate::tools::demo::run_demo(options)
                .await
                .map_err(runtime_failure)?;
            if crate::tools::demo::print_table(&results) {
                println!("demo: every message delivered exactly once");
                Ok(())
            } else {
                Err(runtime_failure(anyhow::anyhow!(
                    "demo: some messages were not delivered exactly once"
                )))
            }
        }
        Command::Serve { config } => {
            let config = Config::load(&config).map_err(usage_failure)?;
            let listeners = crate::server::Listeners::bind(&config)
                .await
                .map_err(runtime_failure)?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            crate::server::run(config, listeners, shutdown)
                .await
                .map_err(runtime_failure)
        }
        Command::Keygen {
            out,
            version,
            rotate,
            config,
        } => keygen(&out, version, rotate, config.as_deref()),
        Command::DevCerts { out } => {
            crate::tools::devcerts::write_dev_certs(&out).map_err(runtime_failure)?;
            println!(
                "wrote a development CA and localhost certificate to {}",
                out.display()
            );
            Ok(())
        }
        Command::Bench(args) => {
            let report = crate::tools::bench::run_bench(&args)
                .await
                .map_err(|e| match e {
                    crate::tools::bench::BenchError::Usage(_) => usage_failure(e),
                    _ => runtime_failure(e),
                })?;
            if args.json {
                println!("{}", report.to_json());
            } else {
                report.print_text();
            }
            if report.ok() {
                Ok(())
            } else {
                Err(runtime_failure(anyhow::anyhow!(
                    "bench: not every accepted message was delivered exactly once"
                )))
            }
        }
        Command::Trace {
            rpc,
            secret,
            target,
            device,
            json,
        } => {
            crate::trace::parse_query(&target, device.as_deref()).map_err(usage_failure)?;
            let client =
                crate::tools::rpc_client::RpcClient::new(&rpc, &secret).map_err(usage_failure)?;
            match client
                .trace(&target, device.as_deref())
                .await
                .map_err(runtime_failure)?
            {
                Some(report) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).map_err(runtime_failure)?
                    );
                    Ok(())
                }
                Some(report) => {
                    print!("{}", crate::trace::render_text(&report));
                    Ok(())
                }
                None => {
                    let what = match &device {
                        Some(device) => format!("{target} {device}"),
                        None => target.clone(),
                    };
                    Err(runtime_failure(anyhow::anyhow!("no record of {what}")))
                }
            }
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config).map_err(usage_failure)?;
            let key = ServerSigningKey::load(&config.signing_key_path).map_err(usage_failure)?;
            crate::keys::check_key_id_unique(&key, &config.old_verify_keys, &[])
                .map_err(usage_failure)?;
            println!(
                "configuration is valid for {} (signing key {})",
                config.server_name,
                key.key_id()
            );
            Ok(())
        }
        Command::Send {
            rpc,
            secret,
            sender,
            event_type,
            to,
            content,
            txn_id,
        } => {
            let messages =
                crate::tools::rpc_client::messages_for(&to, &content).map_err(usage_failure)?;
            let client =
                crate::tools::rpc_client::RpcClient::new(&rpc, &secret).map_err(usage_failure)?;
            let txn_id = txn_id.unwrap_or_else(crate::todevice::new_message_id);
            client
                .send_to_device(&sender, &event_type, &txn_id, &messages)
                .await
                .map_err(runtime_failure)?;
            println!("queued (txn_id {txn_id})");
            Ok(())
        }
        Command::Status { rpc, secret } => {
            let client =
                crate::tools::rpc_client::RpcClient::new(&rpc, &secret).map_err(usage_failure)?;
            let status = client.status().await.map_err(runtime_failure)?;
            print!(
                "{}{}",
                crate::tools::rpc_client::status_table(
                    &status.destinations,
                    crate::clock::now_ms()
                ),
                crate::tools::rpc_client::expired_table(&status.expired)
            );
            Ok(())
        }
        Command::Quarantine(QuarantineCommand::Requeue {
            destination,
            rpc,
            secret,
        }) => {
            let client =
                crate::tools::rpc_client::RpcClient::new(&rpc, &secret).map_err(usage_failure)?;
            let requeued = client
                .requeue_quarantined(&destination)
                .await
                .map_err(runtime_failure)?;
            println!("requeued {requeued} quarantined EDUs for {destination}");
            Ok(())
        }
    }
}

/// `courier keygen`: a new key file, or (`rotate`) a new key in place of
/// the old one, whose public part is printed or appended to `config` as an
/// `[[old_verify_keys]]` entry.
fn keygen(
    out: &std::path::Path,
    version: Option<String>,
    rotate: bool,
    config: Option<&std::path::Path>,
) -> Result<(), Failure> {
    use crate::keys::KeyError;
    let key_failure = |error: KeyError| match error {
        KeyError::Io { .. } | KeyError::Write { .. } => runtime_failure(error),
        _ => usage_failure(error),
    };
    // Key ids the configuration already lists must not be reused.
    let listed = match config {
        Some(path) => listed_old_key_ids(path).map_err(usage_failure)?,
        None => Vec::new(),
    };
    let key = match version {
        Some(version) => ServerSigningKey::try_generate(&version).map_err(usage_failure)?,
        None => loop {
            let key = ServerSigningKey::generate(&crate::keys::random_key_version());
            if !listed.iter().any(|id| id == key.key_id()) {
                break key;
            }
        },
    };
    if listed.iter().any(|id| id == key.key_id()) {
        return Err(usage_failure(anyhow::anyhow!(
            "{} is already listed in old_verify_keys; choose another --version",
            key.key_id()
        )));
    }
    if !rotate {
        crate::keys::write_new_key_file(out, &key).map_err(key_failure)?;
        println!("wrote {} ({})", out.display(), key.key_id());
        return Ok(());
    }
    let rotation =
        crate::keys::rotate_key_file(out, &key, crate::clock::now_ms()).map_err(key_failure)?;
    println!(
        "wrote {} ({}); the previous key {} is kept in {}",
        out.display(),
        rotation.new_key_id,
        rotation.old.key_id,
        rotation.kept_at.display()
    );
    let entry = rotation.config_entry();
    match config {
        Some(path) => {
            append_to_config(path, &entry).map_err(runtime_failure)?;
            println!(
                "appended to {} (restart the relay to publish it):\n\n{entry}",
                path.display()
            );
        }
        None => println!(
            "add this to the configuration (restart the relay to publish it), so peers \
             can still verify what the old key signed:\n\n{entry}"
        ),
    }
    Ok(())
}

/// The `old_verify_keys` key ids of a configuration file (read as TOML only,
/// so a file with other problems can still be rotated into).
fn listed_old_key_ids(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("config file {} is not valid TOML: {e}", path.display()))?;
    let ids = match table.get("old_verify_keys") {
        None => Vec::new(),
        Some(toml::Value::Array(entries)) if entries.iter().all(|e| e.is_table()) => entries
            .iter()
            .filter_map(|e| e.get("key_id").and_then(toml::Value::as_str))
            .map(str::to_owned)
            .collect(),
        Some(_) => anyhow::bail!(
            "{}: old_verify_keys must be written as [[old_verify_keys]] tables to be \
             appended to",
            path.display()
        ),
    };
    Ok(ids)
}

/// Appends `entry` (a `[[old_verify_keys]]` table) to the config file.
fn append_to_config(path: &std::path::Path, entry: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot append to {}: {e}", path.display()))?;
    write!(file, "\n# Added by `courier keygen --rotate`.\n{entry}")
        .map_err(|e| anyhow::anyhow!("cannot append to {}: {e}", path.display()))?;
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    shutdown.cancel();
}
