"""`memsplice train --config configs/<name>.yaml`: offline memory formation against the frozen reasoner.

Runs on the CPU, one GPU, or several under torchrun (`torchrun --nproc-per-node N -m memsplice.cli.main train ...`).
Writes checkpoints, metrics.jsonl, curves.png and the final memory (output_dir/memory) and prints a JSON summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def add_parser(sub):
    p = sub.add_parser(
        "train",
        help="train the memory encoder (the reasoner stays frozen)",
        description="Train the memory encoder, gate and injection projections from a YAML config. "
        "Flags override the config; --set changes any field (section.field=value).",
    )
    p.add_argument(
        "--config", required=True, metavar="YAML", help="training config, e.g. configs/tiny-cpu.yaml"
    )
    p.add_argument("--output", default=None, metavar="DIR", help="run directory (run.output_dir)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the run directory (fresh start when there is none)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from these memory weights (a new optimizer and schedule)",
    )
    p.add_argument(
        "--continue-schedule",
        action="store_true",
        help="with --init-from: continue the step and schedule recorded in those weights (an export of "
        "an interrupted run), re-warming the learning rate",
    )
    p.add_argument("--steps", type=int, default=None, help="run.steps")
    p.add_argument(
        "--max-minutes", type=float, default=None, help="run.max_minutes: stop and save after this long"
    )
    p.add_argument(
        "--plan-minutes",
        type=float,
        default=None,
        help="run.plan_minutes: size the schedule to this many minutes from a short timing probe",
    )
    p.add_argument(
        "--stop-at",
        type=float,
        default=None,
        metavar="UNIX_TIME",
        help="run.stop_at: stop and save by this time (the schedule may continue in a later --resume)",
    )
    p.add_argument("--reasoner", default=None, metavar="SRC", help="run.reasoner")
    p.add_argument("--device", default=None, help="run.device")
    p.add_argument("--data", default=None, metavar="DIR", help="data.root: the corpus directory")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set optim.lr=2e-3 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from memsplice.train import FormationRecipe, TrainConfig

    overrides = list(args.set)
    for flag, key in (
        ("output", "run.output_dir"),
        ("steps", "run.steps"),
        ("max_minutes", "run.max_minutes"),
        ("plan_minutes", "run.plan_minutes"),
        ("stop_at", "run.stop_at"),
        ("reasoner", "run.reasoner"),
        ("device", "run.device"),
        ("data", "data.root"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    config = TrainConfig.from_yaml(args.config, overrides)
    logging.getLogger("memsplice.train").setLevel(logging.INFO)
    recipe = FormationRecipe(
        config,
        resume=args.resume,
        init_from=args.init_from,
        continue_schedule=args.continue_schedule,
        show_progress=not args.quiet,
    )
    try:
        recipe.setup()
        summary = recipe.train()
    finally:
        recipe.cleanup()
    if recipe.dist is None or recipe.dist.is_main:
        summary["output_dir"] = config.run.output_dir
        print(json.dumps(summary, indent=2))
    if recipe.dist is not None and recipe.dist.distributed:
        _exit_rank()
    return 0


def _exit_rank() -> None:
    """End a torchrun rank now that its work is saved and its process group destroyed, without the interpreter's
    teardown. Freeing the DDP wrapper and gloo's objects there deadlocked now and then: a rank whose run had finished,
    results written and group destroyed, sat in that teardown with a C++ thread waiting for the GIL, and torchrun
    waited for it forever (seen on CI and on a clean clone here, once in a few full test runs)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)
