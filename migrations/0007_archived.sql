-- Objects in an archive storage class (S3 GLACIER and DEEP_ARCHIVE, Azure's Archive tier) cannot be
-- read until restored: a plan records them as work marked `archived`, and the shard records them
-- as `skipped` with the reason, without a GET. A skipped row stays skipped until the object
-- changes or leaves the archive tier.
ALTER TABLE work ADD COLUMN archived BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE images DROP CONSTRAINT state_known;
ALTER TABLE images ADD CONSTRAINT state_known CHECK (state IN ('indexed', 'failed', 'skipped'));
