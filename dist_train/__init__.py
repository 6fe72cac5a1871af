"""dist_train: pretrain Transformer language models with DeepSpeed, from token shards to an exported model.

One package per stage: config/ (the typed run config), model/, data/ (the training loader), engine/ (our config
→ a DeepSpeed engine), train/ (the loop), distributed/, checkpoint/, monitor/, tools/ (export, average, evaluate),
scaling/; formats/ holds the on-disk formats shared with `data_prep`. `python -m dist_train.X` names the CLIs.
"""
