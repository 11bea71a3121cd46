"""`memsplice serve`: the OpenAI-compatible chat server with per-user latent memory, and its API keys.

    memsplice serve keys add alice-app --scope 'alice' --scope 'alice:*'   # prints the key once
    memsplice serve --port 8000 --checkpoint DIR                          # serve (Ctrl-C / SIGTERM: graceful)
    memsplice serve keys list | keys revoke KEY_ID

Settings come from defaults < `--config FILE` (YAML/TOML) < `MEMSPLICE_*` environment variables < flags; see
`memsplice.serve.config.ServeConfig` for every setting.
"""

from __future__ import annotations

import argparse
import json
import sys


def _flags(p: argparse.ArgumentParser, default=None) -> None:
    # Repeated on `serve keys` with default SUPPRESS, so a value given before `keys` is not reset by the subparser.
    p.add_argument(
        "--config", default=default, metavar="FILE", help="YAML or TOML file of ServeConfig settings"
    )
    p.add_argument(
        "--data-dir",
        dest="data_dir",
        default=default,
        metavar="DIR",
        help="SQLite database and served memory weights (default: ./memsplice-data)",
    )
    p.add_argument(
        "--database-url",
        dest="database_url",
        default=default,
        metavar="URL",
        help="store URL: sqlite:///path.db or postgresql://user:pw@host/db (default: SQLite in --data-dir)",
    )


def add_parser(sub):
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible chat server with per-user memory",
        description="Serve POST /v1/chat/completions with per-scope latent memory, the memory API, "
        "/healthz, /metrics and the /inspector page. Scopes come from the request's "
        "`user` field or the X-Memsplice-Scope header.",
    )
    _flags(p)
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--reasoner",
        default=None,
        metavar="SRC",
        help="a .gguf file, a transformers directory or a hub id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="memory checkpoint to start from when --data-dir holds no weights yet (default: a fresh, "
        "untrained memory)",
    )
    p.add_argument(
        "--model-id",
        dest="model_id",
        default=None,
        help="model name clients send (default: memsplice-<reasoner name>)",
    )
    p.add_argument(
        "--no-auth",
        dest="auth",
        action="store_const",
        const=False,
        default=None,
        help="serve without API keys (every scope open; only for loopback)",
    )
    p.add_argument(
        "--online-learning",
        dest="online_learning",
        action="store_const",
        const=True,
        default=None,
        help="keep training the memory online from every chat exchange and memory write, with replay and EWC, "
        "in a background worker that never blocks a request (settings: online_* in ServeConfig)",
    )
    p.add_argument(
        "--read-back",
        dest="memory_read_back",
        action="store_const",
        const=True,
        default=None,
        help="give each chat the chunk memories its last user message picks read back as text, from memory alone, "
        "instead of memory K/V (as the eval's latent-readback; needs a memory trained to be read back, such as the "
        "shipped one; ServeConfig memory_read_back)",
    )
    p.add_argument(
        "--read-back-placement",
        dest="memory_read_back_placement",
        choices=["message", "system"],
        default=None,
        help="where read-back text goes: 'message' (default), in the last user message in front of what the user "
        "wrote; 'system', in the system message (ServeConfig memory_read_back_placement)",
    )
    p.add_argument(
        "--reading-prefix",
        dest="memory_reading_prefix",
        default=None,
        metavar="DIR|shipped",
        help="with --read-back: a trained reading prefix in front of every prompt that carries read-back text "
        "(python -m memsplice.reading.train; 'shipped': the one shipped for the reasoner; ServeConfig "
        "memory_reading_prefix); a few replies get short",
    )
    p.add_argument(
        "--engine",
        choices=["auto", "eager"],
        default=None,
        help="auto (default): greedy requests (temperature 0) that fit the reasoner's window decode on "
        "memsplice's GreedyDecoder (preallocated cache, CUDA graphs on a GPU; the same tokens as eager "
        "generation); eager: transformers' generate() for every request. Sampling is always eager",
    )
    p.add_argument(
        "--compile",
        dest="engine_compile",
        action="store_const",
        const=True,
        default=None,
        help="torch.compile the engine's decode step (compiled on the first request of each cache size)",
    )
    p.add_argument("--log-format", dest="log_format", choices=["json", "text"], default=None)
    p.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"], default=None
    )
    p.add_argument(
        "--torch-threads", dest="torch_threads", type=int, default=None, help="CPU threads for torch"
    )
    keys = p.add_subparsers(dest="serve_action", metavar="[keys]")
    k = keys.add_parser(
        "keys",
        help="create, list or revoke API keys",
        description="API keys are stored hashed in the server's store; a key may touch the scopes "
        "matching its patterns (shell-style: 'alice', 'team-a:*', '*').",
    )
    _flags(k, default=argparse.SUPPRESS)
    actions = k.add_subparsers(dest="key_action", metavar="<action>", required=True)
    add = actions.add_parser("add", help="create a key and print it (it is shown only once)")
    add.add_argument("name", help="a label for the key (who uses it)")
    add.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        metavar="PATTERN",
        help="scope pattern the key may touch (repeatable)",
    )
    actions.add_parser("list", help="list keys (never their secrets)")
    rev = actions.add_parser("revoke", help="revoke a key by its id")
    rev.add_argument("key_id")
    p.set_defaults(serve_action=None)
    return p


def _config(args):
    from memsplice.serve.config import ServeConfig

    names = set(ServeConfig.field_names())
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return ServeConfig.load(args.config, overrides=overrides)


def _keys(args, config) -> int:
    from memsplice.store import MemoryStore

    store = MemoryStore(config.store_url, sqlite_synchronous=config.sqlite_synchronous)
    try:
        if args.key_action == "add":
            key = store.create_key(args.name, args.scopes)
            print(key)
            print(
                f"# key for {args.name!r}, scopes {args.scopes}; store it now, it is not shown again",
                file=sys.stderr,
            )
        elif args.key_action == "list":
            for row in store.list_keys():
                print(json.dumps(row))
        elif args.key_action == "revoke":
            if not store.revoke_key(args.key_id):
                raise ValueError(f"no live key with id {args.key_id!r}")
            print(f"revoked {args.key_id}")
    finally:
        store.close()
    return 0


def run(args) -> int:
    config = _config(args)
    if args.serve_action == "keys":
        return _keys(args, config)
    from memsplice.serve.app import create_app
    from memsplice.serve.logs import configure_logging
    from memsplice.serve.server import build_service, uvicorn_server

    configure_logging(config.log_format, "debug" if args.debug else config.log_level)
    service = build_service(config)
    server = uvicorn_server(create_app(service), config)
    server.run()
    return 0
