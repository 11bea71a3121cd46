"""The evaluation loop: every system under test, fed every episode of a task, asked every question, scored.

    results = run_eval(EvalConfig(task="synthetic", systems=("none", "rag-bm25", "latent")))
    write_report(results, "runs/eval")      # results.json, report.md, PNG plots (memsplice.eval.report)

Guarantees: runs are reproducible (fixed seeds for Python, NumPy and torch; greedy decoding; seeded tasks); every
system sees the same episodes in the same order and is reset between episodes; system and task names are checked
before anything heavy loads; a question whose prompt does not fit the reasoner's window is recorded as n/a (with
the KV bytes it would have needed), never silently dropped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import score_answer
from .reader import GenerationSettings, Reader, render_history
from .systems import SYSTEMS, Runtime, SystemArgs, build_system
from .systems.latent import memory_checkpoint
from .tasks import MAIN_METRIC, TASKS, Episode, TaskArgs, get_task

logger = logging.getLogger(__name__)

DEFAULT_SYSTEMS = tuple(SYSTEMS)


@dataclass
class EvalConfig:
    """One evaluation run: a task, the systems compared on it, and how they are run."""

    task: str = "synthetic"
    """A registered task: synthetic, passkey, locomo."""
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    """Registered systems, compared in this order."""
    task_args: TaskArgs = field(default_factory=TaskArgs)
    system_args: SystemArgs = field(default_factory=SystemArgs)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    reasoner: str | None = None
    """Reasoner source (default: SmolLM2-135M-Instruct)."""
    device: str | None = None
    dtype: str | None = None
    cuda_graphs: bool | None = None
    """Decode with CUDA graphs (default: on CUDA devices)."""
    progress: bool = True
    """Show a progress bar."""
    time_budget_s: float | None = None
    """Start no new episode after this many seconds (at least one always runs; the results say how many did)."""
    reading_prefix: Path | str | None = None
    """A reading prefix directory (`memsplice.reading`), or "shipped" for the one shipped for the reasoner: its K/V go in front of every prompt of every system,
    baselines included. Only for systems that put history in the prompt as text: those that splice memory into the
    cache are refused with it."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(sorted(TASKS))}")
        if not self.systems:
            raise ValueError("EvalConfig.systems is empty: name at least one system")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
        if len(set(self.systems)) != len(self.systems):
            raise ValueError(f"a system is named twice in {', '.join(self.systems)}")
        splicing = [s for s in self.systems if SYSTEMS[s].splices_memory]
        if self.reading_prefix is not None and splicing:
            raise ValueError(
                f"a reading prefix goes in front of prompts that splice no memory; {', '.join(splicing)} splice "
                "memory into the cache (leave them out, or run them without --reading-prefix)"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        for part in ("task_args", "system_args"):
            d[part] = {k: str(v) if isinstance(v, Path) else v for k, v in d[part].items()}
        if d["reading_prefix"] is not None:
            d["reading_prefix"] = str(d["reading_prefix"])
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def length_of(episode: Episode, history_tokens: int) -> int:
    """The history length an episode is reported under: its target length if the task set one, else its own."""
    return int(episode.meta.get("target_tokens", history_tokens))


def run_eval(config: EvalConfig, reasoner=None, on_episode: Callable[[dict], None] | None = None) -> dict:
    """Run `config` and return the raw results (records per answer and per fed history, plus the config).

    on_episode: called with the results so far after every episode (e.g. to write a partial report, so that a run
    stopped from outside still leaves one behind).
    """
    seed_everything(config.task_args.seed)
    if reasoner is None:
        from ..reasoner import load_reasoner

        reasoner = load_reasoner(config.reasoner, device=config.device, dtype=config.dtype)
    prefix = None
    if config.reading_prefix is not None:
        from ..checkpoints import load_reading_prefix

        prefix = load_reading_prefix(reasoner, config.reading_prefix)
    reader = Reader(reasoner, settings=config.generation, cuda_graphs=config.cuda_graphs, prefix=prefix)
    t0 = time.perf_counter()
    episodes = get_task(config.task)(config.task_args, reader.count_tokens)
    if not episodes:
        raise ValueError(f"task {config.task!r} produced no episodes; check --examples and --data")
    logger.info("%s: %d episodes built in %.1f s", config.task, len(episodes), time.perf_counter() - t0)
    runtime = Runtime(reader, config.system_args)
    systems = [build_system(name, runtime) for name in config.systems]
    checkpoint = memory_checkpoint(runtime) if any(n.startswith("latent") for n in config.systems) else None

    records: list[dict] = []
    feeds: list[dict] = []
    from ..bench.record import provenance

    prov = provenance(reasoner.device)

    def collect(done: int) -> dict:
        return {
            "task": config.task,
            "main_metric": MAIN_METRIC[config.task],
            "systems": list(config.systems),
            "config": config.to_dict(),
            "reasoner": {
                "name": reasoner.name,
                "fingerprint": reasoner.fingerprint,
                "dtype": str(reasoner.dtype),
                "device": str(reasoner.device),
                "max_positions": reader.window,
            },
            "checkpoint": str(checkpoint) if checkpoint else None,
            "reading_prefix": str(config.reading_prefix) if config.reading_prefix else None,
            "episodes": done,
            "episodes_planned": len(episodes),
            "questions": sum(len(e.questions) for e in episodes[:done]),
            "provenance": prov,
            "records": list(records),
            "feeds": list(feeds),
        }

    total = sum(len(e.questions) for e in episodes) * len(systems)
    bar = tqdm(total=total, desc=f"eval {config.task}", unit="answer", disable=not config.progress)
    started = time.perf_counter()
    done = 0
    for episode in episodes:
        if done and config.time_budget_s is not None and time.perf_counter() - started > config.time_budget_s:
            logger.warning(
                "time budget of %.0f s spent: %d of %d episodes ran",
                config.time_budget_s,
                done,
                len(episodes),
            )
            break
        done += 1
        history_tokens = reader.count_tokens(render_history(episode.turns))
        length = length_of(episode, history_tokens)
        for system in systems:
            bar.set_postfix_str(f"{system.name} @ {length} tokens", refresh=False)
            seed_everything(config.task_args.seed)
            system.reset()
            fed = system.feed(episode.turns)
            feeds.append(
                {
                    "episode": episode.id,
                    "system": system.name,
                    "length": length,
                    "history_tokens": history_tokens,
                    **fed.to_dict(),
                }
            )
            for question in episode.questions:
                answer = system.answer(question)
                record = {
                    "episode": episode.id,
                    "question_id": question.id,
                    "system": system.name,
                    "category": question.category,
                    "length": length,
                    "history_tokens": history_tokens,
                    "question": question.question,
                    "answer": question.answer,
                    "prediction": answer.text,
                    "evidence": list(question.evidence),
                    **answer.costs.to_dict(),
                }
                if answer.costs.fits:
                    scores = score_answer(
                        answer.text,
                        question.answer,
                        adversarial=question.adversarial,
                        aliases=question.aliases,
                        multi_hop=question.category.startswith("1 ") and config.task == "locomo",
                    )
                    record.update(scores.to_dict())
                else:
                    record.update({"em": None, "f1": None, "contains": None})
                records.append(record)
                bar.update(1)
        if on_episode is not None:
            on_episode(collect(done))
    bar.close()
    return collect(done)
