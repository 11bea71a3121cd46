"""`memsplice info`: the reasoner's shapes and the memory config, as text or JSON."""

from __future__ import annotations

import json

from .common import add_checkpoint_flag, add_reasoner_flags, load_reasoner_from


def add_parser(sub):
    p = sub.add_parser(
        "info",
        help="print the reasoner's shapes and the memory config",
        description="Load the reasoner (and a memory checkpoint, if given) and print their shapes.",
    )
    add_reasoner_flags(p)
    add_checkpoint_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args) -> int:
    from memsplice.memory import MemoryConfig, MemoryModel

    reasoner = load_reasoner_from(args)
    if args.checkpoint:
        memory = MemoryModel.from_pretrained(args.checkpoint, reasoner=reasoner)
        source = args.checkpoint
    else:
        memory = MemoryModel(MemoryConfig(), reasoner)
        source = "default MemoryConfig (untrained)"
    params = sum(p.numel() for p in memory.parameters())
    info = {
        "reasoner": {
            "name": reasoner.name,
            "fingerprint": reasoner.fingerprint,
            "dtype": str(reasoner.dtype),
            "device": str(reasoner.device),
            "attention": reasoner.model.config._attn_implementation,
            **reasoner.shapes.to_dict(),
        },
        "memory": {
            "source": source,
            "parameters": params,
            "embedding_tied": memory.encoder.embedding_tied,
            "kv_bytes_per_row": memory.config.num_slots
            * 2
            * reasoner.shapes.num_layers
            * reasoner.shapes.kv_width
            * reasoner.dtype.itemsize,
            **memory.config.to_dict(),
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    r, m = info["reasoner"], info["memory"]
    print(
        f"reasoner  {r['name']}  ({r['model_type']}, {r['dtype']}, {r['device']}, attention {r['attention']})"
    )
    print(
        f"  layers {r['num_layers']}  width {r['hidden_size']}  heads {r['num_heads']} query / "
        f"{r['num_kv_heads']} kv  head_dim {r['head_dim']}  vocab {r['vocab_size']}  "
        f"max positions {r['max_positions']}"
    )
    print(f"  fingerprint {r['fingerprint'][:16]}")
    print(f"memory    {m['source']}")
    print(
        f"  operator {m['operator']}  slots {m['num_slots']}  max tokens {m['max_memory_tokens']}  "
        f"chunk {m.get('chunk_tokens') or m['max_memory_tokens']}  "
        f"encoder {m['encoder_layers']}x{m['encoder_width']} ({m['encoder_heads']} heads)  "
        f"params {m['parameters'] / 1e6:.2f}M"
    )
    print(
        f"  KV added per memory row: {m['kv_bytes_per_row'] / 1024:.1f} KiB   "
        f"embedding tied: {m['embedding_tied']}  latent bound {m['max_latent_norm']}"
    )
    return 0
