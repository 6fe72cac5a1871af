"""Our config → a DeepSpeed engine: the generated `ds_config.json` (ds_config: ZeRO, precision, gradient clipping,
buckets, AutoTP) and building the model partitioned where ZeRO-3 needs it (build); the rank layout and process
groups of tensor and sequence parallelism (parallel).

Not here: the training loop (`dist_train.train`), checkpoint files (`dist_train.checkpoint`).
"""
