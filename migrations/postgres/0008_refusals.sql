-- Courier PostgreSQL schema, version 8 (issue 18, SECURITY-REVIEW F6, F14):
-- a destination's refusal history, persisted so that a restart or a lease
-- move resumes it (`store::RefusalState`):
--   split_limit        batch size while narrowing a refused batch (NULL: none)
--   split_upto         last seq of the refused batch being narrowed
--   split_accepted     true once a transaction was accepted since narrowing began
--   refusing_since_ts  when the destination was marked refusing (NULL: not)
--   probation_seqs     the seqs set aside in `quarantine` on probation, until
--                      the peer is seen to accept other EDUs
-- `outbox.refusals` now counts only refusals of a transaction carrying that
-- EDU alone; counts written by older versions (every refused batch) restart.
ALTER TABLE destinations ADD COLUMN split_limit INTEGER;
ALTER TABLE destinations ADD COLUMN split_upto BIGINT NOT NULL DEFAULT 0;
ALTER TABLE destinations ADD COLUMN split_accepted BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE destinations ADD COLUMN refusing_since_ts BIGINT;
ALTER TABLE destinations ADD COLUMN probation_seqs BIGINT[] NOT NULL DEFAULT '{}';
UPDATE outbox SET refusals = 0;
