"""Sizing a run before paying for it: published and fitted scaling laws (laws, fit), compute-optimal plans and
shapes (plan), memory per GPU (memory), and the `python -m dist_train.scaling` CLI (cli).

Not here: the exact parameter / FLOP count (`dist_train.model.count`, shared with the trainer's MFU).
"""
