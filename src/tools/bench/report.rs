//! The benchmark's result: rates, latency percentiles, resource use, the
//! cost per delivered message (each relay's CPU microseconds, the receivers'
//! `/sync` answers) and the delivery check, printed as a short human summary
//! or as one JSON object (`--json`) whose keys are the figures BENCHMARKS.md
//! quotes.

use std::time::Duration;

use serde_json::{Value, json};

use super::BenchArgs;
use super::stats::{LatencySummary, summarize};
use super::workload::{Endpoints, Outcome, Workload};

/// Resource use of one process or thread group.
#[derive(Debug, Clone)]
pub struct Usage {
    pub what: String,
    pub reading: UsageReading,
    pub note: Option<String>,
}

/// What a `Usage` row measured, which decides how it is printed.
#[derive(Debug, Clone, Copy)]
pub enum UsageReading {
    /// CPU time over the run, with the peak resident set (`VmHWM`, over the
    /// process lifetime) where it is known.
    Cpu {
        cpu: Duration,
        peak_rss_kib: Option<u64>,
    },
    /// The resident set (`VmRSS`) sampled at one instant; no CPU figure.
    RssSample { rss_kib: u64 },
}

impl UsageReading {
    /// CPU time and a memory figure in KiB, as the JSON report has always
    /// carried them (`cpu_s`, `peak_rss_mib`): a sample is zero CPU and its
    /// RSS.
    fn cpu_and_rss_kib(self) -> (Duration, Option<u64>) {
        match self {
            UsageReading::Cpu { cpu, peak_rss_kib } => (cpu, peak_rss_kib),
            UsageReading::RssSample { rss_kib } => (Duration::ZERO, Some(rss_kib)),
        }
    }
}

/// The machine's 1-minute load average (`/proc/loadavg`) around the run:
/// other load on shared cores skews every figure.
#[derive(Debug, Clone, Copy)]
pub struct LoadAverage {
    pub before: Option<f64>,
    pub after: Option<f64>,
}

/// CPU time of each relay over the run, as the mode could attribute it,
/// for the per-message figures.
#[derive(Debug, Clone, Copy)]
pub struct RelayCpu {
    /// The sending relay (A): its runtime threads in-process, the sender
    /// process in external mode (with `--sender-pid`).
    pub a: Option<Duration>,
    /// The receiving relay (B), likewise; `None` for a local or sink run.
    pub b: Option<Duration>,
    /// In-process: the SQLite writer threads of both relays, which cannot
    /// be told apart by thread name; counted in neither `a` nor `b`.
    pub store_writers: Option<Duration>,
}

/// What one run measured, before summarizing.
pub struct Measured {
    pub outcome: Outcome,
    pub usage: Vec<Usage>,
    pub relay_cpu: RelayCpu,
    /// Wall time of the workload (setup excluded).
    pub wall: Duration,
    pub load: LoadAverage,
}

pub struct BenchReport {
    pub label: String,
    pub mode: String,
    pub workload: Workload,
    pub receivers: usize,
    pub outcome: Outcome,
    pub latency: Option<LatencySummary>,
    pub probe_latency: Option<LatencySummary>,
    pub usage: Vec<Usage>,
    pub relay_cpu: RelayCpu,
    pub wall: Duration,
    pub load: LoadAverage,
}

fn per_second(count: u64, span: Duration) -> f64 {
    if span.is_zero() {
        0.0
    } else {
        count as f64 / span.as_secs_f64()
    }
}

/// `count` per delivered message, `None` when nothing was delivered.
fn per_delivered(count: f64, delivered: u64) -> Option<f64> {
    (delivered > 0).then(|| count / delivered as f64)
}

