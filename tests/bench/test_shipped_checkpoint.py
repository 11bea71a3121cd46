"""The memory checkpoint shipped for SmolLM2-135M-Instruct reconstructs held-out passages on the CPU, and its address
head finds the chunk that holds a test question's answer.

Stated threshold: at 8x (128 held-out tokens into 16 slots), teacher-forced token accuracy of at least
MIN_TOKEN_ACCURACY_8X over 16 passages, and well above the no-memory floor. The test is skipped, saying so, while
no trained checkpoint ships in src/memsplice/checkpoints/smollm2-135m-instruct/.
"""

import pytest
import torch

from memsplice.checkpoints import default_checkpoint_dir

MIN_TOKEN_ACCURACY_8X = 0.90
"""The shipped checkpoint (the encoder that also reads the reasoner's hidden states, trained on 16-512-token passages,
shipped since the evening of 2026-12-03) measured 94.9% at 8x on 128 held-out passages on an H200 (bf16) and on the
CPU (fp32), and 93.7% on these 16 passages on the CPU, against a 30.4% no-memory floor (the checkpoint before it:
93.9%; the one before that: 89.7%); 0.90 leaves a margin for arithmetic differences. This is below the 99% the
formation target asks for (see README, "Memory formation")."""
MAX_SHIPPED_BYTES = 40 * 10**6


def _shipped():
    try:
        return default_checkpoint_dir()
    except FileNotFoundError as e:
        pytest.skip(f"no trained checkpoint shipped yet: {e}")


def test_shipped_checkpoint_is_small():
    path = _shipped()
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= MAX_SHIPPED_BYTES


@pytest.mark.real_model
@pytest.mark.slow
def test_shipped_checkpoint_reconstructs_heldout_passages(real_reasoner):
    from memsplice.memory import MemoryModel
    from memsplice.train.config import DataArgs
    from memsplice.train.data import corpus_tokens, heldout_passages
    from memsplice.train.evaluate import reconstruction_fidelity

    path = _shipped()
    memory = MemoryModel.from_pretrained(path, reasoner=real_reasoner)
    memory.eval()
    tok = real_reasoner.tokenizer
    extra = memory.config.extra
    try:
        heldout = corpus_tokens(
            tok, DataArgs(sources=extra.get("data_sources") or DataArgs().sources), "heldout"
        )
    except FileNotFoundError as e:
        pytest.skip(f"no corpus directory for held-out passages: {e}")
    passages = heldout_passages(heldout, 128, 16)
    instruction = torch.tensor(
        tok(extra.get("instruction") or DataArgs().instruction, add_special_tokens=False)["input_ids"]
    )
    latent = reconstruction_fidelity(real_reasoner, memory, passages, instruction, batch_rows=8)
    floor = reconstruction_fidelity(real_reasoner, None, passages, instruction, batch_rows=8)
    assert latent.token_accuracy >= MIN_TOKEN_ACCURACY_8X, (latent, floor)
    assert latent.token_accuracy > floor.token_accuracy + 0.2


PASSAGE = (
    "The lighthouse keeper on Farrow Point kept two logs. In the first he wrote the weather every four hours: wind, "
    "cloud, the height of the swell against the third step of the landing. In the second, which he showed no one, "
    "he wrote down every ship that passed without answering his lamp, with the hour and the colour of its hull. "
    "When the keeper retired after thirty-one years, the second log held four hundred and twelve entries, and the "
    "harbour office, which had never asked for it, kept it in a drawer beside the tide tables. Nobody has opened "
    "the drawer since the office moved to the new pier in the spring of the flood year."
)


@pytest.mark.real_model
@pytest.mark.slow
def test_refinement_makes_the_shipped_memory_read_a_new_passage_back_verbatim(real_reasoner):
    """Write-time refinement on text no corpus holds: 128 tokens into 16 slots (8x) read back exactly after 10 steps,
    teacher-forced and by free greedy read-back (the H200 bench: 100% of 128 held-out passages at 8x, benchmarks/results/formation/fidelity-refine-lr0.1.json)."""
    from memsplice.memory import MemoryModel
    from memsplice.memory.refine import reconstruction_instruction
    from memsplice.train.evaluate import reconstruction_fidelity

    memory = MemoryModel.from_pretrained(_shipped(), reasoner=real_reasoner).eval()
    ids = real_reasoner.tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 128, len(ids)
    passage = torch.tensor([ids[:128]])
    instruction = reconstruction_instruction(memory).cpu()
    encoder = reconstruction_fidelity(real_reasoner, memory, passage, instruction)
    refined = reconstruction_fidelity(real_reasoner, memory, passage, instruction, refine_steps=10)
    assert refined.exact_match == 1.0, (encoder, refined)
    assert encoder.token_accuracy < 1.0  # the encoder alone does not: refinement is what closes it
    # and read back freely (greedy, no teacher forcing), from the memory alone, it is the passage
    from memsplice.memory.readback import read_back_ids

    with torch.no_grad():
        written = memory.write(passage, refine_steps=10)
    assert read_back_ids(memory, written.kv, 128) == [passage[0].tolist()]


MIN_ADDRESS_RECALL_AT_1 = 0.75
"""The shipped address head (trained with made-up names and a user's own first-person facts, on the latents of the
memory shipped since the evening of 2026-12-03) puts the evidence chunk first for 12 of these 12 test-split questions
about other people on the CPU and for 10 of 12 in the user's perspective (11 at recall@2). The head before it got 12
and 11; the one before that, on the older encoder, 12 and 12; the one before that (made-up names alone) 12 and 7
(benchmarks/results/online/names-user-head-cpu/)."""


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("perspective", ["others", "user"])
def test_the_shipped_address_head_finds_the_evidence_of_test_questions(real_reasoner, perspective):
    """A fresh install picks the chunk memory that holds a question's answer: 12 questions of two synthetic test-split
    conversations of 1k tokens, scored within each conversation from the chunks' latents (32-token chunks, as the
    checkpoint's config says). "user": a user's chat with an assistant, half the facts the user's own, told in the
    first person and asked about by the user's name."""
    from memsplice.eval.reader import Reader
    from memsplice.eval.tasks import TaskArgs, get_task
    from memsplice.memory import MemoryModel
    from memsplice.online.address import address_examples, recall_at
    from memsplice.online.bootstrap import episode_examples

    memory = MemoryModel.from_pretrained(_shipped(), reasoner=real_reasoner).eval()
    assert memory.address is not None and memory.config.chunk_tokens == 32
    args = TaskArgs(examples=2, lengths=(1024,), seed=0, split="test", facts=6, perspective=perspective)
    episodes = get_task("synthetic")(args, Reader(real_reasoner).count_tokens)
    recall = recall_at(memory, address_examples(memory, episode_examples(episodes, real_reasoner, 32)))
    assert recall["questions"] == 12
    assert recall["recall@1"] >= MIN_ADDRESS_RECALL_AT_1, recall
    assert recall["recall@2"] >= 0.9 and recall["recall@1"] > 10 * recall["chance@1"], recall
