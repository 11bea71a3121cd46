"""Who a reasoner is (a fingerprint of its weights) and proof that memsplice never changes it.

- `fingerprint_weights` hashes the weights as float32, so the same model loaded in bf16 on a GPU or fp32 on a CPU
  has one identity; memory checkpoints record it and refuse to load onto another reasoner.
- `weights_digest` hashes the weights exactly as they are now; tests compare it before and after memsplice work.
- `freeze` turns every parameter's gradient off and puts the model in eval mode; `assert_frozen` checks it.
"""

from __future__ import annotations

import hashlib

import torch


def _hash_state(model: torch.nn.Module, as_float32: bool) -> str:
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        # Tied weights (embedding and LM head) appear twice under two names; hash the storage once.
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        t = tensor.detach()
        if as_float32 and t.is_floating_point():
            t = t.float()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_weights(model: torch.nn.Module) -> str:
    """A dtype-independent identity: sha256 over (name, shape, float32 bytes) of every distinct weight."""
    return _hash_state(model, as_float32=True)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the weights exactly as stored now (dtype included)."""
    return _hash_state(model, as_float32=False)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def assert_frozen(model: torch.nn.Module) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not trainable, f"reasoner parameters require grad: {trainable[:5]}"
    assert not model.training, "reasoner is in training mode"
