//! The writer thread and its group commit. One OS thread owns the only write
//! connection. Callers send jobs over a channel; the thread blocks for the
//! first job, drains whatever else is already waiting (up to a cap), runs all
//! of them in ONE `BEGIN IMMEDIATE` transaction, each inside its own
//! SAVEPOINT (a failing job rolls back alone and gets its own error), commits
//! once (one fsync), and only then answers every caller. Nothing here knows
//! what a job does; the SQL lives in the sibling modules.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use crate::store::StoreError;

/// One write operation, run against the writer connection inside the group
/// transaction, answered after the commit.
pub trait WriteJob: Send {
    /// Runs the operation; returns whether it succeeded (on failure the
    /// writer rolls back to the job's savepoint).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Delivers the result: the job's own result if the group committed,
    /// else the commit error.
    fn finish(self: Box<Self>, committed: Result<(), StoreError>);
}

/// A job built from a closure and a oneshot reply channel.
pub struct ClosureJob<T, F> {
    op: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> ClosureJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    pub fn new(op: F, reply: oneshot::Sender<Result<T, StoreError>>) -> Self {
        ClosureJob {
            op: Some(op),
            result: None,
            reply,
        }
    }
}

impl<T, F> WriteJob for ClosureJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = match self.op.take() {
            Some(op) => op(conn),
            None => Err(StoreError::Corrupt("write job run twice".to_owned())),
        };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), StoreError>) {
        let this = *self;
        let answer = match committed {
            Ok(()) => this
                .result
                .unwrap_or_else(|| Err(StoreError::Corrupt("write job never ran".to_owned()))),
            Err(e) => Err(e),
        };
        // The caller may have gone away (request cancelled); the write still
        // happened, which is what a cancelled-but-durable request means.
        let _ = this.reply.send(answer);
    }
}

/// What the writer thread receives.
pub enum Message {
    Job(Box<dyn WriteJob>),
    /// Finish the jobs already queued, then stop and answer.
    Shutdown(oneshot::Sender<()>),
}

/// Counters the writer keeps (read by benches and status).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Committed group transactions (each is one fsync of the WAL).
    pub commits: AtomicU64,
    /// Jobs answered after a successful commit (or with their own error).
    pub jobs: AtomicU64,
}

/// The writer thread's state.
pub struct Writer {
    pub conn: Connection,
    pub rx: mpsc::Receiver<Message>,
    pub stats: Arc<WriterStats>,
    /// The most jobs one group transaction takes.
    pub max_batch: usize,
}

impl Writer {
    /// Runs until every sender is dropped or a shutdown message arrives.
    pub fn run(mut self) {
        let mut batch: Vec<Box<dyn WriteJob>> = Vec::with_capacity(self.max_batch);
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        loop {
            match self.rx.recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Shutdown(done)) => shutdown = Some(done),
                Err(mpsc::RecvError) => break,
            }
            while batch.len() < self.max_batch && shutdown.is_none() {
                match self.rx.try_recv() {
                    Ok(Message::Job(job)) => batch.push(job),
                    Ok(Message::Shutdown(done)) => shutdown = Some(done),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.run_group(&mut batch);
            }
            if shutdown.is_some() {
                // Answer the jobs that raced with the shutdown message.
                while let Ok(Message::Job(job)) = self.rx.try_recv() {
                    batch.push(job);
                    if batch.len() == self.max_batch {
                        self.run_group(&mut batch);
                    }
                }
                if !batch.is_empty() {
                    self.run_group(&mut batch);
                }
                break;
            }
        }
        // Fold the WAL back into the database file on a clean stop.
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "wal checkpoint at shutdown failed");
        }
        drop(self.conn);
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    /// Runs `batch` in one transaction and answers every job; empties it.
    fn run_group(&mut self, batch: &mut Vec<Box<dyn WriteJob>>) {
        let outcome = self.run_in_transaction(batch);
        let n = batch.len() as u64;
        // Counted before answering, so a caller sees its own write counted.
        self.stats.jobs.fetch_add(n, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                for job in batch.drain(..) {
                    job.finish(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = n, "sqlite group commit failed");
                for job in batch.drain(..) {
                    job.finish(Err(clone_error(&e)));
                }
            }
        }
    }

    fn run_in_transaction(&mut self, batch: &mut [Box<dyn WriteJob>]) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for job in batch.iter_mut() {
            tx.prepare_cached("SAVEPOINT job")?.execute([])?;
            // A panicking job must not take the writer thread (and with it
            // every later write) down: it fails alone, like an error.
            let ran = std::panic::catch_unwind(AssertUnwindSafe(|| job.run(&tx)));
            if ran.unwrap_or_else(|_| {
                tracing::error!("sqlite write job panicked; rolled back alone");
                false
            }) {
                tx.prepare_cached("RELEASE job")?.execute([])?;
            } else {
                // A failed statement normally leaves the transaction open;
                // if SQLite aborted it (I/O error, disk full), the rollback
                // fails and the whole group fails with it.
                tx.prepare_cached("ROLLBACK TO job")?.execute([])?;
                tx.prepare_cached("RELEASE job")?.execute([])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Copies an error for every job of a failed group.
pub fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, msg)) => {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(*code, msg.clone()))
        }
        StoreError::Closed => StoreError::Closed,
        StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        StoreError::Postgres(s) => StoreError::Postgres(s.clone()),
        StoreError::Migration { version, reason } => StoreError::Migration {
            version: *version,
            reason: reason.clone(),
        },
        other => StoreError::Io(std::io::Error::other(other.to_string())),
    }
}
