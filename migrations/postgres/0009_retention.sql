-- Courier PostgreSQL schema, version 9 (issue 18, retention; SECURITY-REVIEW
-- F13). Versions 7, 8 and 10 belong to other changes; the runner applies
-- every version above the recorded one, so a gap is harmless.
--
-- When each inbox row arrived, for the per event-type TTL. Rows that exist
-- when this runs count as arrived now, so they get a full TTL. Courier's
-- writers name the time (the operation's now_ms); the default covers any
-- other writer.
ALTER TABLE device_inbox
    ADD COLUMN received_ts BIGINT NOT NULL
    DEFAULT (extract(epoch FROM now()) * 1000)::bigint;

-- The first failure after the last success (NULL while the destination has
-- not failed since): a destination failing since longer than
-- [retention] dead_destination_days loses its rows. Destinations failing
-- when this runs count as failing since now.
ALTER TABLE destinations ADD COLUMN failing_since_ts BIGINT;
UPDATE destinations SET failing_since_ts = (extract(epoch FROM now()) * 1000)::bigint
WHERE failures > 0;

-- How many rows were expired per (kind, reason), over the store's life:
-- `courier status` shows them across restarts.
CREATE TABLE expiry_totals (
    kind   TEXT NOT NULL,
    reason TEXT NOT NULL,
    count  BIGINT NOT NULL,
    PRIMARY KEY (kind, reason)
);
