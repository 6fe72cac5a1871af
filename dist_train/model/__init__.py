"""The models: shared building blocks (blocks: attention, MLP, norms, RoPE), one module per architecture
(decoder: today's decoder-only Transformer; hf: a transformers model behind the same interface), `build_model`
(build), the loss (loss), sequence parallelism inside the models (sequence_parallel: DeepSpeed-Ulysses around
the attention) and the exact parameter / FLOP count of a config without building it (count).

Not here: how a model is wrapped by DeepSpeed (`dist_train.engine`) or trained (`dist_train.train`).
"""
