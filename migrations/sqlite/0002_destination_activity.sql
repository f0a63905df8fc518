-- Courier SQLite schema, version 2 (issue 13, F13): when a destination's
-- retry state last changed, so that prune can forget destinations idle for
-- Retention.destination_ms (nothing queued, in flight or quarantined).
-- Rows that exist when this runs count as updated now, so they get a full
-- retention period.
ALTER TABLE destinations ADD COLUMN updated_ts INTEGER NOT NULL DEFAULT 0;
UPDATE destinations SET updated_ts = CAST(strftime('%s', 'now') AS INTEGER) * 1000;
