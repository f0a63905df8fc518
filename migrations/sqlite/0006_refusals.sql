-- Courier SQLite schema, version 6 (issue 18, SECURITY-REVIEW F6, F14): a
-- destination's refusal history, persisted so that a restart or a lease
-- move resumes it (`store::RefusalState`):
--   split_limit        batch size while narrowing a refused batch (NULL: none)
--   split_upto         last seq of the refused batch being narrowed
--   split_accepted     1 once a transaction was accepted since narrowing began
--   refusing_since_ts  when the destination was marked refusing (NULL: not)
--   probation_seqs     JSON array of the seqs set aside in `quarantine` on
--                      probation, until the peer is seen to accept other EDUs
-- `outbox.refusals` now counts only refusals of a transaction carrying that
-- EDU alone; counts written by older versions (every refused batch) restart.
ALTER TABLE destinations ADD COLUMN split_limit INTEGER;
ALTER TABLE destinations ADD COLUMN split_upto INTEGER NOT NULL DEFAULT 0;
ALTER TABLE destinations ADD COLUMN split_accepted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE destinations ADD COLUMN refusing_since_ts INTEGER;
ALTER TABLE destinations ADD COLUMN probation_seqs TEXT NOT NULL DEFAULT '[]';
UPDATE outbox SET refusals = 0;
