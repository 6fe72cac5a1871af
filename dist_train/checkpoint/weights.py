"""The fp32 weights of a checkpoint or of a weights folder, read one tensor at a time.

Two sources, one interface (`Weights`: the run's config, the parameter names, `get(name)`):
- a checkpoint folder (`RUN/checkpoints/step_N`) of any ZeRO stage. ZeRO 1-3 master weights are gathered with
  DeepSpeed's `zero_to_fp32` in lazy mode: the shards are memory-mapped and their optimizer moments dropped,
  and under ZeRO-3 each tensor is assembled from its per-rank slices only when asked for, so consolidating
  never holds more than the tensors the caller keeps (export keeps one output shard).
- a weights folder written by `dist_train.average` (`model.safetensors` in our parameter names,
  `config.yaml`, `weights.json`), read lazily with safetensors.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.layout import read_client_state, resolve_checkpoint
from dist_train.checkpoint.tensor_shards import tensor_parallel_ranks, tensor_parallel_state
from dist_train.checkpoint.safe_load import check_folder, checkpoint_reads
from dist_train.checkpoint.verify import VerifyMode, refuse_if_corrupt
from dist_train.config import Config, config_from_dict, load_config
from dist_train.formats.atomic_file import apply_umask_modes

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_META = "weights.json"


@dataclass
class Weights:
    config: Config
    """The config of the run that trained these weights (its model section builds the model)."""
    names: list[str]
    """Parameter names in our scheme (`dist_train.model`), a tied tensor under each of its names."""
    getter: Callable[[str], torch.Tensor]
    """Materialises one fp32 tensor."""
    source: str
    """Human-readable origin: `RUN/checkpoints/step_N` or a weights folder."""
    meta: dict[str, Any] = field(default_factory=dict)
    """step (checkpoints) or the averaged steps (weights folders)."""

    @property
    def aliases(self) -> dict[str, str]:
        """{alias: name} of tensors stored once under another name (a tied output head)."""
        m = self.config.model
        return {"lm_head.weight": "tok_emb.weight"} if m.tie_embeddings and not m.hf_config else {}

    @property
    def unique_names(self) -> list[str]:
        return [n for n in self.names if n not in self.aliases]

    def get(self, name: str) -> torch.Tensor:
        return self.getter(self.aliases.get(name, name)).float()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.get(name)

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Copy the weights into `model` one tensor at a time (no second full copy); names must match."""
        target = model.state_dict()
        missing, unexpected = sorted(set(target) - set(self.names)), sorted(set(self.names) - set(target))
        if missing or unexpected:
            raise ValueError(f"{self.source} does not fit the model of its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(self.get(name))
        return model


def _zero_state(path: Path) -> dict[str, Any]:
    """Lazy fp32 state dict of a ZeRO 1-3 checkpoint (values have `.contiguous()`), or of a stage-0 one. Called
    inside `checkpoint_reads`: every file is read by a weights_only load, zero_to_fp32's reads included."""
    if list(path.glob(EXPERT_FILES)):
        return _moe_module_state(path)
    if not list(path.glob("*_optim_states.pt")):
        # ZeRO stage 0: the module's own state dict is the whole model (fp32 unless trained in bf16/fp16).
        sd = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=True)
        return sd["module"]
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints (also on import); stdout may carry --json
        if _is_bf16_optimizer_checkpoint(path):
            return _bf16_optimizer_state(path)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name, lazy_mode=True)


EXPERT_FILES = "layer_*_expert_*_mp_rank_*_model_states.pt"
"""DeepSpeed MoE: each expert's weights in a file of its own (layer = the MoE layer's index among MoE layers)."""


def _moe_module_state(path: Path) -> dict[str, torch.Tensor]:
    """The module's weights of a Mixture-of-Experts checkpoint: the dense ones from `mp_rank_00_model_states.pt`,
    each expert's from its own file, saved under its global expert id (so the names are those of a model holding
    every expert). zero_to_fp32 cannot read these (expert parameter groups are partitioned over other ranks than
    the rest), so the weights are the module's own, in the training precision: exact for fp32 runs; for bf16 and
    fp16 runs the weights the model computed with, not the fp32 masters of the optimizer."""
    state = dict(torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True,
                            weights_only=True)["module"])
    for file in sorted(path.glob(EXPERT_FILES)):
        state.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return state


BF16_OPTIMIZER_PREFIX = "bf16_zero_pp_rank_"


