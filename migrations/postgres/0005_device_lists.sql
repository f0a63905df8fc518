-- Courier PostgreSQL schema, version 5: device-list updates over federation
-- (issue 16, DESIGN §7; src/store/postgres/device_lists.rs and its
-- neighbours). Outbound device-list EDUs are ordinary outbox rows that
-- remember what they are about, so a later change of the same device can
-- replace a queued one (coalescing) and peek can chain `prev_id`. The
-- change log also records remote users' changes (for the local users that
-- track them) and `left` entries.

-- The device-list meta of an outbox row: NULL dl_user for every other EDU.
-- dl_device is '' for an m.signing_key_update; dl_stream is the change's
-- stream_id (NULL for an m.signing_key_update).
ALTER TABLE outbox ADD COLUMN dl_user TEXT;
ALTER TABLE outbox ADD COLUMN dl_device TEXT;
ALTER TABLE outbox ADD COLUMN dl_stream BIGINT;
CREATE INDEX outbox_device_list ON outbox (destination, dl_user, dl_device)
    WHERE dl_user IS NOT NULL;

-- A quarantined device-list row keeps its meta, so a requeue sends it
-- finished like any other (prev_id, display names as configured).
ALTER TABLE quarantine ADD COLUMN dl_user TEXT;
ALTER TABLE quarantine ADD COLUMN dl_device TEXT;
ALTER TABLE quarantine ADD COLUMN dl_stream BIGINT;

-- A `left` entry: tracker `left_for` stopped tracking user_id. It takes a
-- position (sync tokens) but no stream_id (the user's stream is about its
-- devices), and users_with_changes skips it.
ALTER TABLE device_list_changes ADD COLUMN left_for TEXT;
ALTER TABLE device_list_changes ALTER COLUMN stream_id DROP NOT NULL;
CREATE INDEX device_list_changes_left ON device_list_changes (left_for, position)
    WHERE left_for IS NOT NULL;

-- The servers that get a local user's device-list EDUs: expires_ts NULL
-- until removed (named by the homeserver), else until that time (the
-- server queried the user's keys).
CREATE TABLE device_list_interest (
    user_id     TEXT NOT NULL,
    destination TEXT NOT NULL,
    expires_ts  BIGINT,
    PRIMARY KEY (user_id, destination)
);

-- Per destination and local user, the highest stream_id acknowledged: the
-- prev_id of the next update.
CREATE TABLE device_list_acked (
    destination TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    stream_id   BIGINT NOT NULL,
    PRIMARY KEY (destination, user_id)
);

-- Which users each local user tracks; source is query or homeserver.
CREATE TABLE device_list_trackers (
    tracker  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    source   TEXT NOT NULL,
    since_ts BIGINT NOT NULL,
    PRIMARY KEY (tracker, user_id)
);
CREATE INDEX device_list_trackers_user ON device_list_trackers (user_id);

-- The cached device list of a tracked remote user. stream_id is the
-- extremity (NULL until the first resync); seen_stream_id the highest
-- stream_id seen in an update; stale_since_ts orders the resyncs.
CREATE TABLE remote_device_lists (
    user_id               TEXT NOT NULL PRIMARY KEY,
    stream_id             BIGINT,
    stale                 BOOLEAN NOT NULL,
    seen_stream_id        BIGINT,
    stale_since_ts        BIGINT,
    fetched_ts            BIGINT,
    pushed_ts             BIGINT,
    master_key_json       TEXT,
    self_signing_key_json TEXT
);
CREATE INDEX remote_device_lists_stale ON remote_device_lists (stale_since_ts, user_id)
    WHERE stale;

-- The cached devices of a tracked remote user (keys as received, checked).
CREATE TABLE remote_devices (
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    keys_json    TEXT,
    display_name TEXT,
    PRIMARY KEY (user_id, device_id)
);
