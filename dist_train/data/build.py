"""`build_loader`: the loader a config's objective needs, next-token windows or span-corrupted examples.
"""

from __future__ import annotations

from dist_train.config import Config
from dist_train.data.loader import TokenLoader
from dist_train.data.span_corruption import SpanCorruptionLoader

Loader = TokenLoader | SpanCorruptionLoader


def build_loader(cfg: Config, split: str, rank: int, world_size: int, model_vocab: int,
                 micro_batch_size: int | None = None) -> Loader:
    """model.arch=decoder: (inputs, targets) windows; encoder_decoder: (encoder input, decoder input, labels),
    sentinels at the top of the model's `model_vocab` ids (`dist_train.model.build.model_vocab_size`)."""
    micro = micro_batch_size or cfg.train.micro_batch_size
    sources, seed = cfg.data.weighted_paths(), cfg.train.seed
    if cfg.model.arch == "decoder":
        return TokenLoader(sources, split, cfg.model.seq_len, micro, rank, world_size, seed)
    return SpanCorruptionLoader(sources, split, cfg.model.seq_len, model_vocab, micro, rank, world_size, seed,
                                cfg.data.noise_density, cfg.data.mean_noise_span_length)
