-- An indexed object whose changed version could not be read (the bucket refused or kept failing
-- the GET, an archive tier, a key the client cannot address) keeps its older vector and row:
-- `stale`, with the reason in `error`, tried again by every run until it is read or proven gone.
-- A failed read proves nothing about the object, so it never takes a vector out of search.
ALTER TABLE images DROP CONSTRAINT state_known;
ALTER TABLE images ADD CONSTRAINT state_known CHECK (state IN ('indexed', 'failed', 'skipped', 'stale'));
