"""`prepend_embed`: latents used as M input embeddings, so the reasoner computes its own K/V for them.

The reasoner reads the M latents at positions 0..M-1 (causally, as it would read M tokens) with its stock
attention; the resulting cache is the memory. Gradients reach the latents through the frozen reasoner.
"""

from __future__ import annotations

from transformers import DynamicCache

from ..compat import cache_layer_tensors
from .operator import InjectionOperator
from .registry import register_operator
from .rope import memory_positions


@register_operator("prepend_embed")
class PrependEmbed(InjectionOperator):
    def forward(self, latents, reasoner):
        b, m, _ = latents.shape
        cache = DynamicCache()
        reasoner.decoder(
            inputs_embeds=latents.to(reasoner.dtype),
            position_ids=memory_positions(b, m, latents.device),
            past_key_values=cache,
            use_cache=True,
        )
        pairs = cache_layer_tensors(cache)
        return [k for k, _ in pairs], [v for _, v in pairs]
