"""The harness on the real SmolLM2-135M-Instruct at CI size: it runs, and reading works where it must."""

from __future__ import annotations

import pytest

from memsplice.eval import EvalConfig, GenerationSettings, SystemArgs, TaskArgs, run_eval
from memsplice.eval.report import summarise

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_passkey_with_the_real_reasoner(real_reasoner):
    config = EvalConfig(
        task="passkey",
        systems=("none", "oracle", "window", "latent"),
        progress=False,
        task_args=TaskArgs(examples=1, lengths=(512,), depths=(0.0, 1.0)),
        system_args=SystemArgs(window_tokens=256),
        generation=GenerationSettings(max_new_tokens=12),
    )
    results = run_eval(config, reasoner=real_reasoner)
    s = summarise(results)["systems"]
    # The key is alone in the oracle's context: a working prompt and decoder read it back.
    assert s["oracle"]["main"] == 1.0
    # Without the key anywhere the reasoner cannot know it.
    assert s["none"]["main"] == 0.0
    assert all(r["memory_slots"] > 0 for r in results["records"] if r["system"] == "latent")
