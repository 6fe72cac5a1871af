"""The Mixture-of-Experts MLP: DeepSpeed's MoE layer (router, experts, expert-parallel groups) around our own MLP
as the expert, plus what DeepSpeed leaves to its caller: the router z-loss, each expert's own initial weights,
always-on shared experts, and a record of each forward's router losses and expert load for the loss and the logs.

DeepSpeed's top-2 gate is Mixtral's routing (softmax over all experts, the top k, renormalised over those k).
`top2_2nd_expert_sampling` is turned off: it picks the second expert with Gumbel noise from the global RNG, even in
eval, which no export reproduces. The tokens go to their experts and back by `moe_dispatch` (DeepSpeed's gate, then
a sort-based dispatch in DeepSpeed's expert-parallel group that sends only the routed slots), not by DeepSpeed's
MOELayer.forward, which pads every expert to the busiest one's count when dropless (capacity_factor 0).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import ModelConfig
from dist_train.model.blocks import MLP
from dist_train.model.moe_dispatch import dispatch, route


@dataclass
class RouterRecord:
    """One MoE layer's forward: its losses (with their graph, for the backward) and its expert load."""

    aux_loss: torch.Tensor
    """Load-balancing loss (GShard/Switch, DeepSpeed's l_aux): 1 when the load is uniform."""
    z_loss: torch.Tensor
    """ST-MoE router z-loss: mean over tokens of logsumexp(router logits)^2."""
    expert_tokens: torch.Tensor
    """(num_experts,) routed token slots per expert on this rank (top_k per token), before any drop."""
    dropped: torch.Tensor
    """Token slots over their expert's capacity, which DeepSpeed's gate dropped (0 when dropless)."""


class MoEMLP(nn.Module):
    """forward(x (B, T, C)) -> (B, T, C): the routed experts' weighted outputs (+ the shared experts'), and a
    RouterRecord appended to `records` (a list the model owns and empties once per forward)."""

    def __init__(self, cfg: ModelConfig, layer: int, records: list[RouterRecord], ep_size: int = 1,
                 ep_rank: int = 0):
        super().__init__()
        from deepspeed.moe.layer import MoE  # DeepSpeed only where a model has MoE layers

        moe = cfg.moe
        self.layer, self.records = layer, records
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.ep_rank = ep_rank
        factor = moe.capacity_factor or 1.0  # unused when dropless
        self.moe = MoE(cfg.d_model, MLP(cfg), num_experts=moe.num_experts, ep_size=ep_size, k=moe.top_k,
                       capacity_factor=factor, eval_capacity_factor=factor, min_capacity=0,
                       drop_tokens=moe.capacity_factor > 0, use_rts=False, top2_2nd_expert_sampling=False)
        self.shared = None
        if moe.shared_experts:
            self.shared = MLP(dataclasses.replace(cfg, d_ff=cfg.d_ff * moe.shared_experts))

    @property
    def router(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg  # (E, C), no bias

    @property
    def local_experts(self) -> list[nn.Module]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (S, C)
        # DeepSpeed's gate computes these fp32 logits itself; computed here once, for the routing and the z-loss.
        logits = F.linear(flat.float(), self.router.weight.float())  # (S, E)
        routes = route(self.moe.deepspeed_moe.gate, logits)
        out = dispatch(flat, routes, self.local_experts, self.moe.deepspeed_moe.ep_group, self.moe.ep_size)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        dropped = routes.experts.lt(0).sum()
        self.records.append(RouterRecord(routes.aux_loss, z_loss, routes.expert_tokens.detach(), dropped))
        out = out.view_as(x)  # (B, T, C)
        if self.shared is not None:
            out = out + self.shared(x)
        return out

    @torch.no_grad()
    def init_experts(self, cfg: ModelConfig, seed: int) -> None:
        """Each expert its own weights, drawn from a generator seeded by (seed, layer, global expert id):
        DeepSpeed deep-copies one expert into all of them, and the global id makes any expert-parallel size
        start from the same model."""
        local = self.local_experts
        for i, expert in enumerate(local):
            expert_id = self.ep_rank * len(local) + i
            generator = torch.Generator().manual_seed(hash((seed, self.layer, expert_id)) % 2**63)
            for module in expert.modules():
                if isinstance(module, nn.Linear):
                    std = cfg.init_std / (math.sqrt(2 * cfg.n_layers) if getattr(module, "is_residual_out", False)
                                          else 1.0)
                    weight = torch.empty(module.weight.shape).normal_(0.0, std, generator=generator)
                    module.weight.copy_(weight)
                    if module.bias is not None:
                        module.bias.zero_()


def is_expert_parameter(param: nn.Parameter) -> bool:
    """DeepSpeed marks expert parameters `allreduce=False`: they are averaged over the expert-data-parallel group
    only, and saved in their own files."""
    return getattr(param, "allreduce", True) is False


def router_losses(records: list[RouterRecord], cfg: ModelConfig) -> torch.Tensor | None:
    """aux_loss_coef x the sum of the layers' load-balancing losses + z_loss_coef x the sum of their z-losses;
    None for a dense model."""
    if not records:
        return None
    moe = cfg.moe
    return (moe.aux_loss_coef * torch.stack([r.aux_loss for r in records]).sum()
            + moe.z_loss_coef * torch.stack([r.z_loss for r in records]).sum())


def expert_load(expert_tokens: torch.Tensor) -> dict[str, float]:
    """moe_load_min / moe_load_max: the smallest and largest share of its layer's routed token slots that any
    expert took, from (layers, E) slot counts (1/E each when balanced)."""
    shares = expert_tokens / expert_tokens.sum(-1, keepdim=True)  # (layers, E)
    return {"moe_load_min": shares.min().item(), "moe_load_max": shares.max().item()}


class RouterWindow:
    """Router statistics summed over the training forwards since the last log line, on the device (no host sync
    per step); `take` reduces them over the ranks and starts a new window."""

    def __init__(self) -> None:
        self.forwards = 0
        self.sums: torch.Tensor | None = None  # [aux, z, dropped] summed over layers and forwards
        self.expert_tokens: torch.Tensor | None = None  # (layers, E)

    def add(self, records: list[RouterRecord]) -> None:
        sums = torch.stack([torch.stack([r.aux_loss.detach(), r.z_loss.detach(), r.dropped.float()]).float()
                            for r in records]).sum(0)  # (3,)
        tokens = torch.stack([r.expert_tokens.float() for r in records])  # (layers, E)
        self.sums = sums if self.sums is None else self.sums + sums
        self.expert_tokens = tokens if self.expert_tokens is None else self.expert_tokens + tokens
        self.forwards += 1

    def take(self) -> dict[str, float]:
        """moe_aux_loss, moe_z_loss: per forward, summed over layers, averaged over ranks; moe_load_min/max: the
        smallest and largest share of routed token slots any expert of any layer took (1/E when balanced);
        moe_dropped_tokens: token slots dropped past capacity, all ranks. Every rank must call it."""
        from dist_train import distributed

        if self.sums is None:
            return {}
        packed = torch.cat([self.sums, self.expert_tokens.flatten()]).double()
        total = distributed.sum_over_ranks(packed)
        ranks = distributed.world_size()
        tokens = total[3:].view_as(self.expert_tokens)
        out = {"moe_aux_loss": total[0].item() / self.forwards / ranks,
               "moe_z_loss": total[1].item() / self.forwards / ranks,
               **expert_load(tokens), "moe_dropped_tokens": int(total[2].item())}
        self.__init__()
        return out
