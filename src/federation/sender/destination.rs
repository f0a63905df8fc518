//! One destination's task: it owns that destination's state as one enum
//! (`Idle`, `Sending`, `BackingOff`) and is the only code that sends to it,
//! so at most one transaction is ever in flight per destination. The stored
//! outbox is the truth: a recorded in-flight transaction is resent with the
//! same txnId and bytes; otherwise the oldest rows are packed into a new one,
//! recorded before it is sent, and deleted only on the peer's 200. Failures
//! back off on the persisted schedule; a refused batch is split in halves
//! down to single EDUs, and an EDU refused alone `quarantine_after` times is
//! quarantined so the rows behind it still go.
//!
//! Refusals (SECURITY-REVIEW F6, F14) are persisted (`store::RefusalState`
//! and `outbox.refusals`, the solo refusals of each row), so a restart or a
//! lease move resumes the narrowing and the counts. An EDU is quarantined
//! for good only once the peer is seen to accept other EDUs: a transaction
//! accepted since the narrowing began. Before that, it is set aside *on
//! probation* (in quarantine, `probation_seqs`) while the EDUs behind it
//! are tried: the next accepted transaction confirms it. A peer that goes
//! on refusing until more than `refusing_after` EDUs would be on probation
//! refuses everything (a proxy, a bug): the destination is marked
//! *refusing*, the EDUs on probation go back to their places in the queue
//! (requeued in bulk, order kept), and the head of the queue is resent,
//! unsplit, on the normal backoff schedule; the first accepted transaction
//! clears the mark, so the whole queue then goes in order. Once that
//! backoff reaches `retry.max` the mark is cleared and narrowing starts
//! afresh, so a bad EDU at the head is still found after a recovery.
//!
//! With several workers, every outbox write the task makes carries the
//! fence of the lease it acquired last (`Store::acquire_lease`); a write
//! fenced out (another worker claimed the destination since) changed
//! nothing, and the task stops sending there as on a failed lease check
//! (`courier_lease_fenced_writes_total`).
//!
//! It does not decide when a destination task exists (sender) and does not
//! know HTTP (client).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::federation::outbound::client::FederationClient;
use crate::federation::outbound::client_error::ClientError;
use crate::federation::sender::backoff;
use crate::federation::sender::transaction::{
    MAX_EDU_BYTES, MAX_EDUS, TxnFailure, TxnIds, build_body, rejects_our_key,
};
use crate::identifiers::ServerName;
use crate::store::device_lists::finish_outbound_edu;
use crate::store::{Fence, InFlightTxn, OutboxEdu, RefusalState, RetryState, Store, StoreError};

/// An idle task ends after this long without work.
pub const IDLE_EXIT: Duration = Duration::from_secs(60);
/// Wait after a store error before trying again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// What the dispatcher tells a destination task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// New outbox rows.
    Wake,
    /// The peer is reachable: reset the backoff and send now.
    PeerIsUp,
}

/// What every destination task shares.
pub struct SenderShared {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub client: Arc<FederationClient>,
    pub txn_ids: TxnIds,
    /// Bounds concurrent sends over all destinations; held only for the
    /// exchange, never during store work or discovery.
    pub send_permits: Semaphore,
}

/// The destination's state, owned by its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing known to send; waiting for a signal.
    Idle,
    /// Sending until the outbox is empty or a send fails.
    Sending,
    /// Waiting out the backoff (or a peer's Retry-After).
    BackingOff { until: Instant },
}

/// How one send attempt ended.
pub(super) enum Step {
    /// The outbox is empty.
    Drained,
    /// A transaction was delivered (or split); look for more at once.
    Continue,
    /// Wait this long before trying again.
    Wait(Duration),
}