def _is_bf16_optimizer_checkpoint(path: Path) -> bool:
    """BF16_Optimizer's files, not ZeRO's: bf16 ZeRO-3 names its files `bf16_zero_pp_rank_*` too, but only ZeRO's
    optimizer state says its stage."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    files = sorted(path.glob(f"{BF16_OPTIMIZER_PREFIX}*_optim_states.pt"))
    if not files:
        return False
    state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=True)[OPTIMIZER_STATE_DICT]
    return ZERO_STAGE not in state


def _bf16_optimizer_state(path: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights of a BF16_Optimizer checkpoint (bf16 at ZeRO-1 with fp32 gradient sums), which
    zero_to_fp32 refuses ("is not a zero checkpoint": its optimizer state has no `zero_stage`). Its layout is
    ZeRO-2's: each rank saved its slice of every parameter group's flat fp32 vector, the groups padded at the end
    to a multiple of 2 x ranks, and the model states file names the shapes in order; so DeepSpeed's own ZeRO-2
    reassembly reads it once the slices are gathered, rank by rank."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS
    from deepspeed.utils.zero_to_fp32 import (_get_fp32_state_dict_from_zero2_checkpoint, get_model_state_files,
                                              parse_model_states)

    files = sorted(path.glob(f"{BF16_OPTIMIZER_PREFIX}*_optim_states.pt"),
                   key=lambda f: int(f.name[len(BF16_OPTIMIZER_PREFIX):].split("_")[0]))
    slices = []
    for file in files:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)[OPTIMIZER_STATE_DICT]
        ranks = max(state[PARTITION_COUNT]) if isinstance(state[PARTITION_COUNT], list) else state[PARTITION_COUNT]
        if ranks != len(files):
            raise ValueError(f"{file} was saved by one of {ranks} ranks, but {path} holds "
                             f"{len(files)} optimizer files: a rank's file is missing")
        slices.append(state[SINGLE_PARTITION_OF_FP32_GROUPS])
    model_states = parse_model_states(get_model_state_files(str(path)))
    return _get_fp32_state_dict_from_zero2_checkpoint(len(files), slices, model_states,
                                                      exclude_frozen_parameters=False)


def checkpoint_weights(path: Path, trust: bool = False, verify: VerifyMode = "full") -> Weights:
    """The weights of checkpoint folder `path`, checked against its files.json first (`verify`: full or sizes;
    CorruptCheckpoint names the file); a folder with a file that could run code when read is refused
    (UnsafeCheckpointError) unless `trust`."""
    refuse_if_corrupt(path, verify)
    meta = read_client_state(path)
    cfg = config_from_dict(meta["config"])
    check_folder(path, trust)
    with checkpoint_reads(trust=trust):  # every torch.load below, DeepSpeed's zero_to_fp32 included
        if tensor_parallel_ranks(path) > 1:  # each tensor-parallel rank saved its shards: join them
            names, getter = tensor_parallel_state(path, cfg)
        else:
            lazy = _zero_state(path)
            names, getter = list(lazy), lambda name: lazy[name].contiguous()
    return Weights(config=cfg, names=names, getter=getter, source=str(path), meta={"step": meta["train_state"]["step"]})


def folder_weights(path: Path) -> Weights:
    from safetensors import safe_open

    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} is not a weights folder (no {WEIGHTS_FILE}); make one with "
                                f"`python -m dist_train.average --run RUN --last K --out {path}`")
    cfg = load_config(path / "config.yaml")
    meta = json.loads((path / WEIGHTS_META).read_text()) if (path / WEIGHTS_META).exists() else {}
    handle = safe_open(str(path / WEIGHTS_FILE), framework="pt")
    weights = Weights(config=cfg, names=list(handle.keys()), getter=handle.get_tensor, source=str(path), meta=meta)
    weights.names += [alias for alias in weights.aliases if alias not in weights.names]
    return weights


def open_weights(run: Path | None = None, step: int | None = None, weights: Path | None = None,
                 trust: bool = False, verify: VerifyMode = "full") -> Weights:
    """A weights folder, or the checkpoint of `step` (default: the latest) of a run folder (see
    `checkpoint_weights` for `trust` and `verify`)."""
    if weights is not None:
        return folder_weights(Path(weights))
    if run is None:
        raise ValueError("give a run folder (--run) or a weights folder (--weights)")
    return checkpoint_weights(resolve_checkpoint(Path(run), step), trust, verify)


def save_weights_folder(out: Path, tensors: dict[str, torch.Tensor], cfg: Config, meta: dict[str, Any]) -> None:
    """Write the files of a weights folder into `out` (made if missing); `tensors` holds no tied alias.
    `dist_train.average` writes it through `dist_train.tools.output_folder`, which makes it atomic and never
    replaces a folder it did not write."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.yaml").write_text(cfg.to_yaml())
    (out / WEIGHTS_META).write_text(json.dumps(meta, indent=2) + "\n")
    apply_umask_modes(out)  # safetensors writes 0600 whatever the umask
