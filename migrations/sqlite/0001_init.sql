-- Courier SQLite schema, version 1 (DESIGN §3).
-- Applied once by src/store/sqlite/schema.rs inside one transaction and
-- recorded in schema_version. Never edit an applied migration: add 0002_*.

-- Local devices: the set `*` expands to, and the validity of inbox rows.
CREATE TABLE devices (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;

-- Access tokens, by the hex sha256 of the token (never the token itself).
CREATE TABLE access_tokens (
    token_hash TEXT NOT NULL PRIMARY KEY,
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id);

-- Client (and RPC) send idempotency records; expire after Retention.
CREATE TABLE client_txns (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    txn_id      TEXT NOT NULL,
    received_ts INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, event_type, txn_id)
);
CREATE INDEX client_txns_received ON client_txns (received_ts);

-- Per-device inboxes. stream_id is global and strictly increasing; it is
-- AUTOINCREMENT so that an id is never reused after the highest row is
-- deleted (a reused id would hide a new row behind an old `since`).
CREATE TABLE device_inbox (
    stream_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    sender       TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    content_json TEXT NOT NULL
);
CREATE INDEX device_inbox_device ON device_inbox (user_id, device_id, stream_id);

-- Outbound EDUs per destination; FIFO by seq (global, never reused).
CREATE TABLE outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    destination   TEXT NOT NULL,
    edu_json      TEXT NOT NULL,
    message_count INTEGER NOT NULL,
    queued_ts     INTEGER NOT NULL,
    refusals      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_destination ON outbox (destination, seq);

-- The one transaction in flight per destination: txnId, the outbox seqs it
-- carries (a JSON array, in order) and the exact body, so that a retry after
-- a restart resends the same bytes under the same txnId.
CREATE TABLE outbox_txn (
    destination TEXT NOT NULL PRIMARY KEY,
    txn_id      TEXT NOT NULL,
    seqs_json   TEXT NOT NULL,
    body        TEXT NOT NULL
) WITHOUT ROWID;

-- EDUs refused alone too often: kept for an operator, never sent.
CREATE TABLE quarantine (
    destination    TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    edu_json       TEXT NOT NULL,
    message_count  INTEGER NOT NULL,
    queued_ts      INTEGER NOT NULL,
    reason         TEXT NOT NULL,
    quarantined_ts INTEGER NOT NULL,
    PRIMARY KEY (destination, seq)
) WITHOUT ROWID;

-- Persisted retry schedule per destination.
CREATE TABLE destinations (
    destination     TEXT NOT NULL PRIMARY KEY,
    failures        INTEGER NOT NULL DEFAULT 0,
    retry_after_ts  INTEGER NOT NULL DEFAULT 0,
    last_success_ts INTEGER,
    last_error      TEXT
) WITHOUT ROWID;

-- Inbound federation transaction dedupe (24 h), with the response to replay.
CREATE TABLE inbound_txns (
    origin        TEXT NOT NULL,
    txn_id        TEXT NOT NULL,
    response_json TEXT NOT NULL,
    received_ts   INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
CREATE INDEX inbound_txns_received ON inbound_txns (received_ts);

-- Inbound to-device message_id dedupe (7 days).
CREATE TABLE inbound_message_ids (
    origin      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    received_ts INTEGER NOT NULL,
    PRIMARY KEY (origin, message_id)
);
CREATE INDEX inbound_message_ids_received ON inbound_message_ids (received_ts);

-- Cached remote server verify keys.
CREATE TABLE server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    valid_until_ts INTEGER NOT NULL,
    PRIMARY KEY (server_name, key_id)
) WITHOUT ROWID;
CREATE INDEX server_keys_valid_until ON server_keys (valid_until_ts);
