"""Running the frozen reasoner with memory in front of its input: one forward pass, or `generate()`.

Both paths build a fresh cache from `MemoryKV` (caches are mutated in place by a forward pass), extend the 2-D
attention mask with the memory columns (ones for live rows, zeros for the others), and pass the gate to the gated attention (as the `memory_gate_bias` keyword in a forward pass, through
`active_memory_gate` during `generate()`). Rows without live memory therefore compute exactly what
the bare reasoner computes for a left-padded row; a batch without any live memory skips the splice entirely.
"""

from __future__ import annotations

import torch

from .attention import active_memory_gate
from .memory_kv import MemoryKV


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, memory: MemoryKV | None):
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if memory is not None and memory.batch_size != input_ids.shape[0]:
        raise ValueError(f"memory holds {memory.batch_size} rows but the input has {input_ids.shape[0]}")
    return attention_mask


def splice_masks(memory: MemoryKV, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(full 2-D mask (B, M+T), text position ids (B, T)) under the convention of `memory_kv`."""
    full = torch.cat(
        [memory.mask_prefix(attention_mask.dtype).to(attention_mask.device), attention_mask], dim=1
    )
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)[:, memory.num_slots :]
    return full, positions


def _model_dtype_bias(memory: MemoryKV, reasoner) -> torch.Tensor:
    return memory.gate_bias.to(device=reasoner.device, dtype=reasoner.dtype)


def forward_with_memory(
    reasoner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    memory: MemoryKV | None = None,
    **kwargs,
):
    """The reasoner's forward over `input_ids` with `memory` in front; returns its `CausalLMOutputWithPast`.

    `labels` and other keyword arguments go to the reasoner unchanged. `use_cache` defaults to False.
    """
    attention_mask = _check_inputs(input_ids, attention_mask, memory)
    kwargs.setdefault("use_cache", False)
    if memory is None or not memory.any_live:
        return reasoner.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    full_mask, positions = splice_masks(memory, attention_mask)
    return reasoner.model(
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=positions,
        past_key_values=memory.to_cache(),
        memory_gate_bias=_model_dtype_bias(memory, reasoner),
        **kwargs,
    )


def hidden_states_with_memory(
    reasoner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    memory: MemoryKV | None = None,
    **kwargs,
) -> torch.Tensor:
    """Final hidden states (B, T, d) of the reasoner's decoder with `memory` in front, without the LM head.

    Training losses that need logits at a few positions only apply `reasoner.model.get_output_embeddings()` to
    those positions, which avoids materialising (B, T, vocab) logits.
    """
    attention_mask = _check_inputs(input_ids, attention_mask, memory)
    if memory is None or not memory.any_live:
        return reasoner.decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        ).last_hidden_state
    full_mask, positions = splice_masks(memory, attention_mask)
    return reasoner.decoder(
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=positions,
        past_key_values=memory.to_cache(),
        use_cache=True,
        memory_gate_bias=_model_dtype_bias(memory, reasoner),
        **kwargs,
    ).last_hidden_state


def passage_hidden_states(
    reasoner,
    instruction: torch.Tensor,
    passages: torch.Tensor,
    memory: MemoryKV | None,
    passage_mask: torch.Tensor | None = None,
    read_unpadded=None,
) -> torch.Tensor:
    """(B, T, d) hidden states from which the reasoner predicts each token of `passages` (B, T), teacher-forced,
    reading [memory][instruction (I,)] P: the read of reconstruction, scored at the T positions before each token.
    `passage_mask` (B, T) marks right-padded passages' real tokens (None: all real). `read_unpadded(reasoner, text,
    memory)`, when given, reads unpadded passages instead of `hidden_states_with_memory` and must compute the same
    values (e.g. `memsplice.train.fast_reader.read_hidden_states`)."""
    b, t = passages.shape
    i = instruction.numel()
    text = torch.cat([instruction.to(passages.device).view(1, -1).expand(b, -1), passages], dim=1)
    if passage_mask is None and read_unpadded is not None:
        return read_unpadded(reasoner, text, memory)[:, i - 1 : i + t - 1]
    mask = None
    if passage_mask is not None:
        mask = torch.cat([torch.ones_like(text[:, :i]), passage_mask.to(text.dtype)], dim=1)
    return hidden_states_with_memory(reasoner, text, mask, memory)[:, i - 1 : i + t - 1]


def generate_with_memory(
    reasoner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    memory: MemoryKV | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """`reasoner.model.generate()` with `memory` in front; returns (B * num_return_sequences, T + new) token ids.

    Position ids during generation follow from the extended 2-D mask (transformers' cumsum rule), which gives the
    same positions as `forward_with_memory`. Beam search is refused: it reorders cache rows but not the memory's gate.
    """
    attention_mask = _check_inputs(input_ids, attention_mask, memory)
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("generate with memory supports greedy decoding and sampling (num_beams=1)")
    if "past_key_values" in generate_kwargs or "position_ids" in generate_kwargs:
        raise ValueError("generate with memory builds its own cache and positions; do not pass them")
    if memory is None or not memory.any_live:
        return reasoner.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    n = int(generate_kwargs.pop("num_return_sequences", 1))
    if n > 1:  # expand here so that cache, gate and inputs stay row-aligned
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        memory = memory.repeat_rows(n)
    full_mask, _ = splice_masks(memory, attention_mask)
    with active_memory_gate(_model_dtype_bias(memory, reasoner)):
        return reasoner.model.generate(
            input_ids=input_ids,
            attention_mask=full_mask,
            past_key_values=memory.to_cache(),
            **generate_kwargs,
        )
