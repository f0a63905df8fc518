//! `courier bench` in external mode against real relays on loopback: the
//! load generator must count every message exactly once, report rates and
//! latencies, and read the server's CPU and RSS from `/proc` (the test
//! relays run in this process, so their "pid" is ours).

use crate::support::TestRelay;
use clap::Parser;
use courier::tools::bench::{BenchArgs, run_bench};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(argv: &[String]) -> BenchArgs {
    Wrapper::try_parse_from(std::iter::once("bench".to_owned()).chain(argv.iter().cloned()))
        .expect("bench arguments parse")
        .args
}

/// Registers `count` receiving devices (and a probe device) on `relay`,
/// writes their tokens to a file, and returns the file.
async fn receivers(relay: &TestRelay, count: usize) -> tempfile::NamedTempFile {
    let server = &relay.server_name;
    let mut lines = String::from("# bench receivers\n");
    for i in 0..count {
        let token = format!("recv{i}");
        relay
            .register_device(&format!("@recv{i}:{server}"), "RECV", &token)
            .await;
        lines.push_str(&token);
        lines.push('\n');
    }
    relay
        .register_device(&format!("@probe:{server}"), "PROBE", "probe")
        .await;
    let file = tempfile::NamedTempFile::new().expect("token file");
    std::fs::write(file.path(), lines).expect("token file written");
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_workload_counts_every_message_once() {
    let relay = TestRelay::spawn().await;
    relay
        .register_device(&format!("@sender:{}", relay.server_name), "SEND", "sender")
        .await;
    let tokens = receivers(&relay, 12).await;
    let pid = std::process::id().to_string();
    let argv: Vec<String> = [
        "--messages",
        "600",
        "--per-call",
        "10",
        "--concurrency",
        "4",
        "--payload",
        "300",
        "--probe-ms",
        "50",
        "--duration",
        "60",
        "--drain-timeout",
        "30",
        "--sender-url",
        &relay.client_url,
        "--sender-token",
        "sender",
        "--receiver-tokens-file",
        &tokens.path().display().to_string(),
        "--probe-token",
        "probe",
        "--sender-pid",
        &pid,
        "--label",
        "test-local",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let report = run_bench(&args(&argv)).await.expect("bench runs");
    let o = &report.outcome;
    assert!(report.ok(), "report: {}", report.to_json());
    assert_eq!((o.attempted, o.accepted, o.delivered), (600, 600, 600));
    assert_eq!((o.duplicates, o.misdelivered, o.undelivered), (0, 0, 0));
    assert!(o.probes_sent > 0 && o.probes_delivered == o.probes_accepted);
    let latency = report.latency.expect("latencies recorded");
    assert_eq!(latency.count, 600);
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    assert!(report.delivered_per_second() > 0.0);
    let json = report.to_json();
    assert_eq!(json["delivered"], 600);
    assert_eq!(json["workload"]["receivers"], 12);
    let sender_usage = &json["usage"][0];
    assert!(
        sender_usage["what"]
            .as_str()
            .is_some_and(|w| w.contains("sender"))
    );
    assert!(
        sender_usage["peak_rss_mib"]
            .as_f64()
            .is_some_and(|m| m > 0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_workload_crosses_federation() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    a.register_device(&format!("@sender:{}", a.server_name), "SEND", "sender")
        .await;
    let tokens = receivers(&b, 5).await;
    let argv: Vec<String> = [
        "--messages",
        "300",
        "--per-call",
        "5",
        "--concurrency",
        "4",
        "--probe-ms",
        "100",
        "--duration",
        "60",
        "--drain-timeout",
        "60",
        "--sender-url",
        &a.client_url,
        "--sender-token",
        "sender",
        "--receiver-url",
        &b.client_url,
        "--receiver-tokens-file",
        &tokens.path().display().to_string(),
        "--probe-token",
        "probe",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let report = run_bench(&args(&argv)).await.expect("bench runs");
    assert!(report.ok(), "report: {}", report.to_json());
    assert_eq!(report.outcome.delivered, 300);
    assert_eq!(report.outcome.duplicates, 0);
}
