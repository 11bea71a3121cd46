"""Elastic weight consolidation towards a slow anchor: the penalty that keeps online updates from drifting.

    anchor = ElasticAnchor(memory)                       # phi' <- phi, Fisher F = 0 (penalty 0 until estimated)
    anchor.estimate_fisher(per_sample_losses)            # F <- decay * F + mean_i (d loss_i / d phi)^2
    loss = task_loss + anchor.penalty()                  # (lambda / 2) * sum F * (phi - phi')^2
    anchor.refresh()                                     # phi' <- phi every anchor_interval steps

The Fisher information is the diagonal empirical Fisher, from per-sample gradients of the task loss (squared
minibatch gradients would underestimate it), accumulated across refreshes with a decay as in online EWC (Schwarz et
al., 2018), and normalised to mean 1 over all entries so that `weight` means the same for any model size.
Parameters that appear after the anchor was taken (the encoder's embedding once untied) join at the next refresh.

Guarantees: the penalty is 0 right after `refresh()` (phi = phi'), non-negative, and its gradient only pulls each
parameter towards its anchor value; the anchor and Fisher are float32 copies that never alias the live weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class ElasticAnchor:
    def __init__(self, module: nn.Module, weight: float = 1.0, decay: float = 0.5):
        if weight < 0:
            raise ValueError(f"EWC weight must be >= 0 (got {weight})")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Fisher decay must be in [0, 1] (got {decay})")
        self.module = module
        self.weight = weight
        self.decay = decay
        self.anchor: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.refreshes = 0
        self.refresh()

    def _params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def refresh(self) -> None:
        """phi' <- phi (Algorithm 1, line 10)."""
        self.anchor = {n: p.detach().float().clone() for n, p in self._params().items()}
        self.refreshes += 1

    def estimate_fisher(self, per_sample_losses: Iterable[Callable[[], torch.Tensor]]) -> int:
        """Accumulate the diagonal empirical Fisher from per-sample losses; returns the samples used.

        per_sample_losses: callables, each returning one sample's scalar loss (a fresh graph per call).
        """
        params = self._params()
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        count = 0
        for loss_fn in per_sample_losses:
            loss = loss_fn()
            if not loss.requires_grad:  # e.g. the sample's memory fell back: no path to the parameters
                continue
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    total[n] += g.detach().float().pow(2)
            count += 1
        if count == 0:
            return 0
        new = {n: t / count for n, t in total.items()}
        mean = torch.cat([t.flatten() for t in new.values()]).mean().clamp(min=1e-30)
        for n, t in new.items():
            t = t / mean
            old = self.fisher.get(n)
            self.fisher[n] = t if old is None or old.shape != t.shape else self.decay * old + t
        return count

    def penalty(self) -> torch.Tensor:
        """(weight / 2) * sum_i F_i (phi_i - phi'_i)^2 over parameters that have an anchor and a Fisher."""
        params = self._params()
        device = next(iter(params.values())).device if params else torch.device("cpu")
        total = torch.zeros((), device=device)
        if self.weight == 0 or not self.fisher:
            return total
        for n, p in params.items():
            f, a = self.fisher.get(n), self.anchor.get(n)
            if f is None or a is None or a.shape != p.shape:
                continue
            total = total + (f * (p.float() - a).pow(2)).sum()
        return 0.5 * self.weight * total

    def state_dict(self) -> dict:
        return {"anchor": self.anchor, "fisher": self.fisher, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.module.parameters()).device
        self.anchor = {n: t.to(device) for n, t in state["anchor"].items()}
        self.fisher = {n: t.to(device) for n, t in state["fisher"].items()}
        self.refreshes = int(state["refreshes"])
