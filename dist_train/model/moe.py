"""The Mixture-of-Experts MLP: DeepSpeed's MoE layer (router, expert-parallel all-to-all, experts) around our own
MLP as the expert, plus what DeepSpeed leaves to its caller: the router z-loss, each expert's own initial weights,
always-on shared experts, and a record of each forward's router losses and expert load for the loss and the logs.

DeepSpeed's top-2 gate is Mixtral's routing (softmax over all experts, the top k, renormalised over those k).
`top2_2nd_expert_sampling` is turned off: it picks the second expert with Gumbel noise from the global RNG, even in
eval, which no export reproduces. Dropless (capacity_factor 0) sizes each expert's buffer by the busiest expert.
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
    """Token slots over their expert's capacity (0 when dropless)."""


class Expert(MLP):
    """One expert: our MLP, run on the token slots DeepSpeed filled. DeepSpeed hands each expert a (sources, 1,
    capacity, C) buffer per expert-parallel source rank, the capacity being the busiest expert's token count
    (dropless) or the capacity limit, and fills each source's slots from the front (its `locations` are running
    counts), the empty ones zero rows. Computing those would cost as much again as the tokens once the load is
    uneven (8 experts, the busiest at a 30 % share: 2.4 x the routed tokens), so each source's slots up to its last
    filled one are computed, in place, and the rest left zero, which DeepSpeed's combine weights with zero anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = x.shape[-2]
        chunks = x.reshape(-1, slots, x.shape[-1])  # (sources, slots, C)
        positions = torch.arange(1, slots + 1, device=x.device)
        used = (chunks.ne(0).any(-1) * positions).amax(-1).tolist()  # per source: slots up to its last filled one
        out = x.new_zeros(chunks.shape[0], slots, self.down_proj.out_features)
        for source, n in enumerate(used):
            # Also on no slot at all: every expert parameter then gets its (zero) gradient on every rank, which
            # the gradient reduction over the expert-data-parallel ranks needs (or their collectives mismatch).
            out[source, :n] = super().forward(chunks[source, :n])
        return out.view(*x.shape[:-1], out.shape[-1])


class MoEMLP(nn.Module):
    """forward(x (B, T, C)) -> (B, T, C): the routed experts' weighted outputs (+ the shared experts'), and a
    RouterRecord appended to `records` (a list the model owns and empties once per forward)."""

    def __init__(self, cfg: ModelConfig, layer: int, records: list[RouterRecord], ep_size: int = 1,
                 ep_rank: int = 0):
        super().__init__()
        from deepspeed.moe.layer import MoE  # DeepSpeed only where a model has MoE layers

        moe = cfg.moe
        self.layer, self.records = layer, records
        self.num_experts, self.top_k, self.capacity_factor = moe.num_experts, moe.top_k, moe.capacity_factor
        self.ep_rank = ep_rank
        factor = moe.capacity_factor or 1.0  # unused when dropless
        self.moe = MoE(cfg.d_model, Expert(cfg), num_experts=moe.num_experts, ep_size=ep_size, k=moe.top_k,
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
        out, aux_loss, expert_tokens = self.moe(x)  # (B, T, C), scalar, (E,)
        # The gate computes its logits inside DeepSpeed (in fp32); the z-loss needs them too: one (S, C) x (C, E)
        # matmul again, small beside the experts.
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.router.weight.float())  # (S, E)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        self.records.append(RouterRecord(aux_loss, z_loss, expert_tokens.detach(),
                                         self._dropped(expert_tokens, logits.shape[0])))
        if self.shared is not None:
            out = out + self.shared(x)
        return out

    def _dropped(self, expert_tokens: torch.Tensor, tokens: int) -> torch.Tensor:
        """Slots past capacity: DeepSpeed keeps min(count, capacity) per expert, capacity = ceil(tokens / E x
        capacity_factor x k) (its `_capacity`)."""
        if not self.capacity_factor:
            return torch.zeros((), device=expert_tokens.device)
        capacity = math.ceil(tokens / self.num_experts * self.capacity_factor * self.top_k)
        return (expert_tokens - capacity).clamp(min=0).sum().detach()

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
