"""Data: held-out passages never come from training documents; batches are a pure function of (seed, step, rank)."""

import numpy as np
import pytest
import torch

from memsplice.data import iter_documents, split_of
from memsplice.train.config import DataArgs, ObjectiveArgs
from memsplice.train.data import PassageSource, corpus_tokens, fact_text, fact_tokens, heldout_passages
from tiny import tiny_tokenizer


def _source(corpus, tmp_path, **kw):
    tok = tiny_tokenizer()
    args = DataArgs(
        root=str(corpus),
        sources=["tinyshakespeare", "gutenberg-nltk"],
        lengths=[8, 16, 32],
        tokens_per_step=128,
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )
    train = corpus_tokens(tok, args, "train")
    return (
        PassageSource(
            train,
            args,
            ObjectiveArgs(aux_rows=4),
            seed=7,
            fact_stream=fact_tokens(tok, 0, 2000),
            mask_token_id=0,
        ),
        args,
        tok,
    )


def test_heldout_and_train_documents_are_disjoint(corpus, tmp_path):
    tok = tiny_tokenizer()
    args = DataArgs(
        root=str(corpus),
        sources=["tinyshakespeare", "gutenberg-nltk"],
        lengths=[8],
        tokens_per_step=64,
        cache_dir=str(tmp_path / "cache"),
    )
    docs = list(iter_documents(corpus, sources=args.sources, block_chars=4000))
    held = [d for d in docs if split_of(d.id) == "heldout"]
    train = [d for d in docs if split_of(d.id) == "train"]
    assert train
    held_stream = corpus_tokens(tok, args, "heldout") if held else None
    train_stream = corpus_tokens(tok, args, "train")
    want = sum(len(tok(d.text + "\n\n", add_special_tokens=False)["input_ids"]) for d in train)
    assert abs(len(train_stream) - want) <= len(train)  # every train document, and only those
    if held_stream is not None:
        assert len(held_stream) + len(train_stream) >= want


def test_corpus_cache_round_trips(corpus, tmp_path):
    tok = tiny_tokenizer()
    args = DataArgs(
        root=str(corpus),
        sources=["tinyshakespeare"],
        lengths=[8],
        tokens_per_step=64,
        cache_dir=str(tmp_path / "cache"),
    )
    first = corpus_tokens(tok, args, "train")
    assert list((tmp_path / "cache").glob("*.npy"))
    assert np.array_equal(first, corpus_tokens(tok, args, "train"))
    assert np.array_equal(first, corpus_tokens(tok, args, "train", cache=False))


def test_batches_are_a_function_of_seed_step_and_rank(corpus, tmp_path):
    source, args, _ = _source(corpus, tmp_path, synthetic_fraction=0.5)
    a, b = source.reconstruction(5), source.reconstruction(5)
    assert torch.equal(a, b)
    assert (
        not torch.equal(source.reconstruction(5), source.reconstruction(6))
        or a.shape != source.reconstruction(6).shape
    )
    other = PassageSource(
        source.stream, args, source.objectives, seed=7, rank=1, world_size=2, fact_stream=source.facts
    )
    assert other.length_at(5) == source.length_at(5)  # ranks agree on the shape
    assert not torch.equal(
        other.reconstruction(5), source.reconstruction(5)[: other.rows_for(other.length_at(5))]
    )
    assert source.rows_for(16) * 16 == args.tokens_per_step


def test_curriculum_caps_the_length(corpus, tmp_path):
    source, _, _ = _source(corpus, tmp_path, curriculum_steps=100, curriculum_start=8)
    assert {source.length_at(s) for s in range(0, 10)} == {8}
    assert max(source.length_at(s) for s in range(100, 200)) == 32


def test_denoising_corrupts_about_the_ratio(corpus, tmp_path):
    source, _, _ = _source(corpus, tmp_path)
    batch = source.denoising(3)
    assert batch.corrupted.shape[0] == batch.passage.shape[0]
    kept = batch.corrupted_mask.sum(1)
    assert (kept < batch.passage.shape[1]).all() or (batch.corrupted == 0).any()


def test_pairs_are_spans_of_their_passages(corpus, tmp_path):
    source, _, _ = _source(corpus, tmp_path)
    b = source.pairs(2)
    for q, m, p in zip(b.query.tolist(), b.query_mask.tolist(), b.passage.tolist(), strict=True):
        q = [t for t, keep in zip(q, m, strict=True) if keep]
        assert any(p[i : i + len(q)] == q for i in range(len(p) - len(q) + 1))


def test_heldout_passages_are_fixed_and_sized():
    stream = np.arange(10_000, dtype=np.int32)
    a, b = heldout_passages(stream, 64, 10), heldout_passages(stream, 64, 10)
    assert torch.equal(a, b) and a.shape == (10, 64)
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous windows
    with pytest.raises(ValueError, match="held-out"):
        heldout_passages(stream[:10], 64, 1)


def test_fact_text_is_varied():
    rng = np.random.default_rng(0)
    assert len({fact_text(rng, 2) for _ in range(20)}) == 20
