"""scripts/formation/latent_capacity.py: per-passage optimisation of free latents / free K/V lowers the reconstruction
loss, and step 0 is the encoder itself."""

import pytest

from helpers import load_script, random_ids, small_memory
from memsplice.train.evaluate import reconstruction_fidelity
from tiny import tiny_reasoner


def _script():
    return load_script("formation/latent_capacity.py")


@pytest.mark.parametrize("mode", ["free_latents", "encoder_span", "free_kv"])
def test_free_optimisation_lowers_the_loss(mode):
    lc = _script()
    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner).eval().requires_grad_(False)
    passages, instruction = random_ids(3, 12), random_ids(1, 3)[0]
    out = lc.optimise(memory, passages, instruction, mode, [0, 20], lr=0.1)
    assert len(out["losses"]) == 21  # the loss before each step, and after the last
    assert out["losses"][-1] < 0.93 * out["losses"][0]
    assert out["hits"][20].sum() >= out["hits"][0].sum()
    f = reconstruction_fidelity(reasoner, memory, passages, instruction)  # step 0 is the encoder as it is
    assert out["hits"][0].float().mean().item() == pytest.approx(f.token_accuracy)
    assert all(not p.requires_grad for p in memory.parameters())
    assert memory.fallback_log.total == 0


def test_encoder_span_starts_at_the_encoder_and_stays_in_its_span():
    import torch

    lc = _script()
    memory = small_memory(tiny_reasoner("llama")).eval().requires_grad_(False)
    w_out = memory.encoder.out_proj.weight  # (d, w) with w < d: a proper subspace
    assert w_out.shape[1] < w_out.shape[0]
    passages = random_ids(2, 12)
    (u,), build = lc.free_memory(memory, passages, "encoder_span")
    torch.testing.assert_close(build().latents, memory.write(passages).latents, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        u.add_(torch.randn_like(u))
    z = build().latents.float()
    projector = w_out @ torch.linalg.pinv(w_out)
    torch.testing.assert_close(z @ projector.T, z, atol=1e-4, rtol=1e-4)


def test_passages_spread_over_the_pool():
    lc = _script()
    assert lc.choose(128, 4) == [0, 32, 64, 96]
    assert lc.choose(8, 8) == list(range(8))
    with pytest.raises(ValueError):
        lc.choose(8, 9)
