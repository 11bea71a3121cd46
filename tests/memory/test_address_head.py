"""The address head: late-interaction scores, the multi-positive InfoNCE loss, and its place in a checkpoint."""

import pytest
import torch

from helpers import small_memory
from memsplice.memory import MemoryConfig, MemoryModel
from memsplice.memory.address import AddressHead, address_loss, rank_chunks, top_chunks
from tiny import tiny_reasoner


def test_score_is_the_mean_over_queries_of_the_best_key():
    head = AddressHead(hidden_size=8, dim=4)
    q = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(5, 6, 4), dim=-1)
    scores = head.score(q, k)
    assert scores.shape == (2, 5)
    want = torch.stack(
        [torch.stack([(q[i] @ k[c].T).max(dim=1).values.mean() for c in range(5)]) for i in range(2)]
    )
    assert torch.allclose(scores, want * head.log_scale.exp(), atol=1e-5)


def test_queries_and_keys_are_unit_vectors():
    head = AddressHead(hidden_size=8, dim=4)
    z = torch.randn(3, 5, 8) * 7
    assert torch.allclose(head.queries(z).norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(head.keys(z).norm(dim=-1), torch.ones(3, 5), atol=1e-5)


def test_address_loss_counts_every_positive_and_skips_questions_without_one():
    scores = torch.tensor([[5.0, 5.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    positives = torch.tensor([[True, True, False], [False, False, False], [False, False, True]])
    loss = address_loss(scores, positives)
    first = torch.logsumexp(scores[0], 0) - torch.logsumexp(scores[0, :2], 0)
    third = torch.logsumexp(scores[2], 0) - scores[2, 2]
    assert torch.allclose(loss, (first + third) / 2)
    # putting the score on a negative instead raises the loss
    assert address_loss(scores.flip(1), positives) > loss


def test_address_loss_refuses_bad_input():
    with pytest.raises(ValueError, match="no question has a positive"):
        address_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores"):
        address_loss(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool))


def test_top_chunks_returns_the_best_in_time_order():
    assert top_chunks(torch.tensor([0.1, 0.9, 0.3, 0.8]), 2) == [1, 3]
    assert top_chunks(torch.tensor([0.1, 0.9]), 5) == [0, 1]
    with pytest.raises(ValueError):
        top_chunks(torch.tensor([0.1]), 0)


def test_rank_chunks_breaks_near_ties_in_favour_of_the_later_chunk():
    scores = torch.tensor([5.0, 1.0, 4.6, 4.0, 3.4])
    assert rank_chunks(scores) == [0, 2, 3, 4, 1]  # margin 0: by score alone
    assert rank_chunks(scores, 0.3) == [0, 2, 3, 4, 1]  # no two scores within 0.3
    # within 0.5 of 5.0 are chunks 0 and 2: the later (2) first; of the rest, each has no tie left
    assert rank_chunks(scores, 0.5) == [2, 0, 3, 4, 1]
    # within 1.2 of the best left: chunks 0, 2, 3, so 3 first; then 0 and 2, so 2; then 0; then 4 and 1
    assert rank_chunks(scores, 1.2) == [3, 2, 0, 4, 1]
    # a later chunk outside the margin never passes one inside it
    assert rank_chunks(torch.tensor([3.0, 9.0, 1.5]), 1.0) == [1, 0, 2]
    assert rank_chunks(torch.tensor([7.0]), 2.0) == [0]
    # the first `limit` of the same ranking
    assert rank_chunks(scores, 1.2, limit=2) == [3, 2]
    assert rank_chunks(scores, 0.0, limit=2) == [0, 2]
    assert rank_chunks(scores, 0.5, limit=9) == rank_chunks(scores, 0.5)
    with pytest.raises(ValueError, match="recency_margin"):
        rank_chunks(scores, -0.1)


def test_top_chunks_with_a_recency_margin_returns_the_first_ranked_in_time_order():
    scores = torch.tensor([5.0, 1.0, 4.6, 4.0])
    assert top_chunks(scores, 1) == [0]
    assert top_chunks(scores, 1, recency_margin=0.5) == [2]
    assert top_chunks(scores, 2, recency_margin=0.5) == [0, 2]
    assert top_chunks(scores, 1, recency_margin=1.5) == [3]


def test_the_recency_margin_is_part_of_the_config_and_validated(tmp_path):
    assert MemoryConfig().address_recency_margin == 0.0
    with pytest.raises(ValueError, match="address_recency_margin"):
        MemoryConfig(address_recency_margin=-1.0)
    MemoryConfig(address_recency_margin=0.75).save(tmp_path)
    assert MemoryConfig.load(tmp_path).address_recency_margin == 0.75


def test_set_recency_margin_overrides_the_checkpoints_and_refuses_a_negative_one():
    memory = small_memory(tiny_reasoner("llama"))
    memory.set_recency_margin(None)  # keeps the checkpoint's
    assert memory.config.address_recency_margin == 0.0
    memory.set_recency_margin(1.5)
    assert memory.config.address_recency_margin == 1.5
    for bad in (-0.1, "1", True):
        with pytest.raises(ValueError, match="recency margin"):
            memory.set_recency_margin(bad)
    assert memory.config.address_recency_margin == 1.5


def test_an_extra_margin_reads_a_second_chunk_only_where_the_head_is_unsure():
    sure = torch.tensor([5.0, 1.0, 3.0])  # the second pick is 2.0 below the first
    unsure = torch.tensor([4.6, 1.0, 5.0])  # 0.4 below
    assert top_chunks(sure, 2) == [0, 2]  # no margin: always k
    assert top_chunks(sure, 2, extra_margin=1.0) == [0]
    assert top_chunks(unsure, 2, extra_margin=1.0) == [0, 2]
    assert top_chunks(unsure, 1, extra_margin=1.0) == [2]  # never fewer than one, never more than k
    # with the recency tie-break the first pick may be the later chunk; the margin is still from the best score
    assert top_chunks(unsure, 2, recency_margin=0.5, extra_margin=0.3) == [2]
    with pytest.raises(ValueError, match="extra_margin"):
        top_chunks(sure, 2, extra_margin=-1.0)


def test_the_extra_margin_is_part_of_the_config_and_can_be_set():
    assert MemoryConfig().address_extra_margin is None
    for bad in (-1.0, True):
        with pytest.raises(ValueError, match="address_extra_margin"):
            MemoryConfig(address_extra_margin=bad)
    memory = small_memory(tiny_reasoner("llama"))
    memory.set_extra_margin(None)
    assert memory.config.address_extra_margin is None
    memory.set_extra_margin(0.75)
    assert memory.config.address_extra_margin == 0.75
    with pytest.raises(ValueError, match="extra chunk margin"):
        memory.set_extra_margin(-0.5)


def test_the_head_is_saved_and_loaded_with_the_memory(tmp_path):
    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner)
    assert memory.address is None
    memory.add_address_head(8)
    with pytest.raises(ValueError, match="already has an address head"):
        memory.add_address_head(8)
    with torch.no_grad():
        memory.address.key_proj.weight.normal_()
    memory.save_pretrained(tmp_path / "m")
    loaded = MemoryModel.from_pretrained(tmp_path / "m", reasoner=reasoner)
    assert loaded.config.address_dim == 8
    assert torch.equal(loaded.address.key_proj.weight, memory.address.key_proj.weight)
    with pytest.raises(ValueError, match="cannot override"):
        MemoryModel.from_pretrained(tmp_path / "m", reasoner=reasoner, address_dim=16)


def test_a_checkpoint_without_a_head_loads_without_one(tmp_path):
    reasoner = tiny_reasoner("llama")
    small_memory(reasoner).save_pretrained(tmp_path / "m")
    assert MemoryModel.from_pretrained(tmp_path / "m", reasoner=reasoner).address is None
