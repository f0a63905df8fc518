//! `courier bench`: a load generator that speaks only the standard
//! client-server API (`PUT /sendToDevice`, long-poll `GET /sync`), so the
//! same workload drives two Courier relays or two Synapse homeservers.
//!
//! Two ways to get a pair of servers: by default it starts the two
//! `config/dev/` relays in this process (`dev_pair`: fresh temporary stores
//! with fsync on, fresh keys, real TLS federation between them), registers
//! the benchmark devices over the RPC, and measures CPU per relay from the
//! relays' thread groups; or it takes base URLs and access tokens for any
//! pair (`--sender-url`, `--sender-token`, `--receiver-url`,
//! `--receiver-tokens-file`, `--probe-token`) and reads the servers' CPU and
//! peak RSS from `/proc/<pid>` (`--sender-pid`, `--receiver-pid`).
//!
//! `workload.rs` runs the load, `stats.rs` keeps the tally, percentiles and
//! `/proc` readings, `report.rs` prints the result. This module only wires
//! them together; it never decides what a relay does.

mod report;
pub mod sink;
pub mod stats;
pub mod workload;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

pub use report::{BenchReport, LoadAverage, Measured, Usage};
use stats::{ProcSample, sample_process, sample_threads, thread_cpu_by_group};
use workload::{Delivery, Endpoints, Progress, Recipient, Workload};

use crate::dev_pair::{DevPair, DevPairError, DevPairOptions, register_device};
use crate::plain_http::JsonClient;

/// Thread-name prefixes of the in-process mode and the group each counts
/// towards. Order matters: the first match wins.
const THREAD_GROUPS: &[(&str, &str)] = &[
    ("relay-a", "relay A (runtime threads)"),
    ("relay-b", "relay B (runtime threads)"),
    ("courier-sqlite", "SQLite writer threads (A and B)"),
    ("tokio-r", "load generator (and sink, if any)"),
    ("courier", "load generator (and sink, if any)"),
];

