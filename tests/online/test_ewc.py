import torch
from torch import nn

from memsplice.online import ElasticAnchor


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def losses(m, n=6):
    x, y = torch.randn(n, 4), torch.randn(n, 1)
    return [lambda i=i: (m(x[i : i + 1]) - y[i : i + 1]).pow(2).sum() for i in range(n)]


def test_penalty_is_zero_at_the_anchor_and_pulls_back():
    m = model()
    a = ElasticAnchor(m, weight=2.0)
    assert a.penalty() == 0  # no Fisher yet
    assert a.estimate_fisher(losses(m)) == 6
    mean = torch.cat([f.flatten() for f in a.fisher.values()]).mean()
    torch.testing.assert_close(mean, torch.tensor(1.0))
    assert a.penalty() == 0
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    pen = a.penalty()
    assert pen > 0
    pen.backward()
    for n, p in m.named_parameters():
        # The gradient points away from the anchor (so a descent step moves back towards it).
        assert (p.grad * (p.detach() - a.anchor[n]) >= 0).all()
    a.refresh()
    assert a.penalty() == 0


def test_fisher_accumulates_with_decay_and_anchor_does_not_alias():
    m = model()
    a = ElasticAnchor(m, weight=1.0, decay=0.5)
    a.estimate_fisher(losses(m))
    first = {n: f.clone() for n, f in a.fisher.items()}
    a.estimate_fisher(losses(m))
    for n in first:
        assert torch.all(a.fisher[n] >= 0.5 * first[n] - 1e-6)
    with torch.no_grad():
        m[0].weight.zero_()
    assert a.anchor["0.weight"].abs().sum() > 0
