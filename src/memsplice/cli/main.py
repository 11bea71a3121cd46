"""`memsplice <command>`: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`.

Errors a user can cause (a bad flag value, a missing model, an unreadable checkpoint) end with a one-line message
and exit status 2, not a traceback; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ["info", "chat", "demo", "train", "bench", "eval", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memsplice",
        description="Long-term memory for a frozen LLM, spliced into its KV cache as a few latent slots.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"memsplice.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("memsplice.cli."):
                continue  # subcommand not part of this build
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, PermissionError) as e:
        if args.debug:
            raise
        print(f"memsplice {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
