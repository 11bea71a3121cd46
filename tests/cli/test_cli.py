"""The memsplice command: help for every subcommand, info as JSON, clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from memsplice.cli.main import COMMANDS, build_parser, main
from tiny import tiny_reasoner


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert "info" in subcommands
    for name in subcommands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: memsplice" in capsys.readouterr().out
    assert set(subcommands) <= set(COMMANDS)


@pytest.fixture
def tiny_model_dir(tmp_path):
    r = tiny_reasoner("llama")
    r.model.save_pretrained(tmp_path / "tiny")
    r.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_info_json(tiny_model_dir, capsys):
    assert main(["info", "--reasoner", str(tiny_model_dir), "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["reasoner"]["num_kv_heads"] == 2 and info["reasoner"]["num_layers"] == 3
    assert info["memory"]["operator"] == "prepend_kv" and info["memory"]["parameters"] > 0


def test_bad_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    code = main(
        ["info", "--reasoner", str(tiny_model_dir), "--device", "cpu", "--checkpoint", str(tmp_path / "x")]
    )
    assert code == 2
    assert "no memory checkpoint directory" in capsys.readouterr().err
