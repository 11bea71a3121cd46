"""Elastic weight consolidation towards a slow anchor: the penalty that keeps online updates from drifting.

    anchor = ElasticAnchor(memory)                       # phi' <- phi, Fisher F = 0 (penalty 0 until estimated)
    anchor.estimate_fisher(per_sample_losses)            # F <- decay * F + mean_i (d loss_i / d phi)^2
    loss = task_loss + anchor.penalty()                  # (lambda / 2) * sum F * (phi - phi')^2
    value = anchor.accumulate_grad()                     # or, after task_loss.backward(): its gradient into .grad
    anchor.refresh()                                     # phi' <- phi every anchor_interval steps
    anchor.restore()                                     # phi <- phi' (a rollback, `online.guard`)

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

    @torch.no_grad()
    def restore(self) -> int:
        """phi <- phi': every anchored parameter back to its anchor value (a rollback); returns how many. Parameters
        that appeared after the anchor was taken (the embedding untied since) keep their values."""
        restored = 0
        for n, p in self._params().items():
            a = self.anchor.get(n)
            if a is not None and a.shape == p.shape:
                p.copy_(a.to(p.dtype))
                restored += 1
        return restored

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

    def _terms(self) -> tuple[list[nn.Parameter], list[torch.Tensor], list[torch.Tensor]]:
        """(parameters, their anchors, their Fishers) for the parameters that have both, of the parameter's shape."""
        params, anchors, fishers = [], [], []
        for n, p in self._params().items():
            f, a = self.fisher.get(n), self.anchor.get(n)
            if f is None or a is None or a.shape != p.shape:
                continue
            params.append(p)
            anchors.append(a)
            fishers.append(f)
        return params, anchors, fishers

    def _zero(self) -> torch.Tensor:
        params = self._params()
        device = next(iter(params.values())).device if params else torch.device("cpu")
        return torch.zeros((), device=device)

    def penalty(self) -> torch.Tensor:
        """(weight / 2) * sum_i F_i (phi_i - phi'_i)^2 over parameters that have an anchor and a Fisher.

        Differentiable; a few multi-tensor ops whatever the number of parameters (its backward is not: an update
        that only needs the gradient takes `accumulate_grad`)."""
        params, anchors, fishers = self._terms()
        if self.weight == 0 or not params:
            return self._zero()
        diffs = torch._foreach_sub([p if p.dtype == torch.float32 else p.float() for p in params], anchors)
        terms = torch._foreach_mul(torch._foreach_mul(diffs, diffs), fishers)
        return 0.5 * self.weight * torch.cat([t.reshape(-1) for t in terms]).sum()

    @torch.no_grad()
    def accumulate_grad(self) -> torch.Tensor:
        """Add the penalty's gradient, weight * F * (phi - phi'), to each anchored parameter's `.grad` (setting it
        where it is None) and return the penalty's value (no graph): what `penalty().backward()` adds, in a few
        multi-tensor ops instead of an autograd graph of several ops per parameter.

        Each parameter's gradient is bitwise the one `penalty().backward()` gives on its own; added to other
        gradients, the order of the sum may differ from one backward pass through both. Does nothing (returns 0)
        while the weight is 0 or no Fisher has been estimated."""
        params, anchors, fishers = self._terms()
        if self.weight == 0 or not params:
            return self._zero()
        diffs = torch._foreach_sub([p if p.dtype == torch.float32 else p.float() for p in params], anchors)
        # Autograd of (w/2) F d^2 rounds as fl(fl(w/2 * F) * 2d); fl(fl(w * F) * d) is the same number, as
        # doubling is exact in floating point.
        grads = torch._foreach_mul(fishers, self.weight)
        torch._foreach_mul_(grads, diffs)
        value = 0.5 * torch.cat([t.reshape(-1) for t in torch._foreach_mul(grads, diffs)]).sum()
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params, strict=True)]
        held = [(p.grad, g) for p, g in zip(params, grads, strict=True) if p.grad is not None]
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g
        if held:
            torch._foreach_add_([h for h, _ in held], [g for _, g in held])
        return value

    def state_dict(self) -> dict:
        return {"anchor": self.anchor, "fisher": self.fisher, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.module.parameters()).device
        self.anchor = {n: t.to(device) for n, t in state["anchor"].items()}
        self.fisher = {n: t.to(device) for n, t in state["fisher"].items()}
        self.refreshes = int(state["refreshes"])
