"""Our config → a DeepSpeed engine: the generated `ds_config.json` (ds_config: ZeRO, precision, gradient clipping,
buckets) and building the model partitioned where ZeRO-3 needs it (build).

Not here: the training loop (`dist_train.train`), checkpoint files (`dist_train.checkpoint`).
"""