pub struct DestinationTask {
    pub(super) destination: String,
    server_name: Option<ServerName>,
    pub(super) shared: Arc<SenderShared>,
    signals: mpsc::UnboundedReceiver<Signal>,
    retire: mpsc::UnboundedSender<(String, u64)>,
    id: u64,
    /// The destination's persisted refusal history, as last read or written
    /// by this task; `refusals_loaded` is false until it is read, and again
    /// after a store error or while another worker holds the lease.
    pub(super) refusals: RefusalState,
    refusals_loaded: bool,
    /// The last attempt succeeded and the outbox was empty: a `PeerIsUp`
    /// while idle has nothing to reset or send, and costs no store access.
    clean: bool,
    /// This task settled the last recorded transaction (acked or refused)
    /// and has not recorded another: the next step need not read the
    /// in-flight record back. False at start and after any store error, so
    /// a transaction recorded by an earlier run or another worker is always
    /// found (and `begin_txn` refuses a second one in any case).
    pub(super) settled: bool,
    /// When this task last warned that the peer rejects our signing key.
    key_rejected_warned: Option<Instant>,
    /// The fence of the lease acquired last (`holds_lease`), which every
    /// outbox write passes. None before the first check and once lost.
    fence: Option<Fence>,
}

/// The least time between two "peer rejects our signing key" warnings for
/// one destination.
const KEY_REJECTED_WARN_EVERY: Duration = Duration::from_secs(60);

impl DestinationTask {
    pub fn new(
        destination: String,
        shared: Arc<SenderShared>,
        signals: mpsc::UnboundedReceiver<Signal>,
        retire: mpsc::UnboundedSender<(String, u64)>,
        id: u64,
    ) -> Self {
        DestinationTask {
            server_name: ServerName::parse(&destination).ok(),
            destination,
            shared,
            signals,
            retire,
            id,
            refusals: RefusalState::default(),
            refusals_loaded: false,
            clean: false,
            settled: false,
            key_rejected_warned: None,
            fence: None,
        }
    }

