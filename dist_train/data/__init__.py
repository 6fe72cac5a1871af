"""The training-time data path: the deterministic, resumable loader over token shards (loader) and its read-ahead
thread (prefetch).

Not here: making shards (`data_prep`), the shard manifest format (`dist_train.formats.manifest`).
"""
