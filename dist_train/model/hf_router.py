"""The routers of a transformers Mixture-of-Experts model (`model.hf_config` naming Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, ...): which configs have a load-balancing loss, and the window of router statistics for the log.

transformers computes the loss itself (the Switch Transformer loss, `load_balancing_loss_func`, over all MoE layers'
router logits at once) when the model is called with `output_router_logits=True`, and adds
`router_aux_loss_coef x aux_loss` to its own loss only when it is given the labels, which dist_train never gives it
(our labels are already shifted).
"""

from __future__ import annotations

from typing import Any

import torch

from dist_train.model.moe import expert_load


def router_aux_loss_coef(hf_cfg: Any) -> float | None:
    """The weight of the load-balancing loss of an MoE config; None for a dense one (or an MoE one without a
    load-balancing loss, such as DeepSeek-V3's bias-balanced routers)."""
    if not hasattr(hf_cfg, "output_router_logits"):
        return None
    return getattr(hf_cfg, "router_aux_loss_coef", None)


def expert_tokens(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """(layers, E) routed token slots per expert, from each MoE layer's (tokens, E) router logits: the top_k
    experts by logit are those by softmax probability. A scatter-add, not bincount: no host sync."""
    logits = torch.stack([layer.detach().reshape(-1, layer.shape[-1]) for layer in router_logits])  # (L, S, E)
    chosen = logits.topk(top_k, dim=-1).indices.flatten(1)  # (L, S * top_k)
    counts = torch.zeros(logits.shape[0], logits.shape[-1], device=logits.device)
    return counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=counts.dtype))


class HFRouterWindow:
    """The load-balancing loss and expert load summed over the training forwards since the last log line, on the
    device (no host sync per step); `take` reduces them over the ranks and starts a new window."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.forwards = 0
        self.aux_loss: torch.Tensor | None = None  # unweighted, summed over forwards
        self.expert_tokens: torch.Tensor | None = None  # (layers, E)

    def add(self, aux_loss: torch.Tensor, router_logits: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            tokens = expert_tokens(router_logits, self.top_k)
            aux = aux_loss.detach().float()
        self.aux_loss = aux if self.aux_loss is None else self.aux_loss + aux
        self.expert_tokens = tokens if self.expert_tokens is None else self.expert_tokens + tokens
        self.forwards += 1

    def take(self) -> dict[str, float]:
        """moe_aux_loss: transformers' load-balancing loss (1 when balanced) per forward, averaged over ranks;
        moe_load_min/max: the smallest and largest share of routed token slots any expert of any layer took (1/E
        when balanced). Every rank must call it."""
        from dist_train import distributed

        if self.aux_loss is None:
            return {}
        packed = torch.cat([self.aux_loss.reshape(1), self.expert_tokens.flatten()]).double()
        total = distributed.sum_over_ranks(packed)
        tokens = total[1:].view_as(self.expert_tokens)
        out = {"moe_aux_loss": total[0].item() / self.forwards / distributed.world_size(),
               **expert_load(tokens)}
        self.__init__(self.top_k)
        return out
