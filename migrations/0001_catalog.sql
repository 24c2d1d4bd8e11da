-- One row per object of each collection: what was seen, and whether it is in Milvus.
-- The primary key is (collection, id): id is the 63-bit hash of the object key that is also
-- the Milvus primary key. object_key itself can be 1024 bytes, too long for an InnoDB key.
CREATE TABLE IF NOT EXISTS images (
    collection   VARCHAR(255)  NOT NULL,
    id           BIGINT        NOT NULL,
    object_key   VARCHAR(1024) NOT NULL,
    etag         VARCHAR(255)  NULL,
    size         BIGINT        NOT NULL,
    content_hash CHAR(64)      NULL COMMENT 'sha256 of the bytes, hex',
    state        VARCHAR(16)   NOT NULL COMMENT 'indexed | failed',
    error        TEXT          NULL,
    model        VARCHAR(255)  NULL,
    indexed_at   DATETIME(3)   NULL,
    updated_at   DATETIME(3)   NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (collection, id),
    KEY by_state (collection, state),
    CONSTRAINT state_known CHECK (state IN ('indexed', 'failed'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per sync run (a whole `index`, or one shard of an `embed` Job): progress while it runs,
-- the summary when it ends.
CREATE TABLE IF NOT EXISTS runs (
    id          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    collection  VARCHAR(255) NOT NULL,
    shard       INT          NOT NULL,
    shards      INT          NOT NULL,
    status      VARCHAR(16)  NOT NULL COMMENT 'running | succeeded | failed',
    discovered  BIGINT       NOT NULL DEFAULT 0,
    planned     BIGINT       NOT NULL DEFAULT 0 COMMENT 'new + changed objects to embed',
    indexed     BIGINT       NOT NULL DEFAULT 0,
    failed      BIGINT       NOT NULL DEFAULT 0,
    deleted     BIGINT       NOT NULL DEFAULT 0,
    error       TEXT         NULL,
    started_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    finished_at DATETIME(3)  NULL,
    KEY by_collection (collection, started_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
