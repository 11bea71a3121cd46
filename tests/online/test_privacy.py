import pytest
import torch
from torch import nn

from memsplice.online import PrivacyAccountant, PrivacyConfig, private_gradients
from memsplice.online.privacy import ORDERS, gaussian_rdp, rdp_to_epsilon


def test_private_gradients_clip_each_sample_then_average():
    torch.manual_seed(0)
    lin = nn.Linear(3, 1, bias=False)
    xs = [torch.tensor([[10.0, 0, 0]]), torch.tensor([[0.01, 0, 0]])]
    fns = [lambda x=x: lin(x).sum() for x in xs]
    cfg = PrivacyConfig(max_grad_norm=1.0, noise_multiplier=1e-9)
    (g,), stats = private_gradients(fns, [lin.weight], cfg)
    # Sample 1's gradient (norm 10) is clipped to norm 1, sample 2's (norm 0.01) is kept.
    torch.testing.assert_close(g, torch.tensor([[(1.0 + 0.01) / 2, 0, 0]]), atol=1e-6, rtol=1e-5)
    assert stats.clipped == 1 and stats.samples == 2


def test_noise_has_the_configured_scale():
    lin = nn.Linear(2000, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    fns = [lambda: lin(torch.zeros(1, 2000)).sum()] * 4
    gen = torch.Generator().manual_seed(0)
    (g,), _ = private_gradients(
        fns, [lin.weight], PrivacyConfig(max_grad_norm=2.0, noise_multiplier=1.5), gen
    )
    assert abs(float(g.std()) - 1.5 * 2.0 / 4) < 0.05


def test_epsilon_grows_with_participations_and_falls_with_noise():
    a = PrivacyAccountant(noise_multiplier=1.0, delta=1e-5)
    a.record([0, 1])
    e1 = a.epsilon()
    a.record([0])
    assert a.max_participations == 2 and a.epsilon() > e1
    b = PrivacyAccountant(noise_multiplier=4.0, delta=1e-5)
    b.record([0])
    b.record([0])
    assert b.epsilon() < a.epsilon()
    assert PrivacyAccountant.from_dict(a.to_dict()).epsilon() == a.epsilon()


def test_accounting_matches_opacus():
    analysis = pytest.importorskip("opacus.accountants.analysis.rdp")
    for sigma, k in [(0.8, 1), (1.0, 10), (2.0, 100)]:
        ours = rdp_to_epsilon(gaussian_rdp(sigma, k), 1e-5)[0]
        rdp = analysis.compute_rdp(q=1.0, noise_multiplier=sigma, steps=k, orders=list(ORDERS))
        theirs = analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=1e-5)[0]
        assert ours == pytest.approx(float(theirs), rel=1e-6)


@pytest.mark.parametrize(
    "bad", [{"max_grad_norm": 0}, {"noise_multiplier": -1}, {"delta": 1.0}, {"latent_norm_clip": 0}]
)
def test_bad_privacy_settings_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PrivacyConfig(**bad)
