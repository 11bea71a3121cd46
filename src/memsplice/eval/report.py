"""Turning raw evaluation results into `results.json`, a markdown report and PNG plots.

`summarise(results)` computes, per system: mean scores over the questions it could answer (and how many it could),
scores per history length and per category, and cost summaries (time to first token, decode time per token, prompt
tokens, KV-cache bytes at answer time, memory write time per turn, stored bytes per conversation). Where `full` ran,
every system's KV bytes are also given as a fraction of what the whole history needs in the cache; where `oracle`
ran, every system's main score is also given as a fraction of the oracle's.

`write_report(results, out_dir)` writes:
- `results.json`: the config, provenance, per-answer records, per-history write costs and the summary;
- `report.md`: the tables, with n/a where a system could not answer (the whole history did not fit);
- `accuracy_vs_length.png`, `latency_vs_length.png`, `kv_bytes_vs_length.png`.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

from .metrics import METRICS

logger = logging.getLogger(__name__)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _score_block(records: list[dict]) -> dict:
    answered = [r for r in records if r["fits"]]
    block = {m: _mean([r[m] for r in answered]) for m in METRICS}
    block.update(questions=len(records), answered=len(answered))
    return block


def _cost_block(records: list[dict], feeds: list[dict]) -> dict:
    answered = [r for r in records if r["fits"]]
    ms = 1e3
    ttft = [r["ttft_s"] * ms for r in answered]
    decode = [r["decode_s_per_token"] * ms for r in answered if r["decode_s_per_token"] is not None]
    return {
        "ttft_ms_median": _median(ttft),
        "ttft_ms_mean": _mean(ttft),
        "decode_ms_per_token_median": _median(decode),
        "prompt_tokens_mean": _mean([r["prompt_tokens"] for r in answered]),
        "context_tokens_mean": _mean([r["context_tokens"] for r in answered]),
        "memory_slots_mean": _mean([r["memory_slots"] for r in answered]),
        "kv_bytes_mean": _mean([r["kv_bytes"] for r in answered]),
        "kv_bytes_needed_mean": _mean([r["kv_bytes"] for r in records]),
        "retrieval_ms_mean": _mean([r["retrieval_s"] * ms for r in answered]),
        "write_ms_per_turn_mean": _mean([f["write_s_per_turn"] * ms for f in feeds]),
        "stored_bytes_mean": _mean([f["stored_bytes"] for f in feeds]),
        "evicted_spans_mean": _mean([f.get("evicted_spans", 0) for f in feeds]),  # older results lack it
    }


def summarise(results: dict) -> dict:
    main = results["main_metric"]
    by_system: dict[str, dict] = {}
    records = results["records"]
    feeds = results["feeds"]
    for name in results["systems"]:
        mine = [r for r in records if r["system"] == name]
        my_feeds = [f for f in feeds if f["system"] == name]
        lengths = sorted({r["length"] for r in mine})
        categories = sorted({r["category"] for r in mine})
        by_system[name] = {
            "score": _score_block(mine),
            "main": _score_block(mine)[main],
            "by_length": {
                str(n): {
                    **_score_block([r for r in mine if r["length"] == n]),
                    **_cost_block(
                        [r for r in mine if r["length"] == n], [f for f in my_feeds if f["length"] == n]
                    ),
                }
                for n in lengths
            },
            "by_category": {c: _score_block([r for r in mine if r["category"] == c]) for c in categories},
            "costs": _cost_block(mine, my_feeds),
        }
    if "full" in by_system:
        for s in by_system.values():
            for n, block in s["by_length"].items():
                full = by_system["full"]["by_length"].get(n, {}).get("kv_bytes_needed_mean")
                block["kv_fraction_of_full"] = (
                    block["kv_bytes_mean"] / full if full and block["kv_bytes_mean"] is not None else None
                )
    if "oracle" in by_system and by_system["oracle"]["main"]:
        for s in by_system.values():
            s["fraction_of_oracle"] = None if s["main"] is None else s["main"] / by_system["oracle"]["main"]
    return {"main_metric": main, "systems": by_system}


# -- markdown ----------------------------------------------------------------------------------------------------
def _fmt(x, kind: str = "score") -> str:
    if x is None:
        return "n/a"
    if kind == "score":
        return f"{100 * x:.1f}"
    if kind == "ms":
        return f"{x:.1f}" if x >= 1 else f"{x:.3f}"
    if kind == "bytes":
        for unit in ("B", "KiB", "MiB", "GiB"):
            if abs(x) < 1024 or unit == "GiB":
                return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
            x /= 1024
    if kind == "int":
        return f"{x:.0f}"
    return f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def render_markdown(results: dict, summary: dict) -> str:
    main = summary["main_metric"]
    systems = results["systems"]
    s = summary["systems"]
    lines = [f"# memsplice eval: {results['task']}", ""]
    for run in results.get("merged_from") or [{"provenance": results["provenance"]}]:
        prov, indent = run["provenance"], ""
        if "lengths" in run:  # one of several merged runs
            done = f"{run['episodes']} of {run['episodes_planned']} episodes"
            lines.append(f"- lengths {', '.join(str(n) for n in run['lengths'])} ({done}):")
            indent = "  "
        lines += [
            f"{indent}- command: `{prov['command']}`",
            f"{indent}- commit {prov['commit']}, {prov['date']}, {prov['device']}",
        ]
    if results.get("note"):
        lines.append(f"- note: {results['note']}")
    lines += [
        f"- reasoner {results['reasoner']['name']} ({results['reasoner']['dtype']}, window "
        f"{results['reasoner']['max_positions']} tokens); memory checkpoint: "
        f"{results['checkpoint'] or 'none (untrained memory: latent scores are a floor)'}",
        f"- {results['episodes']} episodes"
        + (
            f" (of {results['episodes_planned']} planned: the time budget ran out)"
            if results.get("episodes_planned", results["episodes"]) > results["episodes"]
            else ""
        )
        + f", {results['questions']} questions; main score: {main} "
        "(percent of questions answered; n/a: the prompt did not fit the reasoner's window)",
        "",
        "## Scores",
        "",
    ]
    header = ["system", *METRICS, "answered"] + (["of oracle"] if "oracle" in s else [])
    rows = []
    for name in systems:
        block = s[name]["score"]
        row = [name, *(_fmt(block[m]) for m in METRICS), f"{block['answered']}/{block['questions']}"]
        if "oracle" in s:
            frac = s[name].get("fraction_of_oracle")
            row.append("n/a" if frac is None else f"{100 * frac:.0f}%")
        rows.append(row)
    lines += _table(header, rows)
    lengths = sorted({int(n) for name in systems for n in s[name]["by_length"]})
    lines += ["", f"## {main} by history length (tokens)", ""]
    lines += _table(
        ["system", *map(str, lengths)],
        [
            [name, *(_fmt(s[name]["by_length"].get(str(n), {}).get(main)) for n in lengths)]
            for name in systems
        ],
    )
    categories = sorted({c for name in systems for c in s[name]["by_category"]})
    lines += ["", f"## {main} by category", ""]
    lines += _table(
        ["system", *categories],
        [
            [name, *(_fmt(s[name]["by_category"].get(c, {}).get(main)) for c in categories)]
            for name in systems
        ],
    )
    lines += ["", "## Costs (all questions answered)", ""]
    cost_rows = []
    for name in systems:
        c = s[name]["costs"]
        cost_rows.append(
            [
                name,
                _fmt(c["ttft_ms_median"], "ms"),
                _fmt(c["decode_ms_per_token_median"], "ms"),
                _fmt(c["prompt_tokens_mean"], "int"),
                _fmt(c["memory_slots_mean"], "int"),
                _fmt(c["kv_bytes_mean"], "bytes"),
                _fmt(c["write_ms_per_turn_mean"], "ms"),
                _fmt(c["stored_bytes_mean"], "bytes"),
                _fmt(c["evicted_spans_mean"], "int"),
            ]
        )
    lines += _table(
        [
            "system",
            "TTFT ms (median)",
            "decode ms/token",
            "prompt tokens",
            "memory slots",
            "KV bytes at answer",
            "write ms/turn",
            "stored per conversation",
            "history spans evicted from memory",
        ],
        cost_rows,
    )
    lines += ["", "## KV-cache bytes at answer time by history length", ""]
    kv_rows = []
    for name in systems:
        cells = []
        for n in lengths:
            block = s[name]["by_length"].get(str(n), {})
            kv = block.get("kv_bytes_mean") if block.get("answered") else None
            frac = block.get("kv_fraction_of_full")
            cell = _fmt(kv, "bytes") if kv is not None else "n/a"
            if name == "full" and kv is None and block.get("kv_bytes_needed_mean"):
                cell = f"n/a (needs {_fmt(block['kv_bytes_needed_mean'], 'bytes')})"
            elif frac is not None and name != "full":
                cell += f" ({100 * frac:.1f}% of full)"
            cells.append(cell)
        kv_rows.append([name, *cells])
    lines += _table(["system", *map(str, lengths)], kv_rows)
    lines += ["", "## TTFT ms (median) by history length", ""]
    lines += _table(
        ["system", *map(str, lengths)],
        [
            [name, *(_fmt(s[name]["by_length"].get(str(n), {}).get("ttft_ms_median"), "ms") for n in lengths)]
            for name in systems
        ],
    )
    evicting = [n for n in systems if any(b.get("evicted_spans_mean") for b in s[n]["by_length"].values())]
    if evicting:  # where a memory's budget dropped history: its scores there cannot include those turns
        lines += ["", "## History spans evicted from memory by history length (mean per conversation)", ""]
        lines += _table(
            ["system", *map(str, lengths)],
            [
                [
                    name,
                    *(
                        _fmt(s[name]["by_length"].get(str(n), {}).get("evicted_spans_mean"), "int")
                        for n in lengths
                    ),
                ]
                for name in evicting
            ],
        )
    lines += ["", "Plots: `accuracy_vs_length.png`, `latency_vs_length.png`, `kv_bytes_vs_length.png`.", ""]
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------------------------
def _plot(
    summary: dict,
    systems: list[str],
    key: str,
    ylabel: str,
    path: Path,
    *,
    scale: float = 1.0,
    logy: bool = False,
    percent: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    colors = plt.get_cmap("tab20").colors  # one colour per system, up to 20
    for i, name in enumerate(systems):
        points = sorted((int(n), b.get(key)) for n, b in summary["systems"][name]["by_length"].items())
        xs = [n for n, v in points if v is not None]
        ys = [v * scale for _, v in points if v is not None]
        if xs:  # memory systems solid, text systems dashed
            style = "-" if name.startswith("latent") else "--"
            ax.plot(
                xs,
                ys,
                style,
                marker="os^Dv<>ph*"[i % 10],
                color=colors[(2 * i) % 20 + (i // 10) % 2],
                label=name,
            )
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("history length (tokens)")
    ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md and the plots under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    payload = {**results, "summary": summary}
    paths = {"results": out / "results.json", "report": out / "report.md"}
    tmp = paths["results"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, paths["results"])
    paths["report"].write_text(render_markdown(results, summary))
    main = summary["main_metric"]
    systems = results["systems"]
    try:
        paths["accuracy"] = out / "accuracy_vs_length.png"
        _plot(summary, systems, main, f"{main} (%)", paths["accuracy"], scale=100, percent=True)
        paths["latency"] = out / "latency_vs_length.png"
        _plot(
            summary,
            systems,
            "ttft_ms_median",
            "time to first token (ms, median)",
            paths["latency"],
            logy=True,
        )
        paths["kv"] = out / "kv_bytes_vs_length.png"
        _plot(
            summary, systems, "kv_bytes_needed_mean", "KV-cache bytes at answer time", paths["kv"], logy=True
        )
    except ImportError:
        logger.warning("matplotlib is not installed; no plots (pip install 'memsplice[eval]')")
    return paths
