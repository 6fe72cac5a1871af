"""On-disk formats shared by `data_prep` (which writes them) and the trainer (which reads them).

The shard manifest, the tokenizer folder and the atomic file writer live here, so that `data_prep` imports
`dist_train.formats` and nothing in `dist_train` imports `data_prep`. No torch, no DeepSpeed.
"""
