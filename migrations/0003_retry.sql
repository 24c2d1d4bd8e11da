-- A failure that is not about the bytes (the bucket refused or kept failing the GET, so the bytes
-- were never seen): the next run tries the object again even though its etag is unchanged.
-- Failures of the bytes themselves (corrupt, too large, not an image) stay until the object changes.
ALTER TABLE images ADD COLUMN retry BOOLEAN NOT NULL DEFAULT FALSE;
