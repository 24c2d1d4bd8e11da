-- /progress (which the page polls every 5 s) reads the latest run of each shard: the newest run
-- says the shard count, then the newest run of each shard of that count. Both are index range
-- reads now, and a collection keeps its newest runs only (`RUNS_KEPT`, pruned as runs start), so
-- neither grows with the index's age.
ALTER TABLE runs ADD KEY newest (collection, id), ADD KEY by_shard (collection, shards, shard, id);
