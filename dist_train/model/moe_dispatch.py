"""Routing each token to its experts and back: DeepSpeed's top-k gate, then a sort-based dispatch that moves only the
routed token slots, over DeepSpeed's expert-parallel process group.

DeepSpeed 0.19.8's MOELayer pads every expert's buffer to the busiest expert's count over the expert-parallel
ranks when dropless: it all-reduces that count before each dispatch, and each of its 4 all-to-alls per layer and
step (dispatch and combine, forward and backward) sends the whole (experts x capacity x d_model) buffer, 3 x the
routed slots when the busiest of 8 experts takes 3 x its share (as early in training); its experts then have to
find their filled slots on the host (one sync per expert). Here the routes are sorted by expert, the ranks swap
their per-expert slot counts (one small all-to-all, and the one host sync per layer), and `all_to_all_single`
with split sizes sends each rank the rows routed to its experts and nothing else. Which experts a token goes to,
with which weights, what a capacity limit drops and the load-balancing loss are DeepSpeed's gate functions' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Routes:
    """One forward's routing on this rank, DeepSpeed's sparse gate output (routes are route-major: r = j x S + s
    for the j-th choice of token s)."""

    aux_loss: torch.Tensor
    """DeepSpeed's l_aux (load balancing), with its graph."""
    experts: torch.Tensor
    """(k, S) global expert id of each route; -1 where the capacity limit dropped it."""
    locations: torch.Tensor
    """(k, S) each route's row in its expert's buffer in DeepSpeed's MOELayer (the gate's `locations`)."""
    weights: torch.Tensor
    """(k, S) fp32 combine weight of each route (0 where dropped), with its graph to the router."""
    expert_tokens: torch.Tensor
    """(E,) routed slots per expert on this rank, before any drop."""


def route(gate: nn.Module, logits: torch.Tensor) -> Routes:
    """DeepSpeed's TopKGate.forward on fp32 router logits (S, E): its choice of top1/top2/topk gating with the
    gate's own settings, minus the dropless all-reduce of the busiest expert's count over the expert-parallel
    group, which only sizes MOELayer's padded buffers."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

    capacity_factor = gate.capacity_factor if gate.training else gate.eval_capacity_factor
    if gate.k == 1:
        noise = gate.noisy_gate_policy if gate.training else None
        out = top1gating(logits, capacity_factor, gate.min_capacity, None, noise, gate.drop_tokens, gate.use_rts,
                         None, sparse_routes=True)
    elif gate.k == 2:
        out = top2gating(logits, capacity_factor, gate.min_capacity, gate.drop_tokens, None,
                         gate.top2_2nd_expert_sampling, sparse_routes=True)
    else:
        out = topkgating(logits, gate.k, capacity_factor, gate.min_capacity, gate.drop_tokens, None,
                         sparse_routes=True)
    aux_loss, _capacity, _num_experts, experts, locations, weights, expert_tokens = out
    return Routes(aux_loss, experts, locations, weights, expert_tokens)


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single of (rows, C) with per-rank row counts; its backward sends the gradients back the same way
    reversed (DeepSpeed's _AllToAll, with split sizes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        from deepspeed import comm as dist

        ctx.group, ctx.send_rows, ctx.recv_rows = group, send_rows, recv_rows
        out = x.new_empty(sum(recv_rows), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_rows, input_split_sizes=send_rows,
                               group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _AllToAllRows.apply(grad, ctx.group, ctx.recv_rows, ctx.send_rows), None, None, None


def _slot_counts(counts: torch.Tensor, group: Any, ep_size: int) -> tuple[list[int], list[int]]:
    """(slots this rank sends to each global expert (E,), slots it receives for each of its local experts from
    each rank of the group (ep_size x local, source-major)), on the host: the layer's one host sync."""
    if ep_size == 1:
        sent = counts.tolist()
        return sent, sent
    from deepspeed import comm as dist

    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # rank p's share of `counts` is its local experts'
    both = torch.cat([counts, received]).tolist()
    return both[:counts.numel()], both[counts.numel():]


def _rows_per_rank(counts: list[int], ep_size: int) -> list[int]:
    local = len(counts) // ep_size
    return [sum(counts[p * local:(p + 1) * local]) for p in range(ep_size)]


def _run_local_experts(slots: torch.Tensor, received: list[int], experts: list[nn.Module],
                       ep_size: int) -> torch.Tensor:
    """Each local expert once, on its slots from every rank; the output rows in the order they came (source-major,
    then local expert). Every expert runs, also on no slot at all: each expert parameter then gets its (zero)
    gradient on every rank, which the reduction over the expert-data-parallel ranks needs (else their collectives
    mismatch)."""
    local = len(experts)
    chunks = slots.split(received)  # chunk p x local + e: rank p's slots for local expert e
    outputs = []
    for e, expert in enumerate(experts):
        mine = [chunks[p * local + e] for p in range(ep_size)]
        out = expert(torch.cat(mine) if ep_size > 1 else mine[0])  # (slots of expert e, C)
        outputs.append(out.split([len(chunk) for chunk in mine]))
    return torch.cat([outputs[e][p] for p in range(ep_size) for e in range(local)])


def dispatch(x: torch.Tensor, routes: Routes, experts: list[nn.Module], group: Any, ep_size: int) -> torch.Tensor:
    """(S, C) tokens -> (S, C): each token's routed experts' outputs, weighted by its routes' weights. `experts` are
    this rank's share of the ep_size x len(experts) global ones: rank p of DeepSpeed's expert-parallel `group`
    (unused at ep_size 1) holds global experts p x local to (p + 1) x local - 1, as DeepSpeed lays them out."""
    tokens, d_model = x.shape
    routes_per_rank = routes.experts.numel()  # k x S
    num_experts = ep_size * len(experts)
    expert_of_route = routes.experts.reshape(-1).long()  # (k x S,)
    expert_of_route = torch.where(expert_of_route < 0, num_experts, expert_of_route)  # drops sort last, unsent
    # By expert, then by the row DeepSpeed's buffer would give it: each expert's rows in DeepSpeed's order.
    order = torch.argsort(expert_of_route * routes_per_rank + routes.locations.reshape(-1))  # (k x S,) routes
    counts = torch.bincount(expert_of_route, minlength=num_experts + 1)[:num_experts]  # (E,) slots per expert
    sent, received = _slot_counts(counts, group, ep_size)
    kept = order[:sum(sent)]  # (kept routes,)
    slots = x.index_select(0, kept % tokens)  # (kept routes, C), by expert
    send_rows, recv_rows = _rows_per_rank(sent, ep_size), _rows_per_rank(received, ep_size)
    if ep_size > 1:
        slots = _AllToAllRows.apply(slots, group, send_rows, recv_rows)  # (slots for my experts, C)
    out = _run_local_experts(slots, received, experts, ep_size)
    if ep_size > 1:
        out = _AllToAllRows.apply(out, group, recv_rows, send_rows)  # (kept routes, C), back in `kept` order
    routed = out.new_zeros(routes_per_rank, d_model).index_copy(0, kept, out)  # (k x S, C), dropped: 0
    # In fp32 like DeepSpeed's combine (the weights are fp32): the sum over routes keeps its precision in bf16.
    combined = (routed.view(-1, tokens, d_model) * routes.weights.unsqueeze(-1)).sum(0)
    return combined.to(x.dtype)
