-- The trace journal (issue 18): what happened to each to-device message,
-- written in the same transaction as the event it records, so it can never
-- disagree with the store. One row per client send with local recipients,
-- per remote EDU queued, per federation transaction recorded, per send
-- attempt, per inbound transaction and EDU, per /sync acknowledgement of a
-- device, per quarantined or expired EDU/message. Per-message facts are
-- derived: an inbox row's stream id lies in its send's (or EDU's) stream
-- range, and a /sync acknowledgement lists the (stream id, message_id) pairs
-- it deleted. Pruned by the pruner after `[store] trace_retention_hours`.
CREATE TABLE trace_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         INTEGER NOT NULL,
    -- accepted | queued | txn | attempt | received | applied | deduped |
    -- delivered | quarantined | expired
    kind       TEXT NOT NULL,
    message_id TEXT,
    -- a client txnId (accepted, queued) or a federation txnId (the rest)
    txn_id     TEXT,
    -- the destination or the origin
    peer       TEXT,
    -- the sender (accepted, queued, applied) or the recipient (delivered)
    user_id    TEXT,
    device_id  TEXT,
    -- an outbox seq or seq range, or an inbox stream id range
    first_id   INTEGER,
    last_id    INTEGER,
    detail     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX trace_events_message ON trace_events (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX trace_events_txn ON trace_events (txn_id) WHERE txn_id IS NOT NULL;
CREATE INDEX trace_events_user ON trace_events (user_id, id) WHERE user_id IS NOT NULL;
CREATE INDEX trace_events_span ON trace_events (peer, first_id) WHERE kind = 'txn';

-- Whether the journal is written (`[store] trace_retention_hours = 0` turns
-- it off); set at start-up.
CREATE TABLE trace_settings (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    enabled INTEGER NOT NULL
);
INSERT INTO trace_settings (id, enabled) VALUES (1, 1);
