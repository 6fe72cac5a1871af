"""Checkpoints: the folder layout and client state (layout), atomic save + publish + prune (save), each rank's
checked file writes (writer), file sizes and hashes written at save and checked before a load (verify), what a
resume may change and from where it starts (resume), RNG state (rng) and each rank's client file (client_file),
reading checkpoint files without running code from them (safe_load), world-size changes through universal
checkpoints (reshard) and reading weights back for the tools (weights; tensor_shards joins a tensor-parallel
run's shards).

Not here: the tools that use the weights (`dist_train.tools`).
"""
