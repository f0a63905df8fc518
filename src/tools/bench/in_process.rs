//! The in-process mode of `courier bench`: starts the two `config/dev/`
//! relays in this process (`dev_pair`: fresh temporary stores with fsync on,
//! fresh keys, real TLS federation between them) and registers the
//! benchmark devices over the RPC, or, with `--destinations`, reserves the
//! federation sink's destinations and names the receiving users on them
//! (opening the sink and waking every destination after the sends for a
//! catch-up run); then runs the workload and measures CPU per relay from the
//! relays' thread groups (each relay's runtime threads; the two relays'
//! SQLite writer threads share a name, so they are one group).
//!
//! It does not parse or check the arguments (`mod.rs`), run the load
//! (`workload.rs`) or read `/proc` itself (`procfs.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::procfs::{sample_process, sample_threads, thread_cpu_by_group};
use super::workload::{self, Delivery, Endpoints, Recipient};
use super::{
    BenchArgs, BenchError, BenchReport, Measured, RelayCpu, Usage, UsageReading, receiving_devices,
    run_workload, sink, workload_of,
};
use crate::tools::dev_pair::{DevPair, DevPairOptions, DevRelay, register_device};
use crate::tools::plain_http::JsonClient;

const RELAY_A: &str = "relay A (runtime threads)";
const RELAY_B: &str = "relay B (runtime threads)";
const STORE_WRITERS: &str = "SQLite writer threads (A and B)";

/// Thread-name prefixes of the in-process mode and the group each counts
/// towards. Order matters: the first match wins.
const THREAD_GROUPS: &[(&str, &str)] = &[
    ("relay-a", RELAY_A),
    ("relay-b", RELAY_B),
    ("courier-sqlite", STORE_WRITERS),
    ("tokio-r", "load generator (and sink, if any)"),
    ("courier", "load generator (and sink, if any)"),
];

/// Device registrations in flight at once while setting up.
const REGISTRATIONS_IN_FLIGHT: usize = 16;

/// Registers `count` receiving devices `@bench<i>:<server>` / `BENCH` on
/// `relay`, a few at a time, and returns them in index order.
async fn register_receivers(
    http: &JsonClient,
    relay: &DevRelay,
    count: usize,
) -> Result<Vec<Recipient>, BenchError> {
    let mut registered: Vec<Option<Recipient>> = vec![None; count];
    let mut in_flight = JoinSet::new();
    let mut next = 0;
    while next < count || !in_flight.is_empty() {
        if next < count && in_flight.len() < REGISTRATIONS_IN_FLIGHT {
            let (http, relay, i) = (http.clone(), relay.clone(), next);
            in_flight.spawn(async move {
                let user = format!("@bench{i:05}:{}", relay.server_name);
                let token = register_device(&http, &relay, &user, "BENCH").await?;
                Ok::<_, BenchError>((
                    i,
                    Recipient {
                        user_id: user,
                        device_id: "BENCH".into(),
                        access_token: token,
                        client_url: relay.client_url.clone(),
                    },
                ))
            });
            next += 1;
            continue;
        }
        match in_flight.join_next().await {
            Some(Ok(Ok((i, recipient)))) => registered[i] = Some(recipient),
            Some(Ok(Err(error))) => return Err(error),
            Some(Err(error)) => {
                return Err(BenchError::Setup(format!("registering a device: {error}")));
            }
            None => break,
        }
    }
    registered
        .into_iter()
        .map(|r| r.ok_or_else(|| BenchError::Setup("a receiving device went unregistered".into())))
        .collect()
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
    let receivers = register_receivers(http, receiving, receiving_devices(args)).await?;
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
async fn wake_all(http: &JsonClient, relay: &DevRelay, names: &[String]) {
    let mut in_flight = tokio::task::JoinSet::new();
    for name in names {
        let url = format!(
            "{}/_courier/v1/destinations/{}/wake",
            relay.rpc_url,
            crate::tools::plain_http::encode_segment(name)
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
pub(super) async fn run_in_process(
    args: &BenchArgs,
    http: &JsonClient,
) -> Result<BenchReport, BenchError> {
    let pair = DevPair::start(&DevPairOptions {
        config_a: args.config_a.clone(),
        config_b: args.config_b.clone(),
        data_parent: args.data_dir.clone(),
        worker_threads: args.relay_threads,
        // One connection per receiving device and the probe, the senders'
        // pool, and some slack.
        client_connections: Some(super::receiving_devices(args) + args.concurrency + 64),
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
    let (outcome, load) = run_workload(args, &endpoints, delivery).await?;
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
        reading: UsageReading::Cpu {
            cpu: process_after.cpu.saturating_sub(process_before.cpu),
            peak_rss_kib: Some(process_after.peak_rss_kib),
        },
        note: Some("both relays share this process: peak RSS covers A, B and the generator".into()),
    }];
    if queued_rss_kib > 0 {
        usage.push(Usage {
            what: "process RSS with every message queued".into(),
            reading: UsageReading::RssSample {
                rss_kib: queued_rss_kib,
            },
            note: Some(
                "VmRSS just before the destinations came back: both relays and the \
                 generator, no sink state yet"
                    .into(),
            ),
        });
    }
    let groups = thread_cpu_by_group(&threads_before, &threads_after, THREAD_GROUPS);
    // Only a relay that received over `/sync` or sent has a per-message
    // cost: B is idle in a local or sink run.
    let relay_cpu = RelayCpu {
        a: Some(groups.get(RELAY_A).copied().unwrap_or_default()),
        b: (!args.local && args.destinations.is_none())
            .then(|| groups.get(RELAY_B).copied().unwrap_or_default()),
        store_writers: Some(groups.get(STORE_WRITERS).copied().unwrap_or_default()),
    };
    let mut listed = Duration::ZERO;
    for (group, cpu) in &groups {
        listed += *cpu;
        usage.push(Usage {
            what: (*group).to_owned(),
            reading: UsageReading::Cpu {
                cpu: *cpu,
                peak_rss_kib: None,
            },
            note: None,
        });
    }
    let whole = process_after.cpu.saturating_sub(process_before.cpu);
    usage.push(Usage {
        what: "threads that exited during the run".into(),
        reading: UsageReading::Cpu {
            cpu: whole.saturating_sub(listed),
            peak_rss_kib: None,
        },
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
            relay_cpu,
            wall,
            load,
        },
    ))
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
}
