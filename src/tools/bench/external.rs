//! The external mode of `courier bench`: any pair of homeservers given by
//! base URL and access tokens (`--sender-url`, `--sender-token`,
//! `--receiver-url`, `--receiver-tokens-file`, `--probe-token`); the devices
//! are named by `/account/whoami`, and the servers' CPU and peak RSS are read
//! from `/proc/<pid>` (`--sender-pid`, `--receiver-pid`) and give the
//! per-message CPU figures of relay A and relay B. The connections have the
//! same shape as in-process (one per receiving device, the senders' own).
//!
//! It starts nothing and registers nothing: the devices must exist.

use std::time::Instant;

use serde::Deserialize;

use super::procfs::{ProcSample, sample_process};
use super::workload::{Delivery, Endpoints, Recipient};
use super::{
    BenchArgs, BenchError, BenchReport, Measured, RelayCpu, Usage, UsageReading, run_workload,
    workload_of,
};
use crate::tools::plain_http::JsonClient;

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

pub(super) async fn run_external(
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
    let (outcome, load) = run_workload(args, &endpoints, Delivery::Sync).await?;
    let wall = started.elapsed();
    let mut usage = Vec::new();
    let mut relay_cpu = RelayCpu {
        a: None,
        b: None,
        store_writers: None,
    };
    for (role, pid, sample) in before {
        let after = sample_process(&pid.to_string())?;
        let cpu = after.cpu.saturating_sub(sample.cpu);
        match role {
            "sender" => relay_cpu.a = Some(cpu),
            _ => relay_cpu.b = Some(cpu),
        }
        usage.push(Usage {
            what: format!("{role} server (pid {pid})"),
            reading: UsageReading::Cpu {
                cpu,
                peak_rss_kib: Some(after.peak_rss_kib),
            },
            note: Some("peak RSS over the process lifetime".into()),
        });
    }
    let self_after = sample_process("self")?;
    usage.push(Usage {
        what: "load generator (this process)".into(),
        reading: UsageReading::Cpu {
            cpu: self_after.cpu.saturating_sub(self_before.cpu),
            peak_rss_kib: Some(self_after.peak_rss_kib),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_skip_comments_and_blanks() {
        let tokens = parse_tokens("# receivers\n\n  tok1 \ntok2\n#tok3\n");
        assert_eq!(tokens, vec!["tok1", "tok2"]);
    }
}
