"""The baseline of bench/throughput.py: HF `Trainer` with DeepSpeed on the same model, data, batch and
DeepSpeed config as our trainer. Run under the deepspeed launcher; rank 0 writes a JSON result.

    deepspeed --num_gpus N bench/hf_trainer_baseline.py --config C --hf-config DIR --steps S --out R.json [k=v...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from dist_train.config import load_config  # noqa: E402
from dist_train.data.loader import TokenLoader  # noqa: E402
from dist_train.distributed.process_group import unlink_shm_workspace  # noqa: E402
from dist_train.engine.ds_config import deepspeed_config


class WindowDataset(torch.utils.data.Dataset):
    """The training split's seq_len-token windows, in our loader's global order (HF shifts labels itself)."""

    def __init__(self, loader: TokenLoader, num_samples: int, seq_len: int):
        self.loader, self.num_samples, self.seq_len = loader, num_samples, seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.loader.window(i)[: self.seq_len].astype("int64"))
        return {"input_ids": ids, "labels": ids}


class StepTimer(TrainerCallback):
    """The time each step ends; on the CPU, once training begins, it also removes the names of DeepSpeed's
    shared-memory all-reduce files, which DeepSpeed never does (see distributed.process_group)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - HF's callback signature
        if not torch.cuda.is_available():  # deepspeed.initialize started its CPU all-reduce: /dev/shm files
            unlink_shm_workspace()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.times.append(time.perf_counter())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--hf-config", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--out", required=True)
    p.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    p.add_argument("--attn", help="the model's attn_implementation (transformers' default: sdpa)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds = deepspeed_config(cfg, world)
    t = cfg.train
    loader = TokenLoader(cfg.data.weighted_paths(), "train", cfg.model.seq_len, t.micro_batch_size, 0, 1, t.seed)
    samples = args.steps * ds["train_batch_size"]
    torch.manual_seed(t.seed)
    kwargs = {"attn_implementation": args.attn} if args.attn else {}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.hf_config, trust_remote_code=False),
                                             trust_remote_code=False, **kwargs)
    training_args = TrainingArguments(
        output_dir=str(Path(args.out).parent / "hf_trainer_out"), use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=ds["gradient_accumulation_steps"],
        max_steps=args.steps, learning_rate=t.lr, lr_scheduler_type="cosine", warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, adam_beta1=t.beta1, adam_beta2=t.beta2, adam_epsilon=t.eps,
        max_grad_norm=t.grad_clip, bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16",
        logging_steps=10**9, save_strategy="no", report_to=[], deepspeed=ds, seed=t.seed,
        dataloader_num_workers=0, disable_tqdm=True, torch_compile=args.compile,
        # fp32 matmuls in TF32 or not, as our trainer runs them (train.tf32); HF turns TF32 on only when compiling
        tf32=cfg.train.tf32 if torch.cuda.is_available() else None,
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=WindowDataset(loader, samples, cfg.model.seq_len),
                      callbacks=[timer])
    trainer.train()
    timed = timer.times[args.warmup_steps:]
    seconds_per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    tokens_per_step = ds["train_batch_size"] * cfg.model.seq_len
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({"tokens_per_s": tokens_per_step / seconds_per_step,
                                              "seconds_per_step": seconds_per_step, "steps": args.steps}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
