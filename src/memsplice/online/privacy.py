"""Privacy options for online learning: per-sample gradient clipping with Gaussian noise, and its accounting.

A memory that learns from a user's traces can absorb what they said. With `PrivacyConfig` set, every update is a
Gaussian mechanism (DP-SGD, Abadi et al. 2016): each sample's gradient is clipped to L2 norm `max_grad_norm` (C),
the clipped gradients are summed, noise N(0, (noise_multiplier * C)^2) is added, and the sum is divided by the
number of samples. Latents are also bounded (`latent_norm_clip`, applied by the memory before injection), so what
one slot can carry into the reasoner's cache is bounded too.

Why the per-sample gradients are computed here and not by Opacus' `GradSampleModule`: Opacus attaches hooks to
every module that owns parameters and computes per-sample gradients from captured inputs. The memory does not fit
that model: `MemoryEncoder` owns parameters directly (learned positions and slot queries) next to its submodules,
and the injection operator is called with the reasoner object as an argument; Opacus' activation capture fails on
both (`'NoneType' object has no attribute 'detach'` with opacus 1.6, in hooks and functorch mode alike). The loss
also runs through the frozen reasoner and, for InfoNCE, couples the samples of a batch through in-batch negatives,
for which no per-sample gradient exists. So samples are processed one at a time (microbatches of one), which is
exact for any model and costs one backward pass per sample; InfoNCE is left out of private updates.

Accounting (`PrivacyAccountant`): the stream has no fixed dataset to subsample from, and the replay reservoir reuses
interactions, so no amplification by subsampling is claimed. Each interaction's privacy loss is that of the Gaussian
mechanism composed over the updates it took part in (its own batch plus every replay): RDP of order a is
k * a / (2 sigma^2) after k participations (Mironov 2017), converted to (epsilon, delta) with the conversion of
Balle et al. (2020), minimised over orders. The reported epsilon is the worst case over all interactions seen.
When Opacus is installed, its RDP analysis computes the same numbers (tests compare the two).

The EWC penalty is not clipped; under privacy its Fisher is the identity (a plain L2 pull towards the anchor), since
a Fisher estimated from raw per-sample gradients would leak the data the noise protects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

ORDERS = tuple(
    [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 32.0, 64.0, 128.0, 256.0]
)


@dataclass
class PrivacyConfig:
    max_grad_norm: float = 1.0
    """C: each sample's gradient is clipped to this L2 norm."""
    noise_multiplier: float = 1.0
    """sigma: Gaussian noise of standard deviation sigma * C is added to the sum of clipped gradients."""
    delta: float = 1e-5
    """delta of the reported (epsilon, delta) guarantee."""
    latent_norm_clip: float | None = 10.0
    """Bound on every latent slot's L2 norm (sets the memory's `latent_norm_clip`); None leaves it as configured."""

    def __post_init__(self):
        for name in ("max_grad_norm", "noise_multiplier"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PrivacyConfig.{name} must be positive (got {getattr(self, name)!r})")
        if not 0 < self.delta < 1:
            raise ValueError(f"PrivacyConfig.delta must be in (0, 1) (got {self.delta!r})")
        if self.latent_norm_clip is not None and not self.latent_norm_clip > 0:
            raise ValueError(
                f"PrivacyConfig.latent_norm_clip must be positive or None (got {self.latent_norm_clip!r})"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClipStats:
    samples: int
    clipped: int
    """Samples whose gradient norm exceeded C."""
    mean_norm: float
    """Mean per-sample gradient norm before clipping."""
    mean_loss: float
    """Mean of the per-sample losses."""


def private_gradients(
    sample_losses: Sequence[Callable[[], torch.Tensor]],
    params: list[torch.nn.Parameter],
    config: PrivacyConfig,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], ClipStats]:
    """(sum_i clip(g_i) + N(0, (sigma C)^2)) / n for the n per-sample losses, one tensor per parameter."""
    if not sample_losses:
        raise ValueError("private_gradients needs at least one sample")
    c = config.max_grad_norm
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    norms, losses = [], []
    for loss_fn in sample_losses:
        loss = loss_fn()
        losses.append(float(loss.detach()))
        grads = (
            torch.autograd.grad(loss, params, allow_unused=True)
            if loss.requires_grad
            else [None] * len(params)
        )
        grads = [
            torch.zeros_like(t) if g is None else g.detach().float()
            for g, t in zip(grads, total, strict=True)
        ]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(float(norm))
        scale = (c / (norm + 1e-6)).clamp(max=1.0)
        for t, g in zip(total, grads, strict=True):
            t.add_(g * scale)
    n = len(sample_losses)
    sigma = config.noise_multiplier * c
    out = []
    for t in total:
        noise = torch.randn(t.shape, generator=generator, device="cpu").to(t.device) * sigma
        out.append((t + noise) / n)
    return out, ClipStats(
        samples=n, clipped=sum(x > c for x in norms), mean_norm=sum(norms) / n, mean_loss=sum(losses) / n
    )


def gaussian_rdp(noise_multiplier: float, compositions: int, orders: Sequence[float] = ORDERS) -> list[float]:
    """RDP of the Gaussian mechanism (sensitivity 1, std `noise_multiplier`) composed `compositions` times."""
    return [compositions * a / (2.0 * noise_multiplier**2) for a in orders]


def rdp_to_epsilon(
    rdp: Sequence[float], delta: float, orders: Sequence[float] = ORDERS
) -> tuple[float, float]:
    """(epsilon, best order) from RDP values, with the conversion of Balle et al. (2020), as Opacus does."""
    best, best_order = math.inf, None
    for a, r in zip(orders, rdp, strict=True):
        eps = r + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1.0)
        if eps < best:
            best, best_order = eps, a
    return max(best, 0.0), best_order


@dataclass
class PrivacyAccountant:
    noise_multiplier: float
    delta: float
    participations: dict[int, int] = field(default_factory=dict)
    """Interaction id -> updates it took part in."""
    updates: int = 0

    def record(self, ids: Sequence[int]) -> None:
        self.updates += 1
        for i in ids:
            self.participations[int(i)] = self.participations.get(int(i), 0) + 1

    @property
    def max_participations(self) -> int:
        return max(self.participations.values(), default=0)

    def epsilon(self) -> float:
        k = self.max_participations
        if k == 0:
            return 0.0
        return rdp_to_epsilon(gaussian_rdp(self.noise_multiplier, k), self.delta)[0]

    def report(self) -> dict:
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "updates": self.updates,
            "max_participations": self.max_participations,
            "accounting": "RDP of the Gaussian mechanism over each interaction's participations, no subsampling "
            "amplification, worst case over interactions",
        }

    def to_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "updates": self.updates,
            "participations": {str(k): v for k, v in self.participations.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyAccountant:
        return cls(
            noise_multiplier=float(d["noise_multiplier"]),
            delta=float(d["delta"]),
            updates=int(d["updates"]),
            participations={int(k): int(v) for k, v in d["participations"].items()},
        )
