-- Keys as bytes, in the order buckets list them (S3, GCS and Azure list by the key's UTF-8
-- bytes), and indexed that way: a sync merges the listing with the catalog read in key order,
-- page by page, so that neither is ever held whole. The index covers every column the diff reads,
-- so the read is a scan of the index alone: through the primary key instead, each row is a
-- random lookup, and at a million rows the read took 11 s instead of about 1. Sizes in bytes:
-- collection 1020 (utf8mb4), key 1024 (S3's longest), etag 255, state 64, within InnoDB's 3072.
ALTER TABLE images
    MODIFY object_key VARBINARY(1024) NOT NULL,
    MODIFY etag VARBINARY(255) NULL,
    ADD KEY by_key (collection, object_key, etag, size, state, retry);

-- One row per plan: one listing of the bucket diffed against the catalog. What it found to do is
-- in `work`; the embedding shards read their own rows of it and never list the bucket.
CREATE TABLE IF NOT EXISTS plans (
    id            BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    collection    VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    status        VARCHAR(16)  NOT NULL COMMENT 'planning | ready | refused | failed',
    listing_began DATETIME(3)  NOT NULL COMMENT 'rows written since are newer than the listing: never deleted by it',
    discovered    BIGINT       NOT NULL DEFAULT 0,
    catalog       BIGINT       NOT NULL DEFAULT 0 COMMENT 'catalog entries the diff read',
    new           BIGINT       NOT NULL DEFAULT 0,
    changed       BIGINT       NOT NULL DEFAULT 0,
    deleted       BIGINT       NOT NULL DEFAULT 0,
    unchanged     BIGINT       NOT NULL DEFAULT 0,
    refused       TEXT         NULL COMMENT 'why its deletions are refused (the deletion guard)',
    created_at    DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    finished_at   DATETIME(3)  NULL,
    KEY by_collection (collection, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- What a plan found to do, one row per object: embed (new, changed) or remove (deleted). A shard
-- reads the ids of its range in order and deletes each row once its result is written, so a
-- shard that is retried carries on where it stopped.
CREATE TABLE IF NOT EXISTS work (
    plan        BIGINT          NOT NULL,
    id          BIGINT          NOT NULL,
    object_key  VARBINARY(1024) NOT NULL,
    etag        VARCHAR(255)    NULL,
    size        BIGINT          NOT NULL,
    kind        VARCHAR(8)      NOT NULL COMMENT 'new | changed | deleted',
    indexed     BOOLEAN         NOT NULL COMMENT 'the object has a vector now',
    PRIMARY KEY (plan, id),
    CONSTRAINT kind_known CHECK (kind IN ('new', 'changed', 'deleted'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
