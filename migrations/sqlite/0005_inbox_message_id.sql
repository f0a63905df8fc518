-- Each inbox row keeps the message_id it arrived under (the federation
-- EDU's, or one minted per local send), so that expiry logs, traces and
-- operator tools can name it. Rows from before this migration have ''.
ALTER TABLE device_inbox ADD COLUMN message_id TEXT NOT NULL DEFAULT '';
