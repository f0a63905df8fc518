//! The pruner: the periodic task that keeps the store's housekeeping tables
//! bounded (DESIGN §1.7). Every `[store] prune_interval_ms` it runs one
//! *pass*: `Store::prune` in batches of at most `[store] prune_batch` rows of
//! each kind, all against the same `now`, until no kind fills a batch, so a
//! pass removes everything that had expired when it began however fast the
//! dedupe tables grew. Each batch is its own store write (on SQLite one job
//! of the group-committing writer, on PostgreSQL its own statements), and
//! the pass pauses briefly between batches, so other writes are queued
//! behind at most one batch, never behind the whole pass.
//!
//! With an `ExpiryPolicy` (`[retention]`, `store::retention`) each batch
//! also runs `Store::expire`, and every row it expired is logged here (one
//! info line per row with its `message_id`, one warn line per batch) and
//! counted in `courier_expired_messages_total{kind, reason}`; the store
//! keeps the persisted totals.
//!
//! Whether to run another batch is the pure `after_batch` decision. Not
//! here: what is expired (the backends' `prune` and `expire`), the
//! retention periods (`store::Retention`, `store::PruneConfig`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::retention::count_for;
use crate::store::{
    ExpiredMessage, ExpiryPolicy, ExpiryReason, PruneConfig, PruneReport, Retention, Store,
    StoreError, TimestampMs,
};

/// The pause between two batches of one pass: long enough for the writes
/// that queued during a batch to be committed before the next one.
pub const BATCH_PAUSE: Duration = Duration::from_millis(10);

/// The most batches one pass runs (a guard against a backend that keeps
/// reporting full batches; 20,000 batches of 5,000 rows is 100 million rows).
pub const MAX_BATCHES_PER_PASS: u32 = 20_000;

/// What the pruner does, from `[store]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneSettings {
    /// The most rows of each kind one batch deletes (at least 1).
    pub batch: u32,
    /// Time between passes.
    pub interval: Duration,
    pub retention: Retention,
}

impl PruneSettings {
    /// The settings of a validated config: the dedupe retentions DESIGN
    /// promises, and the configured batch, interval and destination
    /// retention.
    pub fn from_config(config: &PruneConfig) -> PruneSettings {
        PruneSettings {
            batch: config.batch.max(1),
            interval: config.interval,
            retention: Retention {
                destination_ms: i64::try_from(config.destination_retention.as_millis())
                    .unwrap_or(i64::MAX),
                // Zero (journal off): whatever an earlier run wrote goes.
                trace_ms: i64::try_from(config.trace_retention.as_millis()).unwrap_or(i64::MAX),
                ..Retention::DEFAULT
            },
        }
    }
}

/// What a pass does after one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterBatch {
    /// Some kind filled the batch: more of it may be expired; run another.
    Continue,
    /// Every kind came back short of the batch: nothing expired is left.
    Done,
}

/// The decision after a batch that removed `report` with limit `batch`.
pub fn after_batch(report: &PruneReport, batch: u32) -> AfterBatch {
    if report.max_kind() >= u64::from(batch.max(1)) {
        AfterBatch::Continue
    } else {
        AfterBatch::Done
    }
}

/// The decision after a batch of `Store::expire` that removed `expired`:
/// a reason that filled the batch may have more.
pub fn after_expiry_batch(expired: &[ExpiredMessage], batch: u32) -> AfterBatch {
    let full = ExpiryReason::ALL
        .into_iter()
        .any(|reason| count_for(expired, reason) >= u64::from(batch.max(1)));
    if full {
        AfterBatch::Continue
    } else {
        AfterBatch::Done
    }
}

