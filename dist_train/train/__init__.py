"""The training loop: `train()` read top to bottom (trainer), one optimizer step and the bad-step count (step),
the optimizer and lr schedules (optim), stop signals (signals) and the checks before launch (preflight).

Not here: checkpoint files (`dist_train.checkpoint`), metrics backends (`dist_train.monitor`).
"""