    /// Runs until shutdown, or until idle and retired by the dispatcher.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let span = tracing::info_span!("destination", destination = %self.destination);
        async move {
            let mut state = self.initial_state().await;
            let mut retiring = false;
            loop {
                state = match state {
                    State::Idle => {
                        let signal = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            signal = self.signals.recv() => signal,
                            _ = tokio::time::sleep(IDLE_EXIT), if !retiring => {
                                // Ask to be retired; keep serving signals
                                // already queued until the channel closes.
                                retiring = true;
                                let _ = self.retire.send((self.destination.clone(), self.id));
                                continue;
                            }
                        };
                        // Every signal queued meanwhile (say, wakes sent while
                        // the last transaction was in flight) is answered by
                        // this one look at the store.
                        let signal = signal.map(|first| self.coalesce(first));
                        match signal {
                            None => return,
                            Some(Signal::PeerIsUp) if self.clean => State::Idle,
                            Some(Signal::PeerIsUp) => {
                                self.reset_backoff().await;
                                State::Sending
                            }
                            Some(Signal::Wake) => State::Sending,
                        }
                    }
                    State::BackingOff { until } => {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep_until(until) => State::Sending,
                            signal = self.signals.recv() => match signal {
                                None => return,
                                Some(Signal::PeerIsUp) => {
                                    self.reset_backoff().await;
                                    State::Sending
                                }
                                Some(Signal::Wake) => state,
                            },
                        }
                    }
                    State::Sending => {
                        let step = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            step = self.send_step() => step,
                        };
                        match step {
                            Step::Drained => State::Idle,
                            Step::Continue => State::Sending,
                            Step::Wait(delay) => State::BackingOff {
                                until: Instant::now() + delay,
                            },
                        }
                    }
                };
            }
        }
        .instrument(span)
        .await
    }

    /// `first` and every signal already queued, as one: `PeerIsUp` if any
    /// of them is, else `Wake`.
    fn coalesce(&mut self, first: Signal) -> Signal {
        let mut signal = first;
        while let Ok(next) = self.signals.try_recv() {
            if next == Signal::PeerIsUp {
                signal = Signal::PeerIsUp;
            }
        }
        signal
    }

    /// Sending, unless the persisted schedule says to wait.
    async fn initial_state(&mut self) -> State {
        match self.shared.store.retry_state(&self.destination).await {
            Ok(retry) => {
                self.clean = retry.failures == 0 && retry.retry_after_ms == 0;
                // Never longer than `retry.max`, whatever was persisted: a
                // clock that ran ahead when it was written (and was set
                // back since) must not stretch the wait.
                let wait_ms = retry.retry_after_ms.saturating_sub(crate::clock::now_ms());
                if wait_ms > 0 {
                    let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(u64::MAX))
                        .min(self.shared.config.federation.retry.max);
                    State::BackingOff {
                        until: Instant::now() + wait,
                    }
                } else {
                    State::Sending
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the retry state failed");
                State::BackingOff {
                    until: Instant::now() + STORE_RETRY,
                }
            }
        }
    }

    async fn reset_backoff(&mut self) {
        let store = self.shared.store.clone();
        match store.retry_state(&self.destination).await {
            Ok(retry) if retry.failures > 0 || retry.retry_after_ms > 0 => {
                let reset = RetryState {
                    failures: 0,
                    retry_after_ms: 0,
                    ..retry
                };
                // Under this task's lease; another worker's is its own.
                let fence = match self.fence.clone() {
                    Some(fence) => fence,
                    None => match self.holds_lease().await {
                        Ok(Some(fence)) => fence,
                        Ok(None) => return,
                        Err(error) => {
                            tracing::warn!(%error, "checking the lease failed");
                            return;
                        }
                    },
                };
                match store
                    .set_retry_state(&fence, &self.destination, &reset)
                    .await
                {
                    Ok(()) => self.clean = true,
                    Err(StoreError::Fenced { epoch, .. }) => return self.fenced_out(epoch),
                    Err(error) => tracing::warn!(%error, "resetting the retry state failed"),
                }
                tracing::info!("peer is up: backoff reset");
            }
            Ok(_) => self.clean = true,
            Err(error) => tracing::warn!(%error, "reading the retry state failed"),
        }
    }

    async fn send_step(&mut self) -> Step {
        match self.try_send_step().await {
            Ok(step) => step,
            Err(StoreError::Fenced { epoch, .. }) => {
                self.fenced_out(epoch);
                Step::Drained
            }
            Err(error) => {
                self.settled = false;
                self.refusals_loaded = false;
                tracing::warn!(%error, "store error while sending");
                Step::Wait(STORE_RETRY)
            }
        }
    }

    async fn try_send_step(&mut self) -> Result<Step, StoreError> {
        let shared = self.shared.clone();
        let store = &shared.store;
        let Some(server_name) = self.server_name.clone() else {
            tracing::error!("destination is not a valid server name; its rows stay queued");
            return Ok(Step::Wait(shared.config.federation.retry.max));
        };
        // Store work and discovery happen before a send permit is taken:
        // the permits bound sends in flight, and a destination whose
        // discovery is slow (bounded by `discovery_timeout`) must not hold
        // one while healthy destinations wait.
        let Some(fence) = self.holds_lease().await? else {
            self.refusals_loaded = false;
            return Ok(Step::Drained);
        };
        let leased_at = Instant::now();
        if !self.refusals_loaded {
            self.refusals = store.refusal_state(&self.destination).await?;
            self.refusals_loaded = true;
        }
        let recorded = if self.settled {
            None
        } else {
            store.in_flight(&self.destination).await?
        };
        let txn = match recorded {
            Some(txn) => txn,
            None => {
                let limit = self
                    .refusals
                    .split_limit
                    .unwrap_or(MAX_EDUS)
                    .clamp(1, MAX_EDUS);
                let mut edus = store
                    .peek_outbox(&self.destination, limit, MAX_EDU_BYTES)
                    .await?;
                finish_device_list_edus(&mut edus, shared.config.e2ee.device_names_over_federation);
                if edus.is_empty() {
                    return self.nothing_queued().await;
                }
                let body = build_body(
                    shared.config.server_name.as_str(),
                    crate::clock::now_ms(),
                    &edus,
                );
                let txn = InFlightTxn {
                    destination: self.destination.clone(),
                    txn_id: shared.txn_ids.next(),
                    seqs: edus.iter().map(|e| e.seq).collect(),
                    body,
                };
                self.settled = false;
                store.begin_txn(&fence, txn.clone()).await?;
                txn
            }
        };
        let span = tracing::info_span!("txn", txn_id = %txn.txn_id, edus = txn.seqs.len());
        if tracing::enabled!(tracing::Level::INFO) {
            tracing::info!(
                txn_id = %txn.txn_id,
                message_ids = %carried_message_ids(&txn.body).join(","),
                "sending a transaction"
            );
        }
        self.deliver(&server_name, txn, leased_at)
            .instrument(span)
            .await
    }

    /// The fence of the lease on the destination if this worker holds (and
    /// has just extended) it. Several workers on one database: a task sends
    /// only under its worker's lease (always held with a single-process
    /// store), and writes the outbox only under its fence.
    async fn holds_lease(&mut self) -> Result<Option<Fence>, StoreError> {
        let worker = &self.shared.config.worker;
        let lease_ms = i64::try_from(worker.lease_duration.as_millis()).unwrap_or(i64::MAX);
        let fence = self
            .shared
            .store
            .acquire_lease(
                &worker.name,
                &self.destination,
                crate::clock::now_ms(),
                lease_ms,
            )
            .await?;
        if fence.is_none() {
            tracing::debug!(worker = %worker.name, "destination leased by another worker");
            // The owner may record transactions meanwhile.
            self.settled = false;
        }
        self.fence.clone_from(&fence);
        Ok(fence)
    }

    /// The fence every outbox write passes: the one `holds_lease` got last.
    /// Without one (the lease was lost since) a write is fenced out.
    pub(super) fn fence(&self) -> Result<Fence, StoreError> {
        self.fence.clone().ok_or_else(|| StoreError::Fenced {
            destination: self.destination.clone(),
            worker: self.shared.config.worker.name.clone(),
            epoch: -1,
        })
    }

    /// A write under the fence of `epoch` changed nothing: another worker
    /// claimed the destination since. The task stops sending here.
    fn fenced_out(&mut self, epoch: i64) {
        let worker = &self.shared.config.worker.name;
        tracing::info!(%worker, epoch, "write fenced out (destination claimed by another worker)");
        metrics::counter!("courier_lease_fenced_writes_total").increment(1);
        self.settled = false;
        self.refusals_loaded = false;
        self.fence = None;
    }

    /// Resolves the destination, then sends `txn` under a send permit. The
    /// lease, checked at `leased_at`, is checked again first if resolving
    /// and waiting for the permit took longer than `[worker] recheck_ms`.
    async fn deliver(
        &mut self,
        server_name: &ServerName,
        txn: InFlightTxn,
        leased_at: Instant,
    ) -> Result<Step, StoreError> {
        let shared = self.shared.clone();
        let store = &shared.store;
        let result = match shared.client.resolve(server_name).await {
            Ok(endpoint) => {
                let _permit = shared
                    .send_permits
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                if leased_at.elapsed() > shared.config.worker.recheck_after
                    && self.holds_lease().await?.is_none()
                {
                    self.refusals_loaded = false;
                    return Ok(Step::Drained);
                }
                shared
                    .client
                    .send_transaction_to(server_name, &endpoint, &txn.txn_id, txn.body.as_bytes())
                    .await
            }
            // Not resolvable (or not in time): a failure like any other,
            // backed off on this destination's own schedule.
            Err(error) => Err(error),
        };
        let error = match result {
            Ok(_) => {
                store
                    .ack_txn(
                        &self.fence()?,
                        &self.destination,
                        &txn.txn_id,
                        crate::clock::now_ms(),
                    )
                    .await?;
                // ack_txn also reset the persisted retry state.
                self.clean = true;
                self.settled = true;
                tracing::debug!("delivered");
                metrics::counter!("courier_federation_transactions_total", "outcome" => "ok")
                    .increment(1);
                metrics::counter!("courier_federation_edus_sent_total")
                    .increment(txn.seqs.len() as u64);
                self.accepted(&txn).await?;
                return Ok(Step::Continue);
            }
            Err(error) => {
                let failure = TxnFailure::from_client(&error, shared.client.key_id());
                if rejects_our_key(&error, shared.client.key_id()) {
                    self.warn_key_rejected(&error);
                }
                failure
            }
        };
        metrics::counter!("courier_federation_transactions_total", "outcome" => error.outcome())
            .increment(1);
        match error {
            TxnFailure::Retry { reason } => self.back_off(reason, None).await,
            TxnFailure::RetryAfter { after, reason } => self.back_off(reason, Some(after)).await,
            TxnFailure::Refused { status, reason } => self.refused(&txn, status, reason).await,
        }
    }

    /// Warns that the peer rejects our signing key, at most once a minute
    /// for this destination (every retry would otherwise say it again).
    fn warn_key_rejected(&mut self, error: &ClientError) {
        let now = Instant::now();
        if self
            .key_rejected_warned
            .is_some_and(|at| now.duration_since(at) < KEY_REJECTED_WARN_EVERY)
        {
            return;
        }
        self.key_rejected_warned = Some(now);
        tracing::warn!(
            key_id = self.shared.client.key_id(),
            %error,
            "peer rejects our signing key (it may have cached another key under this id; \
             see `courier keygen --rotate`)"
        );
    }

    /// Persists the failure and the time of the next attempt.
    pub(super) async fn back_off(
        &mut self,
        reason: String,
        after: Option<Duration>,
    ) -> Result<Step, StoreError> {
        let store = &self.shared.store;
        let policy = self.shared.config.federation.retry;
        let previous = store.retry_state(&self.destination).await?;
        let (failures, delay) = match after {
            // A peer's Retry-After is honoured (up to the cap) and is not a
            // failure of the peer.
            Some(after) => (previous.failures, after.min(policy.max)),
            None => {
                let failures = previous.failures.saturating_add(1);
                (
                    failures,
                    backoff::delay(&policy, failures, backoff::jitter_sample()),
                )
            }
        };
        let state = RetryState {
            failures,
            retry_after_ms: crate::clock::now_ms()
                .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            last_success_ms: previous.last_success_ms,
            last_error: Some(reason.clone()),
        };
        self.clean = false;
        store
            .set_retry_state(&self.fence()?, &self.destination, &state)
            .await?;
        metrics::counter!("courier_federation_retries_total").increment(1);
        tracing::info!(failures, ?delay, %reason, "send failed; backing off");
        Ok(Step::Wait(delay))
    }
}

/// Gives each device-list EDU of a peek its `prev_id` and the display-name
/// rule (`store::device_lists::finish_outbound_edu`), before the body is
/// built and recorded: a retry resends these exact bytes.
fn finish_device_list_edus(edus: &mut [OutboxEdu], names_over_federation: bool) {
    for edu in edus.iter_mut() {
        if let Some(meta) = &edu.device_list {
            edu.edu_json = finish_outbound_edu(&edu.edu_json, meta, names_over_federation);
        }
    }
}

/// The `message_id`s of the to-device EDUs in a transaction body, in order
/// (for the log line of each attempt; device-list EDUs have none). A body
/// that does not parse (only a corrupt store records one) names none.
fn carried_message_ids(body: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        edus: Vec<Edu>,
    }
    #[derive(serde::Deserialize)]
    struct Edu {
        #[serde(default)]
        content: Content,
    }
    #[derive(serde::Deserialize, Default)]
    struct Content {
        message_id: Option<String>,
    }
    serde_json::from_str::<Body>(body)
        .map(|b| {
            b.edus
                .into_iter()
                .filter_map(|e| e.content.message_id)
                .collect()
        })
        .unwrap_or_default()
}
