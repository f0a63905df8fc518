//! `courier bench`: a load generator that speaks only the standard
//! client-server API (`PUT /sendToDevice`, long-poll `GET /sync`), so the
//! same workload drives two Courier relays or two Synapse homeservers.
//!
//! Two ways to get a pair of servers: by default it starts the two
//! `config/dev/` relays in this process (`in_process.rs`), or it takes base
//! URLs and access tokens for any pair (`external.rs`). `workload.rs` runs
//! the load (senders in `sender.rs`, receivers and the recorder in
//! `receiver.rs`, the federation sink in `sink.rs`), `stats.rs` keeps the
//! tally and percentiles, `procfs.rs` reads CPU and memory from `/proc`,
//! `report.rs` prints the result.
//!
//! The default shape is a realistic one: at least 100 receiving devices
//! (`--receivers`, default max(K, 100)), each with its own HTTP/1.1
//! keep-alive connection and long-poll loop, the senders on connections of
//! their own; next to the rates the report gives each relay's CPU time and
//! the `/sync` answers per delivered message.
//!
//! This module owns the command line (`BenchArgs`), its checks, the choice
//! of mode and the progress bar around a run; it never decides what a relay
//! does.

mod external;
mod in_process;
pub mod procfs;
pub mod receiver;
mod report;
mod sender;
pub mod sink;
pub mod stats;
pub mod workload;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use report::{BenchReport, LoadAverage, Measured, RelayCpu, Usage, UsageReading};
use workload::{Delivery, Endpoints, Progress, Workload};

use crate::tools::dev_pair::DevPairError;
use crate::tools::plain_http::JsonClient;

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
    /// K), each long-polling `/sync` on its own keep-alive connection.
    /// Default: the larger of K and 100. With --destinations: receiving
    /// users over the destinations, default the larger of K and the
    /// destination count.
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
    Http(#[from] crate::tools::plain_http::HttpError),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error("{0}")]
    Setup(String),
}
/// Runs one benchmark as `args` describe and returns its report.
pub async fn run_bench(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    validate(args)?;
    // For the setup (registrations, whoami, wakes) only: the run opens its
    // own connections (workload.rs).
    let http = JsonClient::new(Duration::from_secs(120));
    match &args.sender_url {
        Some(sender_url) => external::run_external(args, &http, sender_url).await,
        None => in_process::run_in_process(args, &http).await,
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

/// Receiving devices when `--receivers` is not given: enough that a K=1 run
/// rotates over as many devices, each on its own connection, as a K=100 run
/// addresses in one call.
const DEFAULT_RECEIVERS: usize = 100;

/// The receiving devices of an in-process `/sync` run: `--receivers`, or the
/// larger of K and `DEFAULT_RECEIVERS`.
fn receiving_devices(args: &BenchArgs) -> usize {
    args.receivers
        .unwrap_or_else(|| args.per_call.max(DEFAULT_RECEIVERS))
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
    format!("bench{}", crate::clock::now_ms())
}
/// Runs the workload with a progress bar on stderr (hidden when stderr is
/// not a terminal).
async fn run_workload(
    args: &BenchArgs,
    endpoints: &Endpoints,
    delivery: Delivery,
) -> Result<(workload::Outcome, LoadAverage), BenchError> {
    let workload = workload_of(args);
    let load_before = procfs::load_average();
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
    let outcome = workload::run(endpoints, &workload, &run_id(), delivery, &tick).await;
    bar.finish_and_clear();
    let load = LoadAverage {
        before: load_before,
        after: procfs::load_average(),
    };
    Ok((outcome?, load))
}
#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
    fn receiving_devices_default_to_at_least_a_hundred() {
        let count = |argv: &[&str]| receiving_devices(&parse(argv).expect("parses"));
        assert_eq!(count(&[]), 100);
        assert_eq!(count(&["-k", "100"]), 100);
        assert_eq!(count(&["-k", "250"]), 250);
        assert_eq!(count(&["--receivers", "1"]), 1);
        assert_eq!(count(&["-k", "4", "--receivers", "7"]), 7);
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
}
