-- Collection names are case-sensitive in Milvus, so they are here too: `Photos` and `photos` are
-- two collections, never one catalog. Each collection records who owns it (an ImageIndex by UID,
-- or a name a CLI run gives), so two indexes that resolve to one name never share it.
ALTER TABLE images MODIFY collection VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE runs MODIFY collection VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE collections MODIFY collection VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
-- NULL: no model recorded yet (claimed, nothing embedded).
ALTER TABLE collections MODIFY model VARCHAR(255) NULL;
-- NULL: made before owners were recorded, or released; the next claim takes it.
ALTER TABLE collections ADD COLUMN owner VARCHAR(512) NULL;
