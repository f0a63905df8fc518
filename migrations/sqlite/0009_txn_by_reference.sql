-- An in-flight transaction recorded by `advance` names its EDUs instead of
-- copying them: `body` then holds the envelope alone and `edus_at` the byte
-- offset where the EDUs of the rows in `seqs_json` go (joined by commas).
-- NULL: `body` is the exact body (records from before, and transactions
-- with device-list EDUs, which are rewritten before they are sent).
ALTER TABLE outbox_txn ADD COLUMN edus_at INTEGER;