/// Logs every expired row (info, with its ids) and one summary (warn),
/// and counts them in `courier_expired_messages_total{kind, reason}`.
pub fn record_expired(expired: &[ExpiredMessage], now_ms: TimestampMs) {
    for row in expired {
        match row {
            ExpiredMessage::Inbox(m) => tracing::info!(
                kind = "inbox",
                reason = m.reason.as_str(),
                message_id = %m.message_id,
                user_id = %m.user_id,
                device_id = %m.device_id,
                event_type = %m.event_type,
                sender = %m.sender,
                age_ms = now_ms.saturating_sub(m.received_ts),
                "expired an undelivered inbox message"
            ),
            ExpiredMessage::Outbox(e) => tracing::info!(
                kind = "outbox",
                reason = ExpiryReason::DeadDestination.as_str(),
                destination = %e.destination,
                message_id = %e.id,
                seq = e.seq,
                held = e.held.as_str(),
                edu_type = %e.edu_type,
                message_count = e.message_count,
                age_ms = now_ms.saturating_sub(e.queued_ts),
                failing_for_ms = now_ms.saturating_sub(e.failing_since_ts),
                "expired an outbox EDU of a dead destination"
            ),
        }
    }
    for reason in ExpiryReason::ALL {
        let count = count_for(expired, reason);
        if count > 0 {
            metrics::counter!(
                "courier_expired_messages_total",
                "kind" => reason.kind().as_str(),
                "reason" => reason.as_str()
            )
            .increment(count);
            tracing::warn!(
                kind = reason.kind().as_str(),
                reason = reason.as_str(),
                count,
                "expired undelivered messages (see the info lines for their ids)"
            );
        }
    }
}

/// One pruning pass, driven batch by batch with `step` (the periodic task
/// pauses between steps; tests interleave other writes).
pub struct PrunePass<'a> {
    store: &'a dyn Store,
    now_ms: TimestampMs,
    settings: PruneSettings,
    /// What `Store::expire` may expire (None: nothing).
    expiry: Option<&'a ExpiryPolicy>,
    /// Everything removed so far.
    total: PruneReport,
    /// Rows expired so far, per reason (`ExpiryReason::ALL` order).
    expired: [u64; 3],
    batches: u32,
    done: bool,
}

impl<'a> PrunePass<'a> {
    /// A pass that removes what had expired at `now_ms`.
    pub fn new(store: &'a dyn Store, now_ms: TimestampMs, settings: PruneSettings) -> Self {
        PrunePass {
            store,
            now_ms,
            settings,
            expiry: None,
            total: PruneReport::default(),
            expired: [0; 3],
            batches: 0,
            done: false,
        }
    }

    /// The same pass, also expiring what `policy` says in each batch.
    pub fn with_expiry(mut self, policy: &'a ExpiryPolicy) -> Self {
        self.expiry = Some(policy).filter(|p| p.expires_anything());
        self
    }

    /// Runs one batch (nothing once the pass is done) and says whether
    /// another is needed.
    pub async fn step(&mut self) -> Result<AfterBatch, StoreError> {
        if self.done {
            return Ok(AfterBatch::Done);
        }
        let report = self
            .store
            .prune(self.now_ms, self.settings.retention, self.settings.batch)
            .await?;
        self.total.add(&report);
        let mut next = after_batch(&report, self.settings.batch);
        if let Some(policy) = self.expiry {
            let expired = self
                .store
                .expire(self.now_ms, policy, self.settings.batch)
                .await?;
            record_expired(&expired, self.now_ms);
            for (i, reason) in ExpiryReason::ALL.into_iter().enumerate() {
                self.expired[i] += count_for(&expired, reason);
            }
            if after_expiry_batch(&expired, self.settings.batch) == AfterBatch::Continue {
                next = AfterBatch::Continue;
            }
        }
        self.batches += 1;
        let next = match next {
            AfterBatch::Continue if self.batches >= MAX_BATCHES_PER_PASS => {
                tracing::warn!(
                    batches = self.batches,
                    "pruning pass stopped at its batch limit; the next pass continues"
                );
                AfterBatch::Done
            }
            next => next,
        };
        self.done = next == AfterBatch::Done;
        Ok(next)
    }

    /// What the pass removed so far.
    pub fn total(&self) -> &PruneReport {
        &self.total
    }

    /// Rows expired so far for `reason`.
    pub fn expired(&self, reason: ExpiryReason) -> u64 {
        ExpiryReason::ALL
            .into_iter()
            .position(|r| r == reason)
            .map_or(0, |i| self.expired[i])
    }

    /// Batches run so far.
    pub fn batches(&self) -> u32 {
        self.batches
    }

    /// Runs the remaining batches with `BATCH_PAUSE` between them; stops
    /// early (returning what was done) when `shutdown` is cancelled.
    pub async fn finish(&mut self, shutdown: &CancellationToken) -> Result<(), StoreError> {
        while self.step().await? == AfterBatch::Continue {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(BATCH_PAUSE) => {}
            }
        }
        Ok(())
    }
}

