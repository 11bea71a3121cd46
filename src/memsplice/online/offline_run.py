"""The command line shared by the offline training runs (`python -m memsplice.online.bootstrap`, `... .address`):
reasoner and checkpoint flags, one flag per field of the run's config dataclass, a report saved with provenance.

    def main(argv=None):
        return offline_main(argv, prog="python -m memsplice.online.bootstrap", doc=__doc__,
                            config_class=BootstrapConfig, run=run_bootstrap, checkpoint_help="...")
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import fields


def _flag_type(annotation) -> type:
    text = str(annotation)
    return float if "float" in text else int if "int" in text else str


def config_parser(prog: str, doc: str, config_class, checkpoint_help: str) -> argparse.ArgumentParser:
    """The command line of an offline run: reasoner, checkpoint, device, output and record flags, and one flag per
    field of `config_class` (lists take several values, booleans are switches)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--reasoner", default=None)
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--output", required=True, help="directory for checkpoint/, metrics.jsonl and report.json")
    p.add_argument(
        "--record",
        metavar="NAME",
        default=None,
        help="also save the report with its command, commit (at the start), device and date as "
        "benchmarks/results/NAME.json",
    )
    name = config_class.__name__
    for f in fields(config_class):
        default = getattr(config_class, f.name, None)
        flag = "--" + f.name.replace("_", "-")
        if "list" in str(f.type):
            p.add_argument(flag, type=_flag_type(f.type), nargs="+", default=None, help=f"{name}.{f.name}")
        elif str(f.type) in ("bool", "<class 'bool'>"):
            p.add_argument(flag, action="store_true", default=None, help=f"{name}.{f.name}")
        else:
            p.add_argument(
                flag, type=_flag_type(f.type), default=None, help=f"{name}.{f.name} (default: {default})"
            )
    return p


def config_from_args(config_class, args: argparse.Namespace):
    """`config_class` from parsed flags: the fields given, the defaults for the rest."""
    known = {f.name for f in fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in known and v is not None})


def offline_main(
    argv: list[str] | None,
    *,
    prog: str,
    doc: str,
    config_class,
    run: Callable,
    checkpoint_help: str,
    hide: tuple[str, ...] = ("config",),
) -> int:
    """Parse `argv`, build `config_class` from its flags, load the reasoner and the memory, call
    `run(memory, config, output)`, save the report with `--record`, print it without the keys in `hide`."""
    args = config_parser(prog, doc, config_class, checkpoint_help).parse_args(argv)
    config = config_from_args(config_class, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..bench.record import provenance, save_result
    from ..checkpoints import load_memory
    from ..reasoner import load_reasoner

    reasoner = load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
    started = provenance(reasoner.device)  # the commit the run started from, not the one it ends at
    memory = load_memory(reasoner, args.checkpoint)
    report = run(memory, config, args.output)
    if args.record:
        print(f"saved {save_result(args.record, {**report, **started}, device=reasoner.device)}")
    print(json.dumps({k: v for k, v in report.items() if k not in hide}, indent=2))
    return 0
