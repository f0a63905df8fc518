//! Asking several remote servers at once for one client request (SPEC-E2EE
//! §2.2, §2.3): at most `concurrency` calls in flight, all of them bounded
//! by one deadline, each server's failure reported as its `failures` entry
//! (`{"status", "errcode"?, "message"}`) instead of failing the request. A
//! server that has not answered by the deadline is a failure too; its call
//! is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::identifiers::ServerName;

use super::remote::{RemoteError, RemoteKeys};

/// The answers that came back, and a `failures` map for the rest.
pub struct FanOut<A> {
    pub answers: Vec<(ServerName, A)>,
    pub failures: Map<String, Value>,
}

/// Calls `call(remote, server, request, time_left)` for every server of
/// `requests`, `concurrency` at a time, until `timeout` has passed.
/// `operation` labels the failure metric (`query`, `claim`).
pub async fn ask_servers<Q, A, F, Fut>(
    remote: &Arc<dyn RemoteKeys>,
    requests: BTreeMap<ServerName, Q>,
    timeout: Duration,
    concurrency: usize,
    operation: &'static str,
    call: F,
) -> FanOut<A>
where
    Q: Send + 'static,
    A: Send + 'static,
    F: Fn(Arc<dyn RemoteKeys>, ServerName, Q, Duration) -> Fut,
    Fut: Future<Output = Result<A, RemoteError>> + Send + 'static,
{
    let deadline = Instant::now() + timeout;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut pending: BTreeSet<ServerName> = requests.keys().cloned().collect();
    let mut tasks = JoinSet::new();
    for (server, request) in requests {
        let permits = permits.clone();
        let call = call(remote.clone(), server.clone(), request, timeout);
        tasks.spawn(async move {
            let result = match tokio::time::timeout_at(deadline, permits.acquire_owned()).await {
                Ok(Ok(_permit)) => match tokio::time::timeout_at(deadline, call).await {
                    Ok(result) => result,
                    Err(_) => Err(RemoteError::Timeout),
                },
                Ok(Err(_)) | Err(_) => Err(RemoteError::Timeout),
            };
            (server, result)
        });
    }
    let mut out = FanOut {
        answers: Vec::new(),
        failures: Map::new(),
    };
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        let Ok((server, result)) = joined else {
            // A panicked call: its server stays pending and is reported
            // as a failure below.
            continue;
        };
        pending.remove(&server);
        match result {
            Ok(answer) => out.answers.push((server, answer)),
            Err(error) => {
                record_failure(&mut out.failures, &server, &error, operation);
            }
        }
    }
    tasks.abort_all();
    for server in pending {
        record_failure(&mut out.failures, &server, &RemoteError::Timeout, operation);
    }
    out
}

fn record_failure(
    failures: &mut Map<String, Value>,
    server: &ServerName,
    error: &RemoteError,
    operation: &'static str,
) {
    let reason = match error {
        RemoteError::Unreachable(_) => "unreachable",
        RemoteError::Timeout => "timeout",
        RemoteError::Refused { .. } => "refused",
        RemoteError::BadResponse(_) => "bad_response",
    };
    tracing::info!(server = %server, operation, %error, "remote key server failed");
    metrics::counter!("courier_e2ee_remote_failures_total", "operation" => operation, "reason" => reason)
        .increment(1);
    let entry = match error {
        RemoteError::Refused { status, errcode } => {
            let mut entry = json!({ "status": status, "message": error.to_string() });
            if let (Some(errcode), Some(object)) = (errcode, entry.as_object_mut()) {
                object.insert("errcode".to_owned(), json!(errcode));
            }
            entry
        }
        RemoteError::Timeout => json!({ "status": 503, "message": "Timed out" }),
        RemoteError::Unreachable(_) => json!({ "status": 503, "message": "Not reachable" }),
        RemoteError::BadResponse(_) => {
            json!({ "status": 503, "message": "The server sent an invalid answer" })
        }
    };
    failures.insert(server.as_str().to_owned(), entry);
}
