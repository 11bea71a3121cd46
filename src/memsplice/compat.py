"""Every transformers version workaround memsplice needs, in one place.

memsplice plugs into transformers only through public extension points: `Cache` objects, 2-D attention masks,
position ids, and the `AttentionInterface` / `AttentionMaskInterface` registries. What moves between releases
(cache construction and layout, registry names) is adapted here and nowhere else. Each shim says when it can go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import transformers
from transformers import DynamicCache

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])

if TRANSFORMERS_VERSION < (5, 0):  # pragma: no cover - guarded by pyproject, kept as a clear message
    raise ImportError(
        f"memsplice needs transformers >= 5.0 (found {transformers.__version__}); "
        "run `pip install 'transformers>=5.17,<6'`."
    )


def cache_from_tensors(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> DynamicCache:
    """Build a fresh `DynamicCache` holding one (keys, values) pair per layer, each (B, H, T, D).

    The tensors are copied into the cache's own storage by `DynamicLayer.update` (a `torch.cat`), so a forward pass
    that appends to the cache never mutates the caller's tensors. Can go when `DynamicCache(ddp_cache_data=...)`
    is renamed: that constructor argument is the one stable way to prefill a cache in transformers 5.x.
    """
    if len(keys) != len(values):
        raise ValueError(f"got {len(keys)} key tensors but {len(values)} value tensors")
    return DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))


def cache_layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Read (keys, values) per layer from a cache (transformers 5: `cache.layers[i].keys/values`)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def attention_registries():
    """The registries that map an `attn_implementation` name to an attention function and to a mask builder."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


def base_attention_function(name: str) -> Callable:
    """The stock attention function registered as `name` ("sdpa" or "eager")."""
    if name == "eager":
        # Eager attention lives in each modeling file; Llama's is the reference implementation that the
        # common architectures (Llama, Qwen2, Mistral, Gemma) share line for line.
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    functions, _ = attention_registries()
    return functions[name]


def set_attention_implementation(model: torch.nn.Module, name: str) -> None:
    """Switch a loaded model to a registered attention implementation.

    `set_attn_implementation` validates against the registry in 5.x; older 5.x releases only had the config field.
    """
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # pragma: no cover - transformers < 5.1
        model.config._attn_implementation = name
