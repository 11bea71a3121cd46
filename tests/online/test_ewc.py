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


def reference_penalty(anchor, module):
    """The penalty written out parameter by parameter: (weight / 2) * sum F (phi - phi')^2."""
    total = torch.zeros(())
    for n, p in module.named_parameters():
        f, a = anchor.fisher.get(n), anchor.anchor.get(n)
        if p.requires_grad and f is not None and a is not None and a.shape == p.shape:
            total = total + (f * (p.float() - a).pow(2)).sum()
    return 0.5 * anchor.weight * total


def moved_anchor(weight=3.0):
    """A model with a Fisher, moved away from its anchor by a random step, and its anchor."""
    m = model()
    a = ElasticAnchor(m, weight=weight)
    a.estimate_fisher(losses(m))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m, a


def grads(m):
    out = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return out


def test_penalty_and_its_gradient_equal_the_formula_parameter_by_parameter():
    m, a = moved_anchor()
    ref = reference_penalty(a, m)
    ref.backward()
    want = grads(m)
    pen = a.penalty()
    torch.testing.assert_close(pen, ref)
    pen.backward()
    got = grads(m)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_accumulate_grad_adds_the_penalty_gradient_and_returns_its_value():
    m, a = moved_anchor()
    ref = reference_penalty(a, m)
    ref.backward()
    want = grads(m)
    value = a.accumulate_grad()  # no .grad yet: set
    assert not value.requires_grad
    torch.testing.assert_close(value, ref.detach())
    got = grads(m)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    # with a gradient already there: added to it, as a backward pass through task loss + penalty would
    x = torch.randn(3, 4)
    task = lambda: m(x).pow(2).sum()  # noqa: E731
    (task() + reference_penalty(a, m)).backward()
    joint = grads(m)
    task().backward()
    a.accumulate_grad()
    for n, g in grads(m).items():
        torch.testing.assert_close(g, joint[n], rtol=1e-6, atol=1e-7)


def test_accumulate_grad_skips_parameters_without_a_fisher_and_does_nothing_without_one():
    m = model()
    a = ElasticAnchor(m, weight=2.0)
    assert a.accumulate_grad() == 0 and all(p.grad is None for p in m.parameters())  # no Fisher yet
    a.estimate_fisher(losses(m))
    del a.fisher["2.bias"]  # e.g. a parameter that joined after the last estimate
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    ref = reference_penalty(a, m)
    torch.testing.assert_close(a.accumulate_grad(), ref.detach())
    assert m[2].bias.grad is None and m[0].weight.grad is not None
    m.zero_grad(set_to_none=True)
    a.weight = 0.0
    assert a.accumulate_grad() == 0 and a.penalty() == 0
    assert all(p.grad is None for p in m.parameters())


def test_restore_puts_every_anchored_parameter_back_and_leaves_new_ones_alone():
    m = model()
    a = ElasticAnchor(m)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    extra = nn.Parameter(torch.ones(3))
    m.register_parameter("extra", extra)  # appears after the anchor was taken
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    assert a.restore() == len(start)
    for n, p in m.named_parameters():
        if n in start:
            assert torch.equal(p, start[n]) and p.data_ptr() != a.anchor[n].data_ptr()
    assert torch.equal(extra, torch.full((3,), 1.5))
