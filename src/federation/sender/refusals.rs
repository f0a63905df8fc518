//! The refusal side of a destination task (SECURITY-REVIEW F6, F14): what
//! a refused transaction does to the persisted `RefusalState` (split,
//! count a solo refusal, quarantine, set aside on probation, mark the
//! destination refusing) and what an accepted one does (confirm probation,
//! end the mark and the narrowing). The rules are in `destination.rs`'s
//! module doc; this file only applies them, as more methods of
//! `DestinationTask`. Also the plain failure: `back_off` on the persisted
//! schedule, and the warning for a peer that rejects our signing key.
//!
//! It does not send anything or choose what to send next.

use std::time::Duration;

use tokio::time::Instant;

use crate::federation::outbound::client_error::ClientError;
use crate::federation::sender::backoff;
use crate::federation::sender::destination::{DestinationTask, Step};
use crate::store::{InFlightTxn, RefusalState, RetryState, StoreError};

/// The least time between two "peer rejects our signing key" warnings for
/// one destination.
const KEY_REJECTED_WARN_EVERY: Duration = Duration::from_secs(60);

impl DestinationTask {
    /// Warns that the peer rejects our signing key, at most once a minute
    /// for this destination (every retry would otherwise say it again).
    pub(super) fn warn_key_rejected(&mut self, error: &ClientError) {
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

    /// Writes the refusal history if `next` differs from what is stored.
    async fn save_refusals(&mut self, next: RefusalState) -> Result<(), StoreError> {
        if next != self.refusals {
            self.shared
                .store
                .set_refusal_state(
                    &self.fence()?,
                    &self.destination,
                    &next,
                    crate::clock::now_ms(),
                )
                .await?;
            self.refusals = next;
        }
        Ok(())
    }

    /// The outbox has nothing to send. EDUs on probation with nothing behind
    /// them to test the peer with go back to their places, and the
    /// destination backs off (they are not quarantined without proof that
    /// the peer accepts other EDUs); otherwise narrowing ends.
    pub(super) async fn nothing_queued(&mut self) -> Result<Step, StoreError> {
        let mut next = self.refusals.clone();
        next.split_limit = None;
        next.split_upto = 0;
        next.split_accepted = false;
        let on_probation = std::mem::take(&mut next.probation_seqs);
        if on_probation.is_empty() {
            self.save_refusals(next).await?;
            return Ok(Step::Drained);
        }
        self.restore_probation(&on_probation).await?;
        self.save_refusals(next).await?;
        tracing::warn!(
            edus = on_probation.len(),
            "refused alone, and nothing else queued to show the peer accepts other EDUs: kept queued"
        );
        self.back_off(
            "EDUs refused alone; nothing else queued to test the peer with".to_owned(),
            None,
        )
        .await
    }

    /// Puts EDUs on probation back at their places in the queue, with
    /// `quarantine_after` solo refusals (so one more refusal alone puts them
    /// on probation again).
    async fn restore_probation(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let refusals = self.shared.config.federation.quarantine_after;
        for &seq in seqs {
            self.shared
                .store
                .restore_quarantined(&self.fence()?, &self.destination, seq, refusals)
                .await?;
        }
        metrics::counter!("courier_federation_requeued_edus_total", "reason" => "refusing")
            .increment(seqs.len() as u64);
        Ok(())
    }

    /// The peer accepted `txn`: EDUs on probation are quarantined for good,
    /// a refusing mark ends, and narrowing ends once past the refused batch.
    pub(super) async fn accepted(&mut self, txn: &InFlightTxn) -> Result<(), StoreError> {
        let mut next = self.refusals.clone();
        let confirmed = std::mem::take(&mut next.probation_seqs);
        if !confirmed.is_empty() {
            metrics::counter!("courier_federation_quarantined_edus_total")
                .increment(confirmed.len() as u64);
            tracing::warn!(
                seqs = ?confirmed,
                "the peer accepts other EDUs: EDUs refused alone stay quarantined"
            );
        }
        if let Some(since) = next.refusing_since_ms.take() {
            tracing::info!(
                refusing_ms = crate::clock::now_ms().saturating_sub(since),
                "destination accepts again"
            );
        }
        if next.split_limit.is_some() {
            next.split_accepted = true;
            if txn.seqs.last().is_some_and(|&last| last >= next.split_upto) {
                next.split_limit = None;
                next.split_upto = 0;
                next.split_accepted = false;
            }
        }
        self.save_refusals(next).await
    }

    /// The peer refused the payload: split, or count a solo refusal.
    pub(super) async fn refused(
        &mut self,
        txn: &InFlightTxn,
        status: u16,
        reason: String,
    ) -> Result<Step, StoreError> {
        let shared = self.shared.clone();
        let store = &shared.store;
        store
            .refuse_txn(&self.fence()?, &self.destination, &txn.txn_id)
            .await?;
        self.settled = true;
        let mut next = self.refusals.clone();
        let why = format!("{status} refused: {reason}");
        if next.refusing_since_ms.is_some() {
            // A refusing peer is neither narrowed nor probed (which could
            // set EDUs aside, or deliver them out of order, the moment it
            // recovers): the head of the queue is resent on the backoff
            // schedule. Once that schedule has grown to `retry.max` the mark
            // is cleared, so the next attempts narrow and probe afresh: a
            // bad EDU at the head is still found after the peer recovers.
            next.split_limit = None;
            next.split_upto = 0;
            next.split_accepted = false;
            let policy = shared.config.federation.retry;
            let failures = store.retry_state(&self.destination).await?.failures;
            if backoff::nominal_delay(&policy, failures.saturating_add(1)) >= policy.max {
                next.refusing_since_ms = None;
                tracing::info!("refusing destination at the longest backoff: narrowing afresh");
            }
            self.save_refusals(next).await?;
            return self.back_off(format!("refusing: {why}"), None).await;
        }
        let seq = match txn.seqs.as_slice() {
            [] => {
                // Only a corrupt store records a transaction of no EDUs:
                // nothing to split or quarantine, look for more.
                tracing::warn!(status, %reason, "a recorded transaction with no EDUs was refused");
                return Ok(Step::Continue);
            }
            [seq] => *seq,
            [.., last] => {
                let count = u32::try_from(txn.seqs.len()).unwrap_or(u32::MAX);
                let half = (count / 2).max(1);
                tracing::warn!(status, %reason, edus = count, next = half, "batch refused; splitting");
                next.split_limit = Some(half);
                next.split_upto = next.split_upto.max(*last);
                self.save_refusals(next).await?;
                return Ok(Step::Continue);
            }
        };
        next.split_limit = Some(1);
        next.split_upto = next.split_upto.max(seq);
        let refusals = store
            .edu_refusals(&self.destination, seq)
            .await?
            .unwrap_or(0);
        if refusals < shared.config.federation.quarantine_after {
            self.save_refusals(next).await?;
            tracing::warn!(seq, refusals, status, %reason, "single EDU refused");
            return self.back_off(why, None).await;
        }
        let now = crate::clock::now_ms();
        if next.split_accepted {
            // The peer accepted a transaction since the narrowing began: it
            // takes other EDUs, and this one is bad.
            let note = format!("refused {refusals} times alone, last with {status}: {reason}");
            store
                .quarantine_edu(&self.fence()?, &self.destination, seq, &note, now)
                .await?;
            next.split_limit = None;
            next.split_upto = 0;
            next.split_accepted = false;
            self.save_refusals(next).await?;
            metrics::counter!("courier_federation_quarantined_edus_total").increment(1);
            tracing::warn!(seq, refusals, %reason, "EDU quarantined");
            return Ok(Step::Continue);
        }
        if next.probation_seqs.len() < shared.config.federation.refusing_after as usize {
            // Nothing accepted yet: set it aside on probation and try the
            // EDUs behind it.
            let note = format!(
                "refused {refusals} times alone, last with {status}: {reason} \
                 (on probation until the peer accepts another EDU)"
            );
            store
                .quarantine_edu(&self.fence()?, &self.destination, seq, &note, now)
                .await?;
            next.probation_seqs.push(seq);
            next.split_limit = None;
            next.split_upto = 0;
            self.save_refusals(next).await?;
            tracing::warn!(seq, refusals, %reason, "EDU on probation; trying the EDUs behind it");
            return Ok(Step::Continue);
        }
        // More EDUs refused alone than may wait on probation, and nothing
        // accepted: the peer refuses everything. The EDUs on probation go
        // back to their places; the destination is marked refusing.
        let on_probation = std::mem::take(&mut next.probation_seqs);
        self.restore_probation(&on_probation).await?;
        next.split_limit = None;
        next.split_upto = 0;
        next.split_accepted = false;
        if next.refusing_since_ms.is_none() {
            next.refusing_since_ms = Some(now);
            metrics::counter!("courier_federation_refusing_total").increment(1);
            tracing::warn!(
                status,
                %reason,
                requeued = on_probation.len(),
                "destination refuses every EDU: marked refusing, nothing quarantined"
            );
        }
        self.save_refusals(next).await?;
        self.back_off(format!("refusing: {why}"), None).await
    }
}
