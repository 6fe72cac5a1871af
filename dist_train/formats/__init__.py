"""On-disk formats shared by `data_prep` (which writes them) and the trainer (which reads them): the shard
manifest, the tokenizer folder, atomic file writes and their error type.

Not here: anything that imports torch or DeepSpeed; `data_prep` imports this package, never the reverse.
"""
