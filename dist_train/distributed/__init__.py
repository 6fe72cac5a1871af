"""Processes and their groups: where this process is (environment: the launcher's or SLURM's variables, read here
and nowhere else), the process group and DeepSpeed import (process_group), small collectives (collectives) and the
one gate for rank-0 side effects (rank0).

Not here: data, tensor or sequence sharding of the model (DeepSpeed's engines, set up in `dist_train.engine`).
"""

from dist_train.distributed.collectives import all_gather_objects, mean_over_ranks, sum_over_ranks, world_size
from dist_train.distributed.environment import ProcessPlace, discover, export_torch_env
from dist_train.distributed.process_group import (
    COLLECTIVE_TIMEOUT,
    gathered_for_init,
    import_deepspeed,
    init,
    prepare_accelerator,
    shutdown,
    use_cuda,
)
from dist_train.distributed.rank0 import Rank0

__all__ = ["COLLECTIVE_TIMEOUT", "ProcessPlace", "Rank0", "all_gather_objects", "discover", "export_torch_env",
           "gathered_for_init", "import_deepspeed", "init", "mean_over_ranks", "prepare_accelerator", "shutdown",
           "sum_over_ranks", "use_cuda", "world_size"]
