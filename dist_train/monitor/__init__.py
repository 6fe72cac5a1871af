"""Watching a run: the logger and its backends (metrics; jsonl: `metrics.jsonl`; wandb_run: W&B, resumable),
reading `.wandb` files back (wandb_reader), throughput, MFU peaks and memory (throughput, memory), and curves (plot).

Not here: sizing a run before it starts (`dist_train.scaling`).
"""
