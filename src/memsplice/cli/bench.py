"""`memsplice bench <name>`: benchmarks, one module each under `memsplice.bench`.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> int`, prints a table (or JSON with
`--json`), and can save its numbers with command, commit, device and date under benchmarks/results/.
"""

from __future__ import annotations

import importlib

# Benchmark modules under memsplice.bench, in the order `--help` lists them.
BENCHES = {
    "core": "load time (cold, cached) and CPU forward latency with and without memory",
    "fidelity": "held-out reconstruction accuracy of a memory checkpoint at 4x-32x compression",
    "latency": "time to first token and decode ms/token: no memory, memory slots, full context",
    "online": "conversation memory write cost and answer latency; stability of online learning (forgetting, perplexity)",
    "serve": "concurrent clients against a live server: requests per second, latency percentiles, lost writes",
}


def add_parser(sub):
    p = sub.add_parser("bench", help="run a benchmark", description="Run one of memsplice's benchmarks.")
    names = p.add_subparsers(dest="bench", metavar="<benchmark>")
    for name, help_text in BENCHES.items():
        try:
            module = importlib.import_module(f"memsplice.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("memsplice.bench."):
                continue
            raise
        q = names.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(q)
        q.set_defaults(_bench=module.run)
    p.set_defaults(_bench=None, _bench_parser=p)
    return p


def run(args) -> int:
    if args._bench is None:
        args._bench_parser.print_help()
        return 0
    return args._bench(args)
