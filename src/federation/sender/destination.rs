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
use crate::federation::sender::transaction::{
    MAX_EDUS, TxnFailure, TxnIds, carried_message_ids, next_txn, rejects_our_key,
};
use crate::identifiers::ServerName;
use crate::store::{Fence, InFlightTxn, RefusalState, RetryState, Store, StoreError};

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
    pub(super) clean: bool,
    /// This task settled the last recorded transaction (acked or refused)
    /// and has not recorded another: the next step need not read the
    /// in-flight record back. False at start and after any store error, so
    /// a transaction recorded by an earlier run or another worker is always
    /// found (and `begin_txn` refuses a second one in any case).
    pub(super) settled: bool,
    /// When this task last warned that the peer rejects our signing key.
    pub(super) key_rejected_warned: Option<Instant>,
    /// The fence of the lease acquired last (`holds_lease`), which every
    /// outbox write passes. None before the first check and once lost.
    fence: Option<Fence>,
    /// The next transaction, recorded by `advance` together with the ack
    /// of the last one: sent without another store read.
    prepared: Option<InFlightTxn>,
    /// When `holds_lease` last found the lease held.
    lease_checked: Option<Instant>,
    /// A `PeerIsUp` taken from the channel while sending (wakes are
    /// drained before each outbox read); honoured once the step ends.
    peer_up_pending: bool,
}

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
            prepared: None,
            lease_checked: None,
            peer_up_pending: false,
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
                        if std::mem::take(&mut self.peer_up_pending)
                            && signal == Some(Signal::Wake)
                            && !self.clean
                        {
                            self.reset_backoff().await;
                        }
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
                    State::BackingOff { .. } if std::mem::take(&mut self.peer_up_pending) => {
                        self.reset_backoff().await;
                        State::Sending
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
        // A transaction `advance` just recorded under a lease checked less
        // than `recheck_ms` ago goes out under that check: its record's
        // commit checked the fence in the same transaction.
        let recent = self.lease_checked.filter(|at| {
            self.prepared.is_some() && at.elapsed() < shared.config.worker.recheck_after
        });
        let (fence, leased_at) = match (recent, self.fence.clone()) {
            (Some(at), Some(fence)) => (fence, at),
            _ => {
                let Some(fence) = self.holds_lease().await? else {
                    self.refusals_loaded = false;
                    return Ok(Step::Drained);
                };
                (fence, Instant::now())
            }
        };
        if !self.refusals_loaded {
            self.refusals = store.refusal_state(&self.destination).await?;
            self.refusals_loaded = true;
        }
        let recorded = match self.prepared.take() {
            Some(txn) => Some(txn),
            None if self.settled => None,
            None => store.in_flight(&self.destination).await?,
        };
        let txn = match recorded {
            Some(txn) => txn,
            None => {
                let limit = self
                    .refusals
                    .split_limit
                    .unwrap_or(MAX_EDUS)
                    .clamp(1, MAX_EDUS);
                self.take_wakes();
                self.settled = false;
                let next = next_txn(&shared.config, &shared.txn_ids, limit);
                match store.advance(&fence, &self.destination, None, next).await? {
                    Some(txn) => txn,
                    None => {
                        // Nothing was recorded.
                        self.settled = true;
                        return self.nothing_queued().await;
                    }
                }
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
            // The owner may record transactions meanwhile (and send the
            // one prepared here).
            self.settled = false;
            self.prepared = None;
            self.lease_checked = None;
        } else {
            self.lease_checked = Some(Instant::now());
        }
        self.fence.clone_from(&fence);
        Ok(fence)
    }

    /// Empties the signal channel just before an outbox read: every wake
    /// sent so far is answered by that read. A `PeerIsUp` among them is
    /// kept for when the step ends.
    fn take_wakes(&mut self) {
        while let Ok(signal) = self.signals.try_recv() {
            if signal == Signal::PeerIsUp {
                self.peer_up_pending = true;
            }
        }
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
        self.prepared = None;
        self.lease_checked = None;
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
                let (txn_id, now_ms) = (txn.txn_id.as_str(), crate::clock::now_ms());
                if self.refusals == RefusalState::default() {
                    // Not narrowing: the ack and the next transaction's
                    // record are one commit, and the next send needs no
                    // further read.
                    self.take_wakes();
                    self.settled = false;
                    let next = next_txn(&shared.config, &shared.txn_ids, MAX_EDUS);
                    self.prepared = store
                        .advance(
                            &self.fence()?,
                            &self.destination,
                            Some((txn_id, now_ms)),
                            next,
                        )
                        .await?;
                    self.settled = self.prepared.is_none();
                } else {
                    // Narrowing: `accepted` decides what the next batch is.
                    store
                        .ack_txn(&self.fence()?, &self.destination, txn_id, now_ms)
                        .await?;
                    self.settled = true;
                }
                // The ack also reset the persisted retry state.
                self.clean = true;
                tracing::debug!("delivered");
                metrics::counter!("courier_federation_transactions_total", "outcome" => "ok")
                    .increment(1);
                metrics::counter!("courier_federation_edus_sent_total")
                    .increment(txn.seqs.len() as u64);
                self.accepted(&txn).await?;
                return Ok(match self.prepared {
                    Some(_) => Step::Continue,
                    // Nothing more was queued when the ack committed: a
                    // wake for anything newer is still in the channel.
                    None if self.refusals == RefusalState::default() => Step::Drained,
                    None => Step::Continue,
                });
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
}