/// Measure to-device throughput and latency between two homeservers over
/// the client-server API.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Total bulk messages (N). 0 runs only the probe stream, for --duration.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub messages: u64,
    /// Recipients per send call (K): distinct receiving devices per request.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub per_call: usize,
    /// Send calls in flight (C).
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// Approximate size of each message's content, in bytes.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Receiving devices the messages rotate over (in-process mode; at least
    /// K). Default: the larger of K and 16.
    #[arg(long)]
    pub receivers: Option<usize>,
    /// Cap on the sending phase, in seconds (the whole run when N is 0).
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Probe period in milliseconds (one message to a separate device each
    /// period, for latency under load); 0 turns the probe off.
    #[arg(long, default_value_t = 100)]
    pub probe_ms: u64,
    /// Seconds to wait for deliveries after the last send.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
    /// Send to devices on the sending relay itself instead of over
    /// federation (in-process mode).
    #[arg(long)]
    pub local: bool,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// A name for this run in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// The event type of every message.
    #[arg(long, default_value = "org.example.courier.bench")]
    pub event_type: String,
    /// In-process mode: relay A's config.
    #[arg(long, default_value = "config/dev/relay-a.toml")]
    pub config_a: PathBuf,
    /// In-process mode: relay B's config.
    #[arg(long, default_value = "config/dev/relay-b.toml")]
    pub config_b: PathBuf,
    /// In-process mode: where the temporary stores go (default: the system
    /// temporary directory). Choose the disk you mean to measure.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// In-process mode: send to this many remote destinations instead of
    /// relay B: a federation sink listens as `localhost:<port>` for each and
    /// counts what relay A delivers (A's outbound side alone is measured).
    /// Recipients rotate over the destinations; no probe.
    #[arg(long)]
    pub destinations: Option<usize>,
    /// With --destinations: keep the destinations down while every message
    /// is queued, then open them, wake every destination over the RPC, and
    /// measure the catch-up.
    #[arg(long, requires = "destinations")]
    pub catch_up: bool,
    /// With --destinations: the sink serves one request per connection
    /// (HTTP/1.1, no keep-alive), so relay A holds no idle connection per
    /// destination; needed for thousands of destinations in one process
    /// under a 20,000 file-descriptor limit. Costs A a TLS handshake per
    /// transaction.
    #[arg(long, requires = "destinations")]
    pub sink_no_keepalive: bool,
    /// With --destinations: every call's K recipients are on one
    /// destination and consecutive calls rotate over the destinations (K ×
    /// D receiving users), so each call is one K-message EDU whatever D is.
    /// Without it consecutive recipients are on different destinations and
    /// a call fans out to min(K, D) one-message EDUs.
    #[arg(long, requires = "destinations")]
    pub group_by_destination: bool,
    /// In-process mode: worker threads of each relay's runtime.
    #[arg(long, default_value_t = 2)]
    pub relay_threads: usize,
    /// External mode: base URL of the sending server's client API. With it,
    /// no relay is started.
    #[arg(long, requires_all = ["sender_token", "receiver_tokens_file"])]
    pub sender_url: Option<String>,
    /// External mode: the sending device's access token.
    #[arg(long, env = "BENCH_SENDER_TOKEN", hide_env_values = true)]
    pub sender_token: Option<String>,
    /// External mode: base URL of the receiving server's client API
    /// (default: the sender's, for a local workload).
    #[arg(long)]
    pub receiver_url: Option<String>,
    /// External mode: access tokens of the receiving devices, one per line
    /// (`#` comments allowed); user and device come from `/account/whoami`.
    #[arg(long)]
    pub receiver_tokens_file: Option<PathBuf>,
    /// External mode: access token of the probe device (on the receiving
    /// server); without it there is no probe.
    #[arg(long)]
    pub probe_token: Option<String>,
    /// External mode: PID of the sending server, for CPU and peak RSS.
    #[arg(long)]
    pub sender_pid: Option<u32>,
    /// External mode: PID of the receiving server, for CPU and peak RSS.
    #[arg(long)]
    pub receiver_pid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Pair(#[from] DevPairError),
    #[error(transparent)]
    Http(#[from] crate::plain_http::HttpError),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    #[error(transparent)]
    Proc(#[from] stats::ProcError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error("{0}")]
    Setup(String),
}

/// Registers the receiving devices (and the probe) on relay B, or on A
/// with `--local`.
async fn pair_endpoints(
    args: &BenchArgs,
    http: &JsonClient,
    pair: &DevPair,
    sender_token: String,
) -> Result<(Endpoints, String), BenchError> {
    let receiving = if args.local { &pair.a } else { &pair.b };
    let count = args.receivers.unwrap_or(args.per_call.max(16));
    let mut receivers = Vec::with_capacity(count);
    for i in 0..count {
        let user = format!("@bench{i:05}:{}", receiving.server_name);
        let token = register_device(http, receiving, &user, "BENCH").await?;
        receivers.push(Recipient {
            user_id: user,
            device_id: "BENCH".into(),
            access_token: token,
            client_url: receiving.client_url.clone(),
        });
    }
    let probe = if args.probe_ms > 0 {
        let user = format!("@bench-probe:{}", receiving.server_name);
        let token = register_device(http, receiving, &user, "PROBE").await?;
        Some(Recipient {
            user_id: user,
            device_id: "PROBE".into(),
            access_token: token,
            client_url: receiving.client_url.clone(),
        })
    } else {
        None
    };
    let endpoints = Endpoints {
        sender_url: pair.a.client_url.clone(),
        sender_token,
        receivers,
        probe,
    };
    let mode = format!(
        "in-process Courier pair ({}), {} relay threads each, stores in {}",
        if args.local {
            "local: A → A"
        } else {
            "remote: A → B over federation"
        },
        args.relay_threads,
        pair.data_dir().display()
    );
    Ok((endpoints, mode))
}

/// Asks relay A over the RPC to retry every destination now, 32 at a time.
async fn wake_all(http: &JsonClient, relay: &crate::dev_pair::DevRelay, names: &[String]) {
    let mut in_flight = tokio::task::JoinSet::new();
    for name in names {
        let url = format!(
            "{}/_courier/v1/destinations/{}/wake",
            relay.rpc_url,
            crate::plain_http::encode_segment(name)
        );
        let http = http.clone();
        let secret = relay.rpc_secret.clone();
        in_flight.spawn(async move {
            match http
                .request("POST", &url, Some(&secret), Some(&serde_json::json!({})))
                .await
            {
                Ok(r) if r.status == 200 => {}
                Ok(r) => tracing::warn!(status = r.status, body = %r.body, "wake refused"),
                Err(error) => tracing::warn!(%error, "wake failed"),
            }
        });
        if in_flight.len() >= 32 {
            in_flight.join_next().await;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Runs one benchmark as `args` describe and returns its report.
pub async fn run_bench(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    validate(args)?;
    let http = JsonClient::new(Duration::from_secs(120));
    match &args.sender_url {
        Some(sender_url) => run_external(args, &http, sender_url).await,
        None => run_in_process(args, &http).await,
    }
}

fn validate(args: &BenchArgs) -> Result<(), BenchError> {
    if args.per_call == 0 || args.concurrency == 0 {
        return Err(BenchError::Usage(
            "--per-call and --concurrency must be at least 1".into(),
        ));
    }
    if args.messages == 0 && args.probe_ms == 0 {
        return Err(BenchError::Usage(
            "nothing to do: --messages 0 needs the probe (--probe-ms > 0)".into(),
        ));
    }
    if let Some(r) = args.receivers
        && r < args.per_call
    {
        return Err(BenchError::Usage(format!(
            "--receivers {r} is fewer than --per-call {}",
            args.per_call
        )));
    }
    if args.destinations == Some(0) {
        return Err(BenchError::Usage(
            "--destinations must be at least 1".into(),
        ));
    }
    if args.sender_url.is_some()
        && (args.local || args.receivers.is_some() || args.destinations.is_some())
    {
        return Err(BenchError::Usage(
            "--local, --receivers and --destinations apply to the in-process mode; in \
             external mode pass --receiver-url and the tokens file"
                .into(),
        ));
    }
    Ok(())
}

fn workload_of(args: &BenchArgs) -> Workload {
    Workload {
        messages: args.messages,
        per_call: args.per_call,
        concurrency: args.concurrency,
        payload_bytes: args.payload,
        duration: Duration::from_secs(args.duration),
        // A sink run has no probe device.
        probe_interval: (args.probe_ms > 0 && args.destinations.is_none())
            .then(|| Duration::from_millis(args.probe_ms)),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        event_type: args.event_type.clone(),
    }
}

fn run_id() -> String {
    format!("bench{}", crate::now_ms())
}

async fn run_in_process(args: &BenchArgs, http: &JsonClient) -> Result<BenchReport, BenchError> {
    let pair = DevPair::start(&DevPairOptions {
        config_a: args.config_a.clone(),
        config_b: args.config_b.clone(),
        data_parent: args.data_dir.clone(),
        worker_threads: args.relay_threads,
    })
    .await?;
    let outcome = drive_in_process(args, http, &pair).await;
    let stopped = pair.stop().await;
    let report = outcome?;
    stopped?;
    Ok(report)
}

async fn drive_in_process(
    args: &BenchArgs,
    http: &JsonClient,
    pair: &DevPair,
) -> Result<BenchReport, BenchError> {
    let sender_user = format!("@bench-sender:{}", pair.a.server_name);
    let sender_token = register_device(http, &pair.a, &sender_user, "SENDER").await?;
    let queued_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (endpoints, delivery, mode, sink) = match args.destinations {
        None => {
            let (endpoints, mode) = pair_endpoints(args, http, pair, sender_token).await?;
            (endpoints, Delivery::Sync, mode, None)
        }
        Some(destinations) => {
            let config = crate::config::Config::load(&args.config_a)
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            let mut sink = sink::Sink::reserve(
                destinations,
                &config.federation.tls_cert,
                &config.federation.tls_key,
                args.sink_no_keepalive,
            )
            .await?;
            let names = sink.server_names();
            let receivers = sink_receivers(
                &names,
                args.per_call,
                args.group_by_destination,
                args.receivers,
            );
            sink.set_users(
                receivers
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.user_id.clone(), i as u64)),
            );
            let sink = Arc::new(sink);
            let after_send: Option<workload::AfterSend> = if args.catch_up {
                let sink = sink.clone();
                let http = http.clone();
                let relay = pair.a.clone();
                let queued_rss = queued_rss.clone();
                Some(Box::pin(async move {
                    // Everything is queued and the sink holds nothing yet:
                    // the process is the relays plus a small generator.
                    if let Ok(sample) = sample_process("self") {
                        queued_rss.store(sample.rss_kib, Ordering::Relaxed);
                    }
                    if let Err(error) = sink.open().await {
                        tracing::error!(%error, "opening the sink failed");
                    }
                    wake_all(&http, &relay, &names).await;
                }))
            } else {
                sink.open().await?;
                None
            };
            let delivery = Delivery::Sink {
                attach: sink.attacher(),
                after_send,
            };
            let endpoints = Endpoints {
                sender_url: pair.a.client_url.clone(),
                sender_token,
                receivers,
                probe: None,
            };
            let mode = format!(
                "in-process relay A → {destinations} sink destinations (localhost:<port>, TLS, \
                 not verifying{}), {}{}{} relay threads, store in {}",
                if args.sink_no_keepalive {
                    ", one request per connection"
                } else {
                    ""
                },
                if args.group_by_destination {
                    "each call's recipients on one destination; "
                } else {
                    "each call fans out over the destinations; "
                },
                if args.catch_up {
                    "destinations down while queueing, then opened and woken; "
                } else {
                    ""
                },
                args.relay_threads,
                pair.data_dir().display()
            );
            (endpoints, delivery, mode, Some(sink))
        }
    };

    let process_before = sample_process("self")?;
    let threads_before = sample_threads()?;
    let started = Instant::now();
    let (outcome, load) = run_workload(args, http, &endpoints, delivery).await?;
    let wall = started.elapsed();
    let process_after = sample_process("self")?;
    if let Some(sink) = &sink {
        tracing::info!(transactions = sink.transactions(), "sink closing");
        sink.close().await;
    }
    let threads_after = sample_threads()?;
    let queued_rss_kib = queued_rss.load(Ordering::Relaxed);

    let mut usage = vec![Usage {
        what: "whole process (both relays + load generator)".into(),
        cpu: process_after.cpu.saturating_sub(process_before.cpu),
        peak_rss_kib: Some(process_after.peak_rss_kib),
        note: Some("both relays share this process: peak RSS covers A, B and the generator".into()),
    }];
    if queued_rss_kib > 0 {
        usage.push(Usage {
            what: "process RSS with every message queued".into(),
            cpu: Duration::ZERO,
            peak_rss_kib: Some(queued_rss_kib),
            note: Some(
                "VmRSS just before the destinations came back: both relays and the \
                 generator, no sink state yet"
                    .into(),
            ),
        });
    }
    let groups = thread_cpu_by_group(&threads_before, &threads_after, THREAD_GROUPS);
    let mut listed = Duration::ZERO;
    for (group, cpu) in &groups {
        listed += *cpu;
        usage.push(Usage {
            what: (*group).to_owned(),
            cpu: *cpu,
            peak_rss_kib: None,
            note: None,
        });
    }
    let whole = process_after.cpu.saturating_sub(process_before.cpu);
    usage.push(Usage {
        what: "threads that exited during the run".into(),
        cpu: whole.saturating_sub(listed),
        peak_rss_kib: None,
        note: None,
    });
    Ok(BenchReport::new(
        args,
        mode,
        &endpoints,
        workload_of(args),
        Measured {
            outcome,
            usage,
            wall,
            load,
        },
    ))
}

#[derive(Deserialize)]
struct WhoAmI {
    user_id: String,
    device_id: Option<String>,
}

async fn whoami(http: &JsonClient, url: &str, token: &str) -> Result<Recipient, BenchError> {
    let r = http
        .request(
            "GET",
            &format!("{url}/_matrix/client/v3/account/whoami"),
            Some(token),
            None,
        )
        .await?;
    if r.status != 200 {
        return Err(BenchError::Setup(format!(
            "whoami on {url} answered {} {}",
            r.status, r.body
        )));
    }
    let who: WhoAmI = serde_json::from_value(r.body)
        .map_err(|e| BenchError::Setup(format!("whoami on {url}: {e}")))?;
    Ok(Recipient {
        user_id: who.user_id,
        device_id: who
            .device_id
            .ok_or_else(|| BenchError::Setup(format!("whoami on {url} named no device")))?,
        access_token: token.to_owned(),
        client_url: url.to_owned(),
    })
}

/// Tokens from a file: one per line, blank lines and `#` comments skipped.
fn parse_tokens(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

async fn run_external(
    args: &BenchArgs,
    http: &JsonClient,
    sender_url: &str,
) -> Result<BenchReport, BenchError> {
    let sender_url = sender_url.trim_end_matches('/').to_owned();
    let receiver_url = args
        .receiver_url
        .as_deref()
        .unwrap_or(&sender_url)
        .trim_end_matches('/')
        .to_owned();
    let sender_token = args
        .sender_token
        .clone()
        .ok_or_else(|| BenchError::Usage("--sender-token is required".into()))?;
    let path = args
        .receiver_tokens_file
        .as_ref()
        .ok_or_else(|| BenchError::Usage("--receiver-tokens-file is required".into()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| BenchError::Usage(format!("{}: {e}", path.display())))?;
    let tokens = parse_tokens(&text);
    if tokens.len() < args.per_call {
        return Err(BenchError::Usage(format!(
            "{} has {} tokens, fewer than --per-call {}",
            path.display(),
            tokens.len(),
            args.per_call
        )));
    }
    whoami(http, &sender_url, &sender_token).await?;
    let mut receivers = Vec::with_capacity(tokens.len());
    for token in &tokens {
        receivers.push(whoami(http, &receiver_url, token).await?);
    }
    let probe = match (&args.probe_token, args.probe_ms) {
        (Some(token), ms) if ms > 0 => Some(whoami(http, &receiver_url, token).await?),
        _ => None,
    };
    let endpoints = Endpoints {
        sender_url: sender_url.clone(),
        sender_token,
        receivers,
        probe,
    };
    let mode = format!("external pair: {sender_url} → {receiver_url}");
    let pids = [("sender", args.sender_pid), ("receiver", args.receiver_pid)];
    let mut before: Vec<(&str, u32, ProcSample)> = Vec::new();
    for (role, pid) in pids {
        if let Some(pid) = pid {
            before.push((role, pid, sample_process(&pid.to_string())?));
        }
    }
    let self_before = sample_process("self")?;
    let started = Instant::now();
    let (outcome, load) = run_workload(args, http, &endpoints, Delivery::Sync).await?;
    let wall = started.elapsed();
    let mut usage = Vec::new();
    for (role, pid, sample) in before {
        let after = sample_process(&pid.to_string())?;
        usage.push(Usage {
            what: format!("{role} server (pid {pid})"),
            cpu: after.cpu.saturating_sub(sample.cpu),
            peak_rss_kib: Some(after.peak_rss_kib),
            note: Some("peak RSS over the process lifetime".into()),
        });
    }
    let self_after = sample_process("self")?;
    usage.push(Usage {
        what: "load generator (this process)".into(),
        cpu: self_after.cpu.saturating_sub(self_before.cpu),
        peak_rss_kib: Some(self_after.peak_rss_kib),
        note: None,
    });
    Ok(BenchReport::new(
        args,
        mode,
        &endpoints,
        workload_of(args),
        Measured {
            outcome,
            usage,
            wall,
            load,
        },
    ))
}

/// Runs the workload with a progress bar on stderr (hidden when stderr is
/// not a terminal).
async fn run_workload(
    args: &BenchArgs,
    http: &JsonClient,
    endpoints: &Endpoints,
    delivery: Delivery,
) -> Result<(workload::Outcome, LoadAverage), BenchError> {
    let workload = workload_of(args);
    let load_before = stats::load_average();
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(args.messages), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} delivered  {msg}")
            .map_err(|e| BenchError::Setup(format!("progress template: {e}")))?
            .progress_chars("=> "),
    );
    let tick = |p: &Progress| {
        bar.set_position(p.delivered.load(Ordering::Relaxed));
        bar.set_message(format!(
            "accepted {}  probes {}/{}  dup {}  failed {}",
            p.accepted.load(Ordering::Relaxed),
            p.probes_delivered.load(Ordering::Relaxed),
            p.probes_sent.load(Ordering::Relaxed),
            p.duplicates.load(Ordering::Relaxed),
            p.failed.load(Ordering::Relaxed),
        ));
    };
    let outcome = workload::run(http, endpoints, &workload, &run_id(), delivery, &tick).await;
    bar.finish_and_clear();
    let load = LoadAverage {
        before: load_before,
        after: stats::load_average(),
    };
    Ok((outcome?, load))
}

/// The receiving users on the sink's destinations (`names`). Grouped: user
/// i % K of destination i / K, so a call's K consecutive recipients share a
/// destination and calls rotate over them. Otherwise consecutive recipients
/// are on different destinations (`receivers` users, at least max(K, D)).
fn sink_receivers(
    names: &[String],
    per_call: usize,
    grouped: bool,
    receivers: Option<usize>,
) -> Vec<Recipient> {
    let destinations = names.len().max(1);
    let per_call = per_call.max(1);
    let recipient = |user: usize, destination: &str| Recipient {
        user_id: format!("@bench{user:05}:{destination}"),
        device_id: "BENCH".into(),
        access_token: String::new(),
        client_url: String::new(),
    };
    if grouped {
        (0..per_call * destinations)
            .map(|i| recipient(i % per_call, &names[i / per_call]))
            .collect()
    } else {
        let count = receivers.unwrap_or(per_call.max(destinations));
        (0..count)
            .map(|i| recipient(i / destinations, &names[i % destinations]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn destination_of(recipient: &Recipient) -> &str {
        recipient.user_id.split_once(':').map_or("", |(_, d)| d)
    }

    #[test]
    fn sink_receivers_fan_out_or_group_by_destination() {
        let names: Vec<String> = (0..4).map(|i| format!("localhost:{}", 7000 + i)).collect();
        // Fan-out: any K consecutive recipients span min(K, D) destinations.
        let fan = sink_receivers(&names, 3, false, None);
        assert_eq!(fan.len(), 4);
        for call in fan.windows(3) {
            let distinct: std::collections::BTreeSet<_> = call.iter().map(destination_of).collect();
            assert_eq!(distinct.len(), 3);
        }
        // Grouped: K × D users; call c (recipients cK .. cK+K) is all on
        // destination c mod D, and every destination gets calls in turn.
        let grouped = sink_receivers(&names, 3, true, None);
        assert_eq!(grouped.len(), 12);
        let users: std::collections::BTreeSet<_> =
            grouped.iter().map(|r| r.user_id.as_str()).collect();
        assert_eq!(users.len(), 12, "every receiver is a distinct user");
        for (c, call) in grouped.chunks(3).enumerate() {
            for recipient in call {
                assert_eq!(destination_of(recipient), names[c % 4]);
            }
        }
    }

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<BenchArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .map(|w| w.args)
    }

    #[test]
    fn defaults_describe_the_in_process_remote_workload() {
        let args = parse(&[]).expect("defaults parse");
        assert_eq!(
            (args.messages, args.per_call, args.concurrency),
            (10_000, 1, 32)
        );
        assert!(args.sender_url.is_none() && !args.local);
        validate(&args).expect("defaults are valid");
        let w = workload_of(&args);
        assert_eq!(w.probe_interval, Some(Duration::from_millis(100)));
    }

    #[test]
    fn bad_combinations_are_refused() {
        let args = parse(&["-k", "100", "--receivers", "10"]).expect("parses");
        assert!(matches!(validate(&args), Err(BenchError::Usage(_))));
        let args = parse(&["-n", "0", "--probe-ms", "0"]).expect("parses");
        assert!(matches!(validate(&args), Err(BenchError::Usage(_))));
        // External mode needs the token and the receivers.
        assert!(parse(&["--sender-url", "http://127.0.0.1:1"]).is_err());
        let args = parse(&[
            "--sender-url",
            "http://127.0.0.1:1",
            "--sender-token",
            "t",
            "--receiver-tokens-file",
            "/dev/null",
            "--local",
        ])
        .expect("parses");
        assert!(matches!(validate(&args), Err(BenchError::Usage(_))));
    }

    #[test]
    fn token_files_skip_comments_and_blanks() {
        let tokens = parse_tokens("# receivers\n\n  tok1 \ntok2\n#tok3\n");
        assert_eq!(tokens, vec!["tok1", "tok2"]);
    }
}
