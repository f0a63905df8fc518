-- Courier PostgreSQL schema, version 1 (DESIGN §3, §4).
-- Applied once by src/store/postgres/schema.rs inside one transaction that
-- holds an advisory lock, and recorded in schema_version. Never edit an
-- applied migration: add 0002_*.

-- Local devices: the set `*` expands to, and the validity of inbox rows.
-- Writers of inbox rows lock the device rows (FOR NO KEY UPDATE) before
-- taking stream ids, so one device's rows commit in stream id order.
CREATE TABLE devices (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

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
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, event_type, txn_id)
);
CREATE INDEX client_txns_received ON client_txns (received_ts);

-- Per-device inboxes. stream_id comes from an identity sequence: global,
-- strictly increasing, never reused (sequences survive restarts and crashes).
CREATE TABLE device_inbox (
    stream_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    sender       TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    content_json TEXT NOT NULL
);
CREATE INDEX device_inbox_device ON device_inbox (user_id, device_id, stream_id);

-- Outbound EDUs per destination; FIFO by seq (global, never reused).
CREATE TABLE outbox (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination   TEXT NOT NULL,
    edu_json      TEXT NOT NULL,
    message_count INTEGER NOT NULL,
    queued_ts     BIGINT NOT NULL,
    refusals      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_destination ON outbox (destination, seq);

-- The one transaction in flight per destination: txnId, the outbox seqs it
-- carries (in order) and the exact body.
CREATE TABLE outbox_txn (
    destination TEXT NOT NULL PRIMARY KEY,
    txn_id      TEXT NOT NULL,
    seqs        BIGINT[] NOT NULL,
    body        TEXT NOT NULL
);

-- EDUs refused alone too often: kept for an operator, never sent.
CREATE TABLE quarantine (
    destination    TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    edu_json       TEXT NOT NULL,
    message_count  INTEGER NOT NULL,
    queued_ts      BIGINT NOT NULL,
    reason         TEXT NOT NULL,
    quarantined_ts BIGINT NOT NULL,
    PRIMARY KEY (destination, seq)
);

-- Persisted retry schedule per destination.
CREATE TABLE destinations (
    destination     TEXT NOT NULL PRIMARY KEY,
    failures        INTEGER NOT NULL DEFAULT 0,
    retry_after_ts  BIGINT NOT NULL DEFAULT 0,
    last_success_ts BIGINT,
    last_error      TEXT
);

-- Inbound federation transaction dedupe (24 h), with the response to replay.
CREATE TABLE inbound_txns (
    origin        TEXT NOT NULL,
    txn_id        TEXT NOT NULL,
    response_json TEXT NOT NULL,
    received_ts   BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
CREATE INDEX inbound_txns_received ON inbound_txns (received_ts);

-- Inbound to-device message_id dedupe (7 days).
CREATE TABLE inbound_message_ids (
    origin      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, message_id)
);
CREATE INDEX inbound_message_ids_received ON inbound_message_ids (received_ts);

-- Cached remote server verify keys.
CREATE TABLE server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
CREATE INDEX server_keys_valid_until ON server_keys (valid_until_ts);

-- Destination ownership among workers (DESIGN §4): the worker named in
-- `owner` may send to `destination` until `expires_at` (ms since the epoch).
-- An expired lease is free for any worker to take.
CREATE TABLE destination_leases (
    destination TEXT NOT NULL PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX destination_leases_owner ON destination_leases (owner);
