-- A plan counts the catalog's stale entries (their newer version could not be read) and the
-- deletions it holds back because of them: a listing made with the access that was refused
-- proves nothing gone (`DeletionGuard::holds`).
ALTER TABLE plans
    ADD COLUMN stale BIGINT NOT NULL DEFAULT 0 AFTER unchanged,
    ADD COLUMN held BIGINT NOT NULL DEFAULT 0 AFTER stale;