/// Runs one whole pass at `now_ms` and returns what it removed.
pub async fn run_pass(
    store: &dyn Store,
    now_ms: TimestampMs,
    settings: PruneSettings,
) -> Result<PruneReport, StoreError> {
    let mut pass = PrunePass::new(store, now_ms, settings);
    pass.finish(&CancellationToken::new()).await?;
    Ok(pass.total)
}

/// The periodic task: one pass at once, then one every `interval`.
pub struct Pruner {
    store: Arc<dyn Store>,
    settings: PruneSettings,
    expiry: ExpiryPolicy,
}

impl Pruner {
    pub fn new(store: Arc<dyn Store>, config: &PruneConfig) -> Pruner {
        Pruner {
            store,
            settings: PruneSettings::from_config(config),
            expiry: ExpiryPolicy::KEEP,
        }
    }

    /// The same task, also expiring what `policy` says (`[retention]`).
    pub fn with_expiry(mut self, policy: ExpiryPolicy) -> Pruner {
        self.expiry = policy;
        self
    }

    /// Runs passes until `shutdown`. A failed pass is logged; the next
    /// interval tries again.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.settings.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let mut pass = PrunePass::new(&*self.store, crate::clock::now_ms(), self.settings)
                .with_expiry(&self.expiry);
            match pass.finish(&shutdown).await {
                Ok(()) if pass.batches() > 1 => tracing::info!(
                    batches = pass.batches(),
                    report = ?pass.total(),
                    "pruned a backlog of expired records"
                ),
                Ok(()) => tracing::debug!(report = ?pass.total(), "pruned expired records"),
                Err(error) => tracing::warn!(
                    %error,
                    batches = pass.batches(),
                    "pruning failed; retrying next interval"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(client_txns: u64, orphans: u64, destinations: u64) -> PruneReport {
        PruneReport {
            client_txns,
            orphan_inbox_rows: orphans,
            retired_destinations: destinations,
            ..PruneReport::default()
        }
    }

    #[test]
    fn a_full_batch_of_any_kind_means_another_batch() {
        assert_eq!(
            after_batch(&report(5_000, 0, 0), 5_000),
            AfterBatch::Continue
        );
        assert_eq!(
            after_batch(&report(0, 5_000, 0), 5_000),
            AfterBatch::Continue
        );
        assert_eq!(
            after_batch(&report(0, 0, 5_000), 5_000),
            AfterBatch::Continue
        );
        let tombstones = PruneReport {
            claimed_one_time_keys: 5_000,
            ..PruneReport::default()
        };
        assert_eq!(after_batch(&tombstones, 5_000), AfterBatch::Continue);
        let all_short = PruneReport {
            client_txns: 4_999,
            inbound_txns: 4_999,
            inbound_message_ids: 4_999,
            orphan_inbox_rows: 4_999,
            expired_server_keys: 4_999,
            retired_destinations: 4_999,
            claimed_one_time_keys: 4_999,
            expired_device_list_interest: 4_999,
            trace_events: 4_999,
        };
        assert_eq!(after_batch(&all_short, 5_000), AfterBatch::Done);
        assert_eq!(
            after_batch(&PruneReport::default(), 5_000),
            AfterBatch::Done
        );
    }

    #[test]
    fn a_batch_of_zero_behaves_as_one() {
        assert_eq!(after_batch(&report(1, 0, 0), 0), AfterBatch::Continue);
        assert_eq!(after_batch(&PruneReport::default(), 0), AfterBatch::Done);
    }

    #[test]
    fn settings_keep_the_dedupe_retentions_and_take_the_configured_rest() {
        let settings = PruneSettings::from_config(&PruneConfig {
            batch: 0,
            interval: Duration::from_secs(60),
            destination_retention: Duration::from_secs(3600),
            trace_retention: Duration::ZERO,
        });
        assert_eq!(settings.retention.trace_ms, 0);
        assert_eq!(settings.batch, 1);
        assert_eq!(settings.interval, Duration::from_secs(60));
        assert_eq!(settings.retention.destination_ms, 3_600_000);
        assert_eq!(
            settings.retention.client_txn_ms,
            Retention::DEFAULT.client_txn_ms
        );
        assert_eq!(
            settings.retention.inbound_message_id_ms,
            Retention::DEFAULT.inbound_message_id_ms
        );
    }
}
