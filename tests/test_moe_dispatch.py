"""The sort-based MoE dispatch (dist_train.model.moe_dispatch) computes what DeepSpeed's own MOELayer computes, on
one process and over a real 2-process expert-parallel group (gloo), and sends only the routed token slots."""

from __future__ import annotations

import math

import pytest
import torch
from distributed_helpers import REPO, run_distributed

from dist_train.config import load_config

MOE_TINY = REPO / "configs" / "moe-tiny.yaml"
EXPERTS = 8


def moe_layer(top_k: int, capacity_factor: float, ep_size: int = 1, ep_rank: int = 0):
    """moe-tiny's MoE MLP with 8 experts, this rank's share of them at ep_size > 1."""
    from dist_train.model.moe import MoEMLP

    cfg = load_config(MOE_TINY, ["data.path=unused", f"model.moe.num_experts={EXPERTS}", f"model.moe.top_k={top_k}",
                                 f"model.moe.capacity_factor={capacity_factor}", f"parallel.expert={ep_size}"]).model
    torch.manual_seed(0)  # the router: the same on every rank
    layer = MoEMLP(cfg, 0, [], ep_size, ep_rank)
    layer.init_experts(cfg, seed=1)  # each expert from its global id, whichever rank holds it
    return layer


def forward_backward(layer, x: torch.Tensor, deepspeed_layer: bool) -> dict[str, torch.Tensor]:
    """Output, the record's aux loss, and the gradients of (output^2).mean() + aux loss to the input and weights."""
    layer.zero_grad()
    x = x.detach().requires_grad_()
    if deepspeed_layer:
        out, aux_loss, _ = layer.moe(x)
    else:
        out = layer(x)
        aux_loss = layer.records[-1].aux_loss
    (out.square().mean() + aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return {"out": out.detach(), "aux_loss": aux_loss.detach(), "input": x.grad, **grads}


def test_sorted_dispatch_gives_deepspeeds_moe_layer_outputs_gradients_and_counts_its_drops() -> None:
    """One process, top-1, 2 and 3, dropless and with a capacity limit: DeepSpeed's MOELayer.forward (padded
    buffers) on the same weights, to fp32 rounding (an expert's weight gradient sums over its rows, which DeepSpeed
    pads with zero rows); the record counts the slots DeepSpeed leaves out, those past min(count, capacity) per
    expert."""
    mismatches = run_distributed(_compare_with_deepspeed_layer, 1)[0]
    assert not mismatches, "\n".join(mismatches)


def _compare_with_deepspeed_layer(rank: int, world_size: int) -> list[str]:
    mismatches = []
    for top_k in (1, 2, 3):
        for capacity_factor in (0.0, 0.5):
            layer = moe_layer(top_k, capacity_factor)
            x = torch.randn(4, 64, 128)  # 256 tokens
            ours, theirs = forward_backward(layer, x, False), forward_backward(layer, x, True)
            record = layer.records[-1]
            capacity = math.ceil(256 / EXPERTS * capacity_factor * top_k) if capacity_factor else 256 * top_k
            dropped = (record.expert_tokens - capacity).clamp(min=0).sum()
            case = f"top-{top_k}, capacity_factor {capacity_factor}"
            mismatches += [f"{case}: {name}" for name in theirs
                           if not torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-8)]
            if record.dropped != dropped or (dropped > 0) != (capacity_factor > 0):
                mismatches.append(f"{case}: {record.dropped} slots counted as dropped, {dropped} dropped")
    return mismatches


@pytest.mark.slow
def test_expert_parallel_dispatch_sends_only_the_routed_slots_and_computes_what_one_process_does() -> None:
    """2 processes at EP=2, each with its own tokens: the layer's output, load-balancing loss and input and router
    gradients equal an EP=1 layer's on the same tokens, and the all-to-alls carry the routed slots (2 x 256 per
    rank), not DeepSpeed's padded (experts x busiest expert's count) buffers, which an uneven load makes larger."""
    results = run_distributed(_expert_parallel_against_one_process, 2)
    for sent, busiest in results:
        assert busiest > 512 // EXPERTS, "the load is uneven: a padded buffer would hold more than the slots"
        # Rows each rank sends: dispatch (its slots), combine (its experts' results), then their backwards.
        assert sent[0] == sent[2] == 512 and sent[1] == sent[3]
    assert sum(sent[1] for sent, _ in results) == 2 * 512, "each slot computed once, on its expert's rank"


def _expert_parallel_against_one_process(rank: int, world_size: int) -> tuple[list[int], int]:
    from deepspeed import comm
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(world_size)
    parallel, single = moe_layer(2, 0.0, world_size, rank), moe_layer(2, 0.0)
    parallel.moe.set_deepspeed_parallelism()
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 128, 128)  # 256 tokens of this rank's own
    sent_rows = []
    all_to_all = comm.all_to_all_single

    def recording(output, tensor, output_split_sizes=None, input_split_sizes=None, **kwargs):
        if input_split_sizes is not None:  # the slots, not the per-expert counts
            sent_rows.append(tensor.shape[0])
        return all_to_all(output, tensor, output_split_sizes, input_split_sizes, **kwargs)

    comm.all_to_all_single = recording
    try:
        ours = forward_backward(parallel, x, False)
    finally:
        comm.all_to_all_single = all_to_all
    reference = forward_backward(single, x, False)
    for name in ("out", "aux_loss", "input", "moe.deepspeed_moe.gate.wg.weight"):
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)
    return sent_rows, int(parallel.records[-1].expert_tokens.max())
