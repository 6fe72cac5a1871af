"""`build_loader`: the loader a config's objective needs, next-token windows (sliced per rank under sequence
parallelism) or span-corrupted examples.
"""

from __future__ import annotations

from dist_train.config import Config
from dist_train.data.loader import TokenLoader
from dist_train.data.parallel import SequenceSlices, rank_batches
from dist_train.data.span_corruption import SpanCorruptionLoader

Loader = TokenLoader | SequenceSlices | SpanCorruptionLoader


def build_loader(cfg: Config, split: str, data_rank: int, data_size: int, model_vocab: int,
                 micro_batch_size: int | None = None, sequence_rank: int = 0, sequence_size: int = 1) -> Loader:
    """model.arch=decoder: (inputs, targets) windows of data-parallel shard `data_rank` of `data_size`, this rank's
    slice of them when sequence-parallel; encoder_decoder: (encoder input, decoder input, labels), sentinels at the
    top of the model's `model_vocab` ids (`dist_train.model.build.model_vocab_size`)."""
    micro = micro_batch_size or cfg.train.micro_batch_size
    sources, seed = cfg.data.weighted_paths(), cfg.train.seed
    if cfg.model.arch == "decoder":
        return rank_batches(sources, split, cfg.model.seq_len, micro, seed, data_rank, data_size, sequence_rank,
                            sequence_size)
    return SpanCorruptionLoader(sources, split, cfg.model.seq_len, model_vocab, micro, data_rank, data_size, seed,
                                cfg.data.noise_density, cfg.data.mean_noise_span_length)
