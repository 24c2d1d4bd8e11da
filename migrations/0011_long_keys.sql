-- Keys as long as every supported store allows: Azure takes 1024 characters, up to 4096 bytes of
-- UTF-8 (S3 and GCS take 1024 bytes). InnoDB indexes at most 3072 bytes, so the ordered index
-- the diff reads holds the key's first 1024 bytes (`key_head`, kept by MariaDB); keys longer
-- than that share heads only with each other, and the reader orders those by the whole key
-- (`Catalog::entries_page`). Every key of S3's and GCS's length is still wholly in the index.
ALTER TABLE images
    MODIFY object_key VARBINARY(4096) NOT NULL,
    ADD COLUMN key_head VARBINARY(1024) AS (LEFT(object_key, 1024)) PERSISTENT AFTER object_key,
    DROP KEY by_key,
    ADD KEY by_key (collection, key_head, etag, size, state, retry);

ALTER TABLE work MODIFY object_key VARBINARY(4096) NOT NULL;

-- Keys longer than the columns hold (no supported store makes them) are counted, not planned.
ALTER TABLE plans ADD COLUMN too_long BIGINT NOT NULL DEFAULT 0 AFTER held;