/// Rounds to `places` decimals, for the JSON figures.
fn round_to(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

fn latency_json(summary: &Option<LatencySummary>) -> Value {
    match summary {
        None => Value::Null,
        Some(s) => json!({
            "count": s.count,
            "p50_ms": ms(s.p50),
            "p90_ms": ms(s.p90),
            "p99_ms": ms(s.p99),
            "max_ms": ms(s.max),
            "mean_ms": ms(s.mean),
        }),
    }
}

/// One line of the human summary for a `Usage` row: CPU rows as `cpu`, an
/// RSS sample as `memory`.
fn usage_line(u: &Usage) -> String {
    let note = u
        .note
        .as_ref()
        .map(|n| format!("  ({n})"))
        .unwrap_or_default();
    match u.reading {
        UsageReading::Cpu { cpu, peak_rss_kib } => {
            let rss = peak_rss_kib
                .map(|k| format!(", peak RSS {:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_default();
            format!(
                "  cpu         {:<46} {:>7.2} s{rss}{note}",
                u.what,
                cpu.as_secs_f64()
            )
        }
        UsageReading::RssSample { rss_kib } => format!(
            "  memory      {:<46} {:>7.1} MiB{note}",
            u.what,
            rss_kib as f64 / 1024.0
        ),
    }
}

impl BenchReport {
    pub fn new(
        args: &BenchArgs,
        mode: String,
        endpoints: &Endpoints,
        workload: Workload,
        measured: Measured,
    ) -> BenchReport {
        let Measured {
            mut outcome,
            usage,
            relay_cpu,
            wall,
            load,
        } = measured;
        let latency = summarize(&mut outcome.latencies_us);
        let probe_latency = summarize(&mut outcome.probe_latencies_us);
        BenchReport {
            label: args.label.clone().unwrap_or_else(|| {
                format!(
                    "N={} K={} C={}{}",
                    args.messages,
                    args.per_call,
                    args.concurrency,
                    if args.local { " local" } else { "" }
                )
            }),
            mode,
            workload,
            receivers: endpoints.receivers.len(),
            outcome,
            latency,
            probe_latency,
            usage,
            relay_cpu,
            wall,
            load,
        }
    }

    /// CPU microseconds per delivered bulk message of a CPU figure (the
    /// probe's few messages are not counted, their cost is).
    pub fn cpu_us_per_delivered(&self, cpu: Option<Duration>) -> Option<f64> {
        per_delivered(cpu?.as_secs_f64() * 1e6, self.outcome.delivered)
    }

    /// The bulk receivers' `/sync` answers per delivered bulk message.
    pub fn sync_responses_per_delivered(&self) -> Option<f64> {
        per_delivered(self.outcome.sync_responses? as f64, self.outcome.delivered)
    }

    /// Probe messages accepted but never delivered.
    pub fn probes_undelivered(&self) -> u64 {
        self.outcome
            .probes_accepted
            .saturating_sub(self.outcome.probes_delivered)
    }

    /// Every accepted message delivered exactly once, to the right device,
    /// and no send failed.
    pub fn ok(&self) -> bool {
        let o = &self.outcome;
        o.undelivered == 0
            && self.probes_undelivered() == 0
            && o.duplicates == 0
            && o.misdelivered == 0
            && o.failed == 0
            && o.first_error.is_none()
    }

    pub fn accepted_per_second(&self) -> f64 {
        per_second(self.outcome.accepted, self.outcome.accept_span)
    }

    pub fn delivered_per_second(&self) -> f64 {
        per_second(self.outcome.delivered, self.outcome.delivery_span)
    }

    /// Deliveries per second from the moment the destinations came back
    /// (catch-up runs only).
    pub fn catch_up_per_second(&self) -> Option<f64> {
        let resumed = self.outcome.resumed_at?;
        Some(per_second(
            self.outcome.delivered,
            self.outcome.delivery_span.saturating_sub(resumed),
        ))
    }

    pub fn to_json(&self) -> Value {
        let o = &self.outcome;
        let w = &self.workload;
        json!({
            "catch_up": o.resumed_at.map(|r| json!({
                "destinations_back_at_s": r.as_secs_f64(),
                "catch_up_per_s": self.catch_up_per_second().map(f64::round),
            })),
            "label": self.label,
            "mode": self.mode,
            "ok": self.ok(),
            "workload": {
                "messages": w.messages,
                "per_call": w.per_call,
                "concurrency": w.concurrency,
                "payload_bytes": w.payload_bytes,
                "receivers": self.receivers,
                "duration_cap_s": w.duration.as_secs(),
                "probe_interval_ms": w.probe_interval.map(|d| d.as_millis() as u64),
            },
            "attempted": o.attempted,
            "accepted": o.accepted,
            "failed": o.failed,
            "delivered": o.delivered,
            "undelivered": o.undelivered,
            "duplicates": o.duplicates,
            "misdelivered": o.misdelivered,
            "stale_events_ignored": o.stale,
            "capped_by_duration": o.capped,
            "drain_timed_out": o.drain_timed_out,
            "accept_span_s": o.accept_span.as_secs_f64(),
            "delivery_span_s": o.delivery_span.as_secs_f64(),
            "accepted_per_s": self.accepted_per_second().round(),
            "delivered_per_s": self.delivered_per_second().round(),
            "cpu_us_per_delivered_a": self.cpu_us_per_delivered(self.relay_cpu.a).map(|v| round_to(v, 1)),
            "cpu_us_per_delivered_b": self.cpu_us_per_delivered(self.relay_cpu.b).map(|v| round_to(v, 1)),
            "cpu_us_per_delivered_store_writers":
                self.cpu_us_per_delivered(self.relay_cpu.store_writers).map(|v| round_to(v, 1)),
            "sync_responses": o.sync_responses,
            "sync_responses_per_delivered": self.sync_responses_per_delivered().map(|v| round_to(v, 4)),
            "latency": latency_json(&self.latency),
            "probe": {
                "sent": o.probes_sent,
                "accepted": o.probes_accepted,
                "delivered": o.probes_delivered,
                "latency": latency_json(&self.probe_latency),
            },
            "usage": self.usage.iter().map(|u| {
                let (cpu, rss_kib) = u.reading.cpu_and_rss_kib();
                json!({
                    "what": u.what,
                    "cpu_s": (cpu.as_secs_f64() * 100.0).round() / 100.0,
                    "peak_rss_mib": rss_kib.map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0),
                    "note": u.note,
                })
            }).collect::<Vec<_>>(),
            "wall_s": self.wall.as_secs_f64(),
            "load_average_1m": { "before": self.load.before, "after": self.load.after },
            "first_error": o.first_error,
        })
    }

    pub fn print_text(&self) {
        let o = &self.outcome;
        let w = &self.workload;
        println!("courier bench: {}", self.label);
        println!("  mode        {}", self.mode);
        println!(
            "  workload    N={} K={} C={} payload≈{} B, {} receiving devices, probe {}",
            w.messages,
            w.per_call,
            w.concurrency,
            w.payload_bytes,
            self.receivers,
            match w.probe_interval {
                Some(d) => format!("every {} ms", d.as_millis()),
                None => "off".into(),
            }
        );
        println!(
            "  accepted    {} of {} attempted in {:.2} s = {:.0} msgs/s{}",
            o.accepted,
            o.attempted,
            o.accept_span.as_secs_f64(),
            self.accepted_per_second(),
            if o.capped { " (duration cap hit)" } else { "" }
        );
        println!(
            "  delivered   {} in {:.2} s = {:.0} msgs/s end to end",
            o.delivered,
            o.delivery_span.as_secs_f64(),
            self.delivered_per_second()
        );
        if let Some(line) = self.per_message_line() {
            println!("{line}");
        }
        if let (Some(n), Some(per)) = (o.sync_responses, self.sync_responses_per_delivered()) {
            println!(
                "  /sync       {n} responses to bulk receivers = {per:.3} per delivered message"
            );
        }
        if let (Some(resumed), Some(rate)) = (o.resumed_at, self.catch_up_per_second()) {
            println!(
                "  catch-up    destinations back at {:.2} s; {} delivered by {:.2} s = {:.0} msgs/s",
                resumed.as_secs_f64(),
                o.delivered,
                o.delivery_span.as_secs_f64(),
                rate
            );
        }
        if let Some(l) = &self.latency {
            println!(
                "  latency     p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (send start → {})",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.max),
                if self.mode.contains("sink") {
                    "the sink receives it"
                } else {
                    "/sync returns it"
                }
            );
        }
        match &self.probe_latency {
            Some(l) => println!(
                "  probe       {} delivered of {} sent: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
                o.probes_delivered,
                o.probes_sent,
                ms(l.p50),
                ms(l.p99),
                ms(l.max)
            ),
            None if o.probes_sent > 0 => {
                println!("  probe       {} sent, none delivered", o.probes_sent)
            }
            None => {}
        }
        for u in &self.usage {
            println!("{}", usage_line(u));
        }
        println!(
            "  check       undelivered {}  probe undelivered {}  duplicates {}  misdelivered {}  failed sends {}  stale ignored {}",
            o.undelivered,
            self.probes_undelivered(),
            o.duplicates,
            o.misdelivered,
            o.failed,
            o.stale
        );
        if let Some(error) = &o.first_error {
            println!("  first error {error}");
        }
        let load = |l: Option<f64>| l.map(|l| format!("{l:.2}")).unwrap_or_else(|| "?".into());
        println!(
            "  machine     1-min load average {} before, {} after ({} CPUs)",
            load(self.load.before),
            load(self.load.after),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        if o.drain_timed_out {
            println!("  drain       timed out waiting for deliveries");
        }
        println!(
            "  result      {}",
            if self.ok() {
                "every accepted message delivered exactly once"
            } else {
                "FAILED"
            }
        );
    }

    /// The text report's line of CPU microseconds per delivered message, if
    /// any figure is known.
    fn per_message_line(&self) -> Option<String> {
        let figures: Vec<String> = [
            ("relay A", self.relay_cpu.a),
            ("relay B", self.relay_cpu.b),
            ("SQLite writers (A and B)", self.relay_cpu.store_writers),
        ]
        .into_iter()
        .filter_map(|(what, cpu)| {
            self.cpu_us_per_delivered(cpu)
                .map(|us| format!("{what} {us:.1} µs"))
        })
        .collect();
        (!figures.is_empty()).then(|| {
            format!(
                "  cpu per msg {}  per delivered message",
                figures.join("  ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of `delivered` messages, `sync_responses` answers and the
    /// relays' CPU; every other figure zero.
    fn report(delivered: u64, sync_responses: Option<u64>, relay_cpu: RelayCpu) -> BenchReport {
        BenchReport {
            label: "test".into(),
            mode: "test".into(),
            workload: Workload {
                messages: delivered,
                per_call: 1,
                concurrency: 1,
                payload_bytes: 0,
                duration: Duration::ZERO,
                probe_interval: None,
                drain_timeout: Duration::ZERO,
                event_type: "t".into(),
            },
            receivers: 100,
            outcome: Outcome {
                attempted: delivered,
                accepted: delivered,
                failed: 0,
                delivered,
                duplicates: 0,
                misdelivered: 0,
                stale: 0,
                undelivered: 0,
                probes_sent: 0,
                probes_accepted: 0,
                probes_delivered: 0,
                sync_responses,
                accept_span: Duration::ZERO,
                delivery_span: Duration::ZERO,
                capped: false,
                drain_timed_out: false,
                resumed_at: None,
                latencies_us: Vec::new(),
                probe_latencies_us: Vec::new(),
                first_error: None,
            },
            latency: None,
            probe_latency: None,
            usage: Vec::new(),
            relay_cpu,
            wall: Duration::ZERO,
            load: LoadAverage {
                before: None,
                after: None,
            },
        }
    }

    #[test]
    fn per_message_figures_divide_by_the_delivered_messages() {
        let cpu = RelayCpu {
            a: Some(Duration::from_millis(250)),
            b: Some(Duration::from_millis(125)),
            store_writers: None,
        };
        let json = report(2_000, Some(500), cpu).to_json();
        assert_eq!(json["cpu_us_per_delivered_a"], 125.0);
        assert_eq!(json["cpu_us_per_delivered_b"], 62.5);
        assert_eq!(json["cpu_us_per_delivered_store_writers"], Value::Null);
        assert_eq!(json["sync_responses"], 500);
        assert_eq!(json["sync_responses_per_delivered"], 0.25);
        let line = report(2_000, Some(500), cpu).per_message_line();
        assert_eq!(
            line.as_deref(),
            Some("  cpu per msg relay A 125.0 µs  relay B 62.5 µs  per delivered message")
        );

        // Nothing delivered, or a sink run: no figures rather than infinities.
        let empty = report(0, Some(3), cpu);
        assert_eq!(empty.to_json()["cpu_us_per_delivered_a"], Value::Null);
        assert_eq!(empty.to_json()["sync_responses_per_delivered"], Value::Null);
        assert_eq!(empty.per_message_line(), None);
        let sink = report(10, None, cpu).to_json();
        assert_eq!(sink["sync_responses"], Value::Null);
        assert_eq!(sink["sync_responses_per_delivered"], Value::Null);
    }

    #[test]
    fn an_rss_sample_prints_as_memory_and_keeps_its_json_figures() {
        let sample = Usage {
            what: "process RSS with every message queued".into(),
            reading: UsageReading::RssSample { rss_kib: 118_272 },
            note: Some("VmRSS".into()),
        };
        let line = usage_line(&sample);
        assert!(line.starts_with("  memory      process RSS"), "{line}");
        assert!(line.ends_with("  115.5 MiB  (VmRSS)"), "{line}");
        assert!(!line.contains("cpu") && !line.contains("peak"), "{line}");
        assert_eq!(
            sample.reading.cpu_and_rss_kib(),
            (Duration::ZERO, Some(118_272))
        );

        let cpu = Usage {
            what: "whole process".into(),
            reading: UsageReading::Cpu {
                cpu: Duration::from_millis(1500),
                peak_rss_kib: Some(2048),
            },
            note: None,
        };
        let line = usage_line(&cpu);
        assert!(line.starts_with("  cpu         whole process"), "{line}");
        assert!(line.ends_with("   1.50 s, peak RSS 2.0 MiB"), "{line}");
    }
}
