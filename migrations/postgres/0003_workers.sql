-- Courier PostgreSQL schema, version 3 (issue 13, F10): which live worker
-- process holds which worker name. Destination leases are owned by name, so
-- two processes with one name would share every lease. A process claims its
-- name at start-up (free, released, or its heartbeat older than the lease
-- duration), heartbeats from its lease loop, and deletes the row on a clean
-- shutdown. `instance` is random per process; `heartbeat_at` is ms since
-- the epoch from the worker's clock.
CREATE TABLE workers (
    name         TEXT NOT NULL PRIMARY KEY,
    instance     TEXT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    started_at   BIGINT NOT NULL
);
