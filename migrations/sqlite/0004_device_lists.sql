-- Courier SQLite schema, version 4: device-list updates over federation
-- (issue 16, DESIGN §7). The outbound EDUs are ordinary outbox rows that
-- remember which device of which user they describe, so that a later change
-- of the same device replaces a queued one (coalescing); the tracking and
-- remote cache tables serve `device_lists.changed` / `left` and key queries
-- about remote users. Written by src/store/sqlite/device_lists.rs,
-- device_list_outbox.rs and remote_cache.rs.

-- An m.device_list_update row: the local user, the device and the row's
-- stream_id; an m.signing_key_update row: the user, '' and NULL. All NULL
-- for every other row (to-device EDUs).
ALTER TABLE outbox ADD COLUMN dl_user TEXT;
ALTER TABLE outbox ADD COLUMN dl_device TEXT;
ALTER TABLE outbox ADD COLUMN dl_stream INTEGER;
CREATE INDEX outbox_device_list ON outbox (destination, dl_user, dl_device)
    WHERE dl_user IS NOT NULL;
-- Kept with a quarantined row, so that a requeued device-list EDU is still
-- finished (prev_id, display name policy) and coalesced like any other.
ALTER TABLE quarantine ADD COLUMN dl_user TEXT;
ALTER TABLE quarantine ADD COLUMN dl_device TEXT;
ALTER TABLE quarantine ADD COLUMN dl_stream INTEGER;

-- A `left` entry of the change log: the tracker that stopped tracking
-- user_id (NULL: an ordinary change). Left entries take negative stream_ids
-- (counting down from -1 per user) so that they never move the user's
-- device-list stream; users_with_changes ignores them, left_users reads them.
ALTER TABLE device_list_changes ADD COLUMN left_for TEXT;
CREATE INDEX device_list_changes_left ON device_list_changes (left_for, position)
    WHERE left_for IS NOT NULL;

-- Servers that get a local user's device-list EDUs: until expires_ts (a
-- key query from that server), or with NULL until removed over the RPC.
CREATE TABLE device_list_interest (
    user_id     TEXT NOT NULL,
    destination TEXT NOT NULL,
    expires_ts  INTEGER,
    PRIMARY KEY (user_id, destination)
) WITHOUT ROWID;
CREATE INDEX device_list_interest_expiry ON device_list_interest (expires_ts)
    WHERE expires_ts IS NOT NULL;

-- The highest m.device_list_update stream_id a destination acknowledged per
-- local user: the prev_id of the next update sent there.
CREATE TABLE device_list_acked (
    destination TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    stream_id   INTEGER NOT NULL,
    PRIMARY KEY (destination, user_id)
) WITHOUT ROWID;

-- Which users (local or remote) each local user tracks; source is 'query'
-- or 'homeserver'.
CREATE TABLE device_list_trackers (
    tracker  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    source   TEXT NOT NULL,
    since_ts INTEGER NOT NULL,
    PRIMARY KEY (tracker, user_id)
) WITHOUT ROWID;
CREATE INDEX device_list_trackers_user ON device_list_trackers (user_id);

-- The cached device list of a tracked remote user: stream_id is the
-- extremity (the last stream_id applied, NULL before the first resync);
-- stale = 1 means a resync is needed (since stale_since_ts);
-- seen_stream_id is the highest stream_id received while not applied (a
-- snapshot older than it leaves the list stale).
CREATE TABLE remote_device_lists (
    user_id               TEXT NOT NULL PRIMARY KEY,
    stream_id             INTEGER,
    stale                 INTEGER NOT NULL DEFAULT 1,
    seen_stream_id        INTEGER,
    stale_since_ts        INTEGER,
    fetched_ts            INTEGER,
    pushed_ts             INTEGER,
    master_key_json       TEXT,
    self_signing_key_json TEXT
) WITHOUT ROWID;
CREATE INDEX remote_device_lists_stale ON remote_device_lists (stale_since_ts, user_id)
    WHERE stale = 1;

-- The devices of a cached remote list, keys as received (checked).
CREATE TABLE remote_devices (
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    keys_json    TEXT,
    display_name TEXT,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
