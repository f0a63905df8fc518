-- Courier PostgreSQL schema, version 7 (issue 18, SECURITY-REVIEW F15): fenced
-- leases. Every destination lease carries an epoch, a fencing token that grows on
-- each claim of the destination and stays while its holder renews it. Epochs
-- come from one sequence, so they keep growing when a lapsed lease row is
-- deleted and created again. Every outbox write of a destination task is
-- applied only while the lease row still names its worker and epoch.
CREATE SEQUENCE lease_epochs;
ALTER TABLE destination_leases ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
