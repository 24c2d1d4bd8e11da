-- The collections behind one index name, the Milvus alias that search reads: one generation
-- serves, a newer one may be building (a model, precision, width or index change), older ones
-- are retired and dropped after a grace period unless kept. The alias says which one serves;
-- this table keeps what Milvus cannot: when each was made, retired, and why a build failed.
CREATE TABLE IF NOT EXISTS generations (
    name        VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL COMMENT 'the index: the Milvus alias',
    number      INT          NOT NULL,
    collection  VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL COMMENT 'the Milvus collection',
    catalog     VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL
                COMMENT 'the catalog rows (images.collection): the collection, but a collection made before generations keeps its name here',
    state       VARCHAR(16)  NOT NULL COMMENT 'building | serving | retired | failed | dropped',
    reason      TEXT         NULL COMMENT 'why the build failed',
    keep        BOOLEAN      NOT NULL DEFAULT FALSE COMMENT 'retired but never dropped',
    created_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    swapped_at  DATETIME(3)  NULL COMMENT 'when search moved to it',
    retired_at  DATETIME(3)  NULL COMMENT 'when search moved off it',
    PRIMARY KEY (name, number),
    CONSTRAINT state_known CHECK (state IN ('building', 'serving', 'retired', 'failed', 'dropped'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
