-- Two keys whose 63-bit ids are equal (about once in 10^19 pairs: 0.05% of buckets of 100 M
-- objects) would share a catalog row and a Milvus primary key, each overwriting the other on
-- every run. A plan leaves the later key out and records it here, with the key that holds the
-- id; it is listed with the failures of the plan's collection.
CREATE TABLE IF NOT EXISTS key_collisions (
    seq        BIGINT          NOT NULL AUTO_INCREMENT PRIMARY KEY,
    plan       BIGINT          NOT NULL,
    id         BIGINT          NOT NULL,
    object_key VARBINARY(4096) NOT NULL COMMENT 'the key left out',
    held_by    VARBINARY(4096) NOT NULL COMMENT 'the key that holds the id',
    KEY by_plan (plan, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

ALTER TABLE plans ADD COLUMN collided BIGINT NOT NULL DEFAULT 0 AFTER too_long;
