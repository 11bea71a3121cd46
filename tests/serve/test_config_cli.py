"""ServeConfig precedence and validation, and the `memsplice serve` command line (keys, refusing to start)."""

from __future__ import annotations

import pytest

from memsplice.cli.main import main
from memsplice.serve.config import ServeConfig, env_values
from memsplice.store import MemoryStore


def test_precedence_file_env_flags(tmp_path):
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("serve:\n  port: 9001\n  auth: false\n  max_new_tokens: 256\n  log_format: text\n")
    env = {"MEMSPLICE_PORT": "9002", "MEMSPLICE_MAX_BODY_BYTES": "2048", "MEMSPLICE_CACHE": "/elsewhere"}
    cfg = ServeConfig.load(yaml_file, environ=env, overrides={"port": 9003, "host": None})
    assert cfg.port == 9003  # flag over env over file
    assert cfg.max_body_bytes == 2048 and cfg.auth is False and cfg.max_new_tokens == 256
    assert cfg.host == "127.0.0.1"  # an unset flag does not override
    toml_file = tmp_path / "serve.toml"
    toml_file.write_text('database_url = "postgresql://u@h/db"\nonline_learning = true\n')
    cfg = ServeConfig.load(toml_file, environ={})
    assert cfg.store_url == "postgresql://u@h/db" and cfg.online_learning is True
    assert ServeConfig(data_dir=str(tmp_path)).store_url.endswith("/memsplice.db")


@pytest.mark.parametrize(
    "content,match",
    [
        ("port: 80\nwat: 1\n", "unknown settings \\['wat'\\]"),
        ("port: -1\n", "ServeConfig.port"),
        ("default_max_new_tokens: 999\nmax_new_tokens: 10\n", "default_max_new_tokens"),
        ("log_format: xml\n", "ServeConfig.log_format"),
        ("engine: vllm\n", "ServeConfig.engine"),
        ("memory_refine_steps: -2\n", "ServeConfig.memory_refine_steps"),
        ("- a\n- b\n", "mapping"),
        ("port: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        ServeConfig.load(path, environ={})


def test_bad_environment_values_name_the_variable():
    with pytest.raises(ValueError, match="MEMSPLICE_PORT='eighty'"):
        env_values({"MEMSPLICE_PORT": "eighty"})
    with pytest.raises(ValueError, match="MEMSPLICE_AUTH"):
        env_values({"MEMSPLICE_AUTH": "maybe"})
    assert env_values({"MEMSPLICE_MEMORY_CHUNK_TOKENS": "none"}) == {"memory_chunk_tokens": None}


def test_keys_command(tmp_path, capsys):
    data = str(tmp_path / "data")
    assert (
        main(
            [
                "serve",
                "--data-dir",
                data,
                "keys",
                "add",
                "alice-app",
                "--scope",
                "alice",
                "--scope",
                "alice:*",
            ]
        )
        == 0
    )
    key = capsys.readouterr().out.strip()
    store = MemoryStore(f"sqlite:///{tmp_path / 'data' / 'memsplice.db'}")
    info = store.verify_key(key)
    assert info.scopes == ("alice", "alice:*")
    assert main(["serve", "keys", "--data-dir", data, "list"]) == 0
    listed = capsys.readouterr().out
    assert info.key_id in listed and key[len("msk_") + 13 :] not in listed  # the secret is never listed
    assert main(["serve", "keys", "--data-dir", data, "revoke", info.key_id]) == 0
    assert store.verify_key(key) is None
    assert (
        main(["serve", "keys", "--data-dir", data, "revoke", info.key_id]) == 2
    )  # a clear error, no traceback
    assert "no live key" in capsys.readouterr().err
    store.close()


def test_serve_refuses_to_start_without_keys(tmp_path, capsys):
    from tests.serve.harness import save_tiny_reasoner, small_memory

    reasoner = save_tiny_reasoner(tmp_path / "reasoner")
    small_memory().save_pretrained(tmp_path / "ckpt")
    code = main(
        [
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--reasoner",
            reasoner,
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--device",
            "cpu",
            "--log-format",
            "text",
        ]
    )
    assert code == 2 and "no API key" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_engine_flags_reach_the_config():
    from memsplice.cli.main import build_parser
    from memsplice.cli.serve import _config

    parse = build_parser().parse_args
    assert (_config(parse(["serve"])).engine, _config(parse(["serve"])).engine_compile) == ("auto", False)
    cfg = _config(parse(["serve", "--engine", "eager", "--compile"]))
    assert cfg.engine == "eager" and cfg.engine_compile is True
    assert env_values({"MEMSPLICE_ENGINE": "eager", "MEMSPLICE_ENGINE_COMPILE": "1"}) == {
        "engine": "eager",
        "engine_compile": True,
    }
    with pytest.raises(SystemExit):
        parse(["serve", "--engine", "vllm"])


def test_read_back_flag_reaches_the_config():
    from memsplice.cli.main import build_parser
    from memsplice.cli.serve import _config

    parse = build_parser().parse_args
    assert _config(parse(["serve"])).memory_read_back is False
    assert _config(parse(["serve", "--read-back"])).memory_read_back is True
    assert env_values({"MEMSPLICE_MEMORY_READ_BACK": "true"}) == {"memory_read_back": True}
    assert _config(parse(["serve"])).memory_read_back_placement == "message"
    assert _config(parse(["serve", "--read-back-placement", "system"])).memory_read_back_placement == "system"
