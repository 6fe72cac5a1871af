"""The training-time data path: the deterministic, resumable loader over token shards (loader), its read-ahead
thread (prefetch) and which batches (or sequence slices) a rank reads under tensor / sequence parallelism
(parallel).

Not here: making shards (`data_prep`), the shard manifest format (`dist_train.formats.manifest`).
"""
