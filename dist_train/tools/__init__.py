"""Tools over a finished run folder: export to transformers (export), average the last checkpoints (average),
validation loss / perplexity (evaluate). Run them as `python -m dist_train.export|average|evaluate`.

Not here: reading checkpoint weights (`dist_train.checkpoint.weights`).
"""
