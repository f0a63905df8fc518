-- Courier SQLite schema, version 7 (issue 18, retention; SECURITY-REVIEW F13).
-- Versions 6, 8 and 10 belong to other changes; the runner applies every
-- version above the recorded one, so a gap is harmless.
--
-- When each inbox row arrived, for the per event-type TTL. Rows that exist
-- when this runs count as arrived now, so they get a full TTL.
ALTER TABLE device_inbox ADD COLUMN received_ts INTEGER NOT NULL DEFAULT 0;
UPDATE device_inbox SET received_ts = CAST(strftime('%s', 'now') AS INTEGER) * 1000;

-- The first failure after the last success (NULL while the destination has
-- not failed since): a destination failing since longer than
-- [retention] dead_destination_days loses its rows. Destinations failing
-- when this runs count as failing since now.
ALTER TABLE destinations ADD COLUMN failing_since_ts INTEGER;
UPDATE destinations SET failing_since_ts = CAST(strftime('%s', 'now') AS INTEGER) * 1000
WHERE failures > 0;

-- How many rows were expired per (kind, reason), over the store's life:
-- `courier status` shows them across restarts.
CREATE TABLE expiry_totals (
    kind   TEXT NOT NULL,
    reason TEXT NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (kind, reason)
) WITHOUT ROWID;
