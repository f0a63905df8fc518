-- Courier PostgreSQL schema, version 4: the E2EE device plane (DESIGN §7,
-- SPEC-E2EE §7.4). Key material is kept as the JSON text received; the
-- store never parses it. Rows of a device are deleted with the device
-- (src/store/postgres/device_changes.rs), in the same transaction. Writers of a
-- device's keys lock its devices row (FOR NO KEY UPDATE); claims take keys
-- with FOR UPDATE SKIP LOCKED; change-log writers take a transaction-level
-- advisory lock, so positions commit in order.

-- The device's display name (NULL: none).
ALTER TABLE devices ADD COLUMN display_name TEXT;

-- A device's signed `device_keys` object, and its identity (canonical JSON
-- of the `keys` map), which an upload may never change.
CREATE TABLE device_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key_json  TEXT NOT NULL,
    identity  TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Unclaimed one-time keys. upload_seq orders a device's keys by upload (the
-- order claims follow, not key ID order); it grows per device.
CREATE TABLE one_time_keys (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    algorithm  TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    key_json   TEXT NOT NULL,
    upload_seq BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);
CREATE INDEX one_time_keys_claim ON one_time_keys (user_id, device_id, algorithm, upload_seq);

-- Tombstones of claimed one-time keys: a re-upload of one is accepted and
-- ignored, so that a key is never handed out twice (matrix-spec#1124).
-- Pruned after Retention.claimed_key_ms.
CREATE TABLE claimed_one_time_keys (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    algorithm  TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    claimed_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);
CREATE INDEX claimed_one_time_keys_ts ON claimed_one_time_keys (claimed_ts);

-- One fallback key per device and algorithm; `used` once handed out.
CREATE TABLE fallback_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    key_json  TEXT NOT NULL,
    used      BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Cross-signing keys of local users; kind is master, self_signing or
-- user_signing.
CREATE TABLE cross_signing_keys (
    user_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key_json   TEXT NOT NULL,
    PRIMARY KEY (user_id, kind)
);

-- Uploaded signatures of device and cross-signing keys, kept apart from the
-- signed JSON and merged into it on the way out; seq is upload order.
-- target_key_id is a device ID or a cross-signing public key.
CREATE TABLE e2ee_signatures (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target_user_id TEXT NOT NULL,
    target_key_id  TEXT NOT NULL,
    signer_user_id TEXT NOT NULL,
    signer_key_id  TEXT NOT NULL,
    signature      TEXT NOT NULL,
    UNIQUE (target_user_id, target_key_id, signer_user_id, signer_key_id)
);

-- The log of local device-list changes: position is global (sync tokens,
-- never reused; max + 1 under the advisory lock, so without gaps),
-- stream_id counts per user from 1. device_id NULL marks a
-- change of the user's cross-signing keys.
CREATE TABLE device_list_changes (
    position   BIGINT NOT NULL PRIMARY KEY,
    user_id    TEXT NOT NULL,
    stream_id  BIGINT NOT NULL,
    device_id  TEXT,
    changed_ts BIGINT NOT NULL,
    UNIQUE (user_id, stream_id)
);
CREATE INDEX device_list_changes_user ON device_list_changes (user_id, position);
