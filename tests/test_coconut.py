"""
Tests of coconut.py against naive references written here.

Run: python -m pytest -q tests/test_coconut.py
The naive reference is the method's definition, coconut.naive_think: one example at a time with no
padding and no KV cache, for every thought run the whole prefix again and copy the last hidden
state into the next input embedding.
"""

import random

import pytest
import torch
from torch.nn import functional as F

from analyze import thoughts_of
from coconut import Coconut, Curriculum, build_example, collate, naive_think, stage_layout
from common import pad_columns
from data import END_LATENT, EOS, GPT2_SPECIAL_IDS, LATENT, START_LATENT, Vocab
from evaluate import forward_passes
from model import GPT, GPTConfig
from reference import official_generate

S, E, L = START_LATENT, END_LATENT, LATENT


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=50260, n_layer=2, n_head=4, n_embd=32))


def random_tokens(seed, n_steps):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 50000, (n,), generator=g).tolist()  # noqa: E731
    q = ids(3 + seed % 4)
    return {"question": q, "steps": [ids(1 + (seed + i) % 3) for i in range(n_steps)], "answer": ids(2) + [EOS]}


def logits_of(model, batch):
    """The logits at every position of a batch, thoughts fed back."""
    return model.gpt.lm_head(model.think(batch["input_ids"], batch["attention_mask"], batch["position_ids"]))


class Detached:
    """A GPT whose hidden states come detached: naive_think over it cuts the gradient through the
    thoughts."""

    def __init__(self, gpt):
        self.transformer, self.lm_head = gpt.transformer, gpt.lm_head
        self.hidden = lambda **kwargs: gpt.hidden(**kwargs).detach()


def naive_loss_sum(gpt, example, detach=False, latent_id=LATENT):
    """Summed cross-entropy of one example (labels shifted), and how many tokens it counts."""
    embeds = naive_think(Detached(gpt) if detach else gpt, example["input_ids"], latent_id)
    logits = gpt(embeds=embeds)[0][0]
    labels = torch.tensor(example["labels"])
    keep = labels[1:] != -100
    return F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum"), int(keep.sum())


def mixed_batch_examples():
    """Rows at different stages, so with different numbers of thoughts and different lengths."""
    cur = Curriculum(c=2, max_latent_stage=2)
    return [build_example(random_tokens(seed, n_steps), cur, stage)
            for seed, n_steps, stage in [(0, 3, 1), (1, 2, 2), (2, 3, 0), (3, 1, 3), (4, 3, 2)]]


def test_cached_multipass_loss_and_gradients_equal_naive_recompute():
    examples = mixed_batch_examples()
    assert len({sum(t == L for t in e["input_ids"]) for e in examples}) >= 3  # really mixed

    gpt = tiny_gpt()
    loss = Coconut(gpt)(**collate(examples))
    loss.backward()

    ref_gpt = tiny_gpt()
    sums, counts = zip(*(naive_loss_sum(ref_gpt, e) for e in examples))
    ref_loss = sum(sums) / sum(counts)  # the batch mean over every supervised token
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(gpt.named_parameters(), ref_gpt.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_flows_through_the_thoughts():
    """Cutting the feedback path (detaching thoughts) must change the gradient: it matters."""
    examples = [build_example(random_tokens(7, 3), Curriculum(c=1), stage=3)]
    gpt = tiny_gpt()
    Coconut(gpt)(**collate(examples)).backward()
    with_feedback = gpt.transformer.h[0].mlp.c_fc.weight.grad.clone()
    ref_gpt = tiny_gpt()
    naive_loss_sum(ref_gpt, examples[0], detach=True)[0].backward()
    assert not torch.allclose(with_feedback, ref_gpt.transformer.h[0].mlp.c_fc.weight.grad, atol=1e-6)


def test_mixed_batch_equals_each_row_alone():
    examples = mixed_batch_examples()
    gpt = tiny_gpt()
    model = Coconut(gpt)
    batch = collate(examples)
    logits = logits_of(model, batch)
    for i, e in enumerate(examples):
        alone = logits_of(model, collate([e]))
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(logits[i, real], alone[0], atol=1e-5, rtol=1e-5)


def test_stage_zero_equals_plain_gpt_loss():
    gpt = tiny_gpt()
    example = build_example(random_tokens(5, 3), Curriculum(method="cot"), stage=0)
    batch = collate([example])
    loss = Coconut(gpt)(**batch)
    logits, _ = gpt(batch["input_ids"])
    ref = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, ref)


def test_pause_feeds_no_thoughts_back():
    """'pause as thought': <|latent|> is an ordinary token, so one plain pass of the GPT."""
    gpt = tiny_gpt()
    batch = collate([build_example(random_tokens(6, 3), Curriculum(method="pause"), stage=2)])
    loss = Coconut(gpt, feedback=False)(**batch)
    logits, _ = gpt(batch["input_ids"])
    ref = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, ref)


def generation_prompts():
    cur = Curriculum(c=2, max_latent_stage=2)  # rows get 0, 2 or 4 thoughts
    return [build_example(random_tokens(seed, n), cur, 0, prompt_only=True, n_thoughts=k)["input_ids"]
            for seed, n, k in [(0, 3, 4), (1, 1, 2), (2, 3, 0), (3, 2, 2)]]


def test_batched_generation_equals_one_by_one():
    gpt = tiny_gpt().eval()
    prompts = generation_prompts()
    # pick as "eos" a token that one row emits early, so that rows stop at different times
    eos_id = official_generate(gpt, prompts[0], 3, eos_id=-1)[2]
    expected = [official_generate(gpt, p, 8, eos_id) for p in prompts]
    assert len({len(e) for e in expected}) > 1

    model = Coconut(gpt, GPT2_SPECIAL_IDS._replace(eos=eos_id))
    batch = collate([{"input_ids": p, "labels": [-100] * len(p)} for p in prompts], for_generation=True)
    answers = model.generate(**batch, max_new_tokens=8)
    thoughts = thoughts_of(model, batch)
    assert answers == expected
    # each row's thoughts are the hidden states its <|latent|> slots were given
    for p, t in zip(prompts, thoughts):
        n = p.count(LATENT)
        assert t.shape == (n, 32)
        if n:
            with torch.no_grad():
                filled = naive_think(gpt, p)[0]
            slots = [j for j, tok in enumerate(p) if tok == LATENT]
            torch.testing.assert_close(t, filled[slots], atol=1e-5, rtol=1e-5)
    # forward passes, as the paper counts them, are the passes one question alone takes: counted here
    calls = []
    hidden = gpt.hidden
    gpt.hidden = lambda *a, **k: calls.append(1) or hidden(*a, **k)
    for p in prompts:  # each row ends at its eos: here the token it writes third
        model.special = GPT2_SPECIAL_IDS._replace(eos=official_generate(gpt, p, 3, eos_id=-1)[2])
        e = official_generate(gpt, p, 8, model.special.eos)
        calls.clear()
        assert model.generate(**collate([{"input_ids": p}], for_generation=True), max_new_tokens=8) == [e]
        assert len(calls) == forward_passes(p.count(LATENT), len(e))


def test_batched_generation_keeps_each_rows_positions():
    """A model whose outputs hang on the positions (large position embeddings): left-padded rows
    must continue from their own positions, not from the batch's column."""
    gpt = tiny_gpt(seed=1).eval()
    with torch.no_grad():
        gpt.transformer.wpe.weight.mul_(40)
    prompts = generation_prompts()
    expected = [official_generate(gpt, p, 6, eos_id=-1) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1
    batch = collate([{"input_ids": p} for p in prompts], for_generation=True)
    assert Coconut(gpt).generate(**batch, max_new_tokens=6) == expected


def test_padding_to_buckets_changes_no_loss_gradient_or_answer():
    """pad_columns (on a GPU, lengths in buckets of 64 columns) adds only pads: the loss, the
    gradients and the greedy answers stay those of the tightest padding, to 1e-6."""
    examples = mixed_batch_examples()
    tight = collate(examples)
    bucketed = pad_columns(tight, 16, GPT2_SPECIAL_IDS)
    assert bucketed["input_ids"].shape[1] % 16 == 0 and bucketed["input_ids"].shape[1] > tight["input_ids"].shape[1]
    assert bucketed["input_ids"].tolist()[0].index(L) % 16 == 0  # the thoughts' column too
    gpt, ref = tiny_gpt(), tiny_gpt()
    loss = Coconut(gpt)(**bucketed)
    loss.backward()
    ref_loss = Coconut(ref)(**tight)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for (name, p), p_ref in zip(gpt.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-6, rtol=1e-5, msg=name)
    gpt = tiny_gpt(seed=1).eval()
    with torch.no_grad():
        gpt.transformer.wpe.weight.mul_(40)  # answers that hang on the positions
    prompts = [{"input_ids": p} for p in generation_prompts()]
    model = Coconut(gpt)
    expected = model.generate(**collate(prompts, for_generation=True), max_new_tokens=6)
    bucketed = pad_columns(collate(prompts, for_generation=True), 16, GPT2_SPECIAL_IDS)
    assert bucketed["input_ids"].shape[1] % 16 == 0 and bucketed["input_ids"][:, -1].tolist() == [E] * len(prompts)
    assert model.generate(**bucketed, max_new_tokens=6) == expected


def test_data_vocabulary_maps_ids_in_and_out():
    """A model over a few GPT-2 ids (--vocab data): a record mapped into its ids (Vocab.map_tokens)
    and laid out with its own marker ids gives the loss and answers of the same GPT run on the ids
    mapped by hand, and its answers map back to GPT-2's."""
    ids = sorted({EOS, S, E, L, 10, 20, 30, 40, 50, 60})
    vocab = Vocab(ids)
    torch.manual_seed(0)
    small = GPT(GPTConfig(block_size=32, vocab_size=len(ids), n_layer=1, n_head=2, n_embd=16)).eval()
    model = Coconut(small, vocab.special)
    mapped = lambda tokens: [ids.index(t) for t in tokens]  # noqa: E731
    tokens = vocab.map_tokens({"question": [10, 20, 30], "steps": [[60]], "answer": [40, 50, EOS]})
    example = build_example(tokens, Curriculum(c=1, max_latent_stage=1), 1, special=vocab.special)
    assert example["input_ids"] == mapped([10, 20, 30, S, L, E, 40, 50, EOS])
    loss_sum, count = naive_loss_sum(small, {"input_ids": mapped([10, 20, 30, S, L, E, 40, 50, EOS]),
                                             "labels": [-100] * 6 + mapped([40, 50, EOS])}, latent_id=ids.index(L))
    torch.testing.assert_close(model(**collate([example], special=vocab.special)), loss_sum / count)
    prompt = build_example(tokens, Curriculum(c=1, max_latent_stage=1), 1, special=vocab.special, prompt_only=True)
    expected = official_generate(small, mapped([10, 20, 30, S, L, E]), 5, eos_id=-1, latent_id=ids.index(L))
    answer = [vocab.to_gpt2(a) for a in model.generate(**collate([prompt], True, vocab.special), max_new_tokens=5)]
    assert answer == [[ids[i] for i in expected]]


# -----------------------------------------------------------------------------
# The curriculum, on a hand-written example: question [1, 2], steps [3], [4, 5], [6], answer [7, eos]

TOKENS = {"question": [1, 2], "steps": [[3], [4, 5], [6]], "answer": [7, EOS]}
X = -100


@pytest.mark.parametrize("stage, ids", [
    (0, [1, 2, S, E, 3, 4, 5, 6, 7, EOS]),
    (1, [1, 2, S, L, L, E, 4, 5, 6, 7, EOS]),
    (2, [1, 2, S, L, L, L, L, E, 6, 7, EOS]),
    (3, [1, 2, S, L, L, L, L, E, 7, EOS]),  # past max_latent_stage: every step gone, thoughts stay at 2*c
    (9, [1, 2, S, L, L, L, L, E, 7, EOS]),
])
def test_coconut_layout_per_stage(stage, ids):
    example = build_example(TOKENS, Curriculum(c=2, max_latent_stage=2), stage)
    assert example["input_ids"] == ids
    n_prompt = ids.index(E) + 1
    assert example["labels"] == [X] * n_prompt + ids[n_prompt:]


def test_fewer_steps_than_stage():
    short = {"question": [1], "steps": [[3]], "answer": [7, EOS]}
    padded = build_example(short, Curriculum(c=1, max_latent_stage=3), stage=3)
    assert padded["input_ids"] == [1, S, L, L, L, E, 7, EOS]  # the official code's pad_latent_to_max


@pytest.mark.parametrize("method, stage, ids", [
    ("cot", 5, [1, 2, 3, 4, 5, 6, 7, EOS]),
    ("no-cot", 0, [1, 2, 7, EOS]),
    ("no-thoughts", 2, [1, 2, 6, 7, EOS]),
    ("pause", 1, [1, 2, S, L, L, E, 4, 5, 6, 7, EOS]),
    ("no-curriculum", 0, [1, 2, S, L, L, L, L, E, 7, EOS]),
])
def test_variant_layouts(method, stage, ids):
    example = build_example(TOKENS, Curriculum(method=method, c=2, max_latent_stage=2), stage)
    assert example["input_ids"] == ids
    n_unsupervised = 2 + (ids.index(E) - 1 if E in ids else 0)
    assert example["labels"] == [X] * n_unsupervised + ids[n_unsupervised:]


def test_prompts_and_thought_override():
    cur = Curriculum(c=2, max_latent_stage=2)
    assert build_example(TOKENS, cur, 1, prompt_only=True)["input_ids"] == [1, 2, S, L, L, E]
    assert build_example(TOKENS, cur, 1, prompt_only=True, n_thoughts=5)["input_ids"] == [1, 2, S] + [L] * 5 + [E]
    assert build_example(TOKENS, Curriculum(method="cot"), 0, prompt_only=True)["input_ids"] == [1, 2]


def test_uniform_prob_mixes_stages():
    rng = random.Random(0)
    cur = Curriculum(c=1, max_latent_stage=3, uniform_prob=1.0)
    counts = {build_example(TOKENS, cur, 1, rng=rng)["input_ids"].count(L) for _ in range(200)}
    assert counts == {0, 1, 2, 3}  # stages 0..n_steps drawn at random
    assert stage_layout(cur, 3, 3) == (3, 3)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'coconutt'"):
        Curriculum(method="coconutt")


def test_collate_aligns_first_thought_and_restarts_positions():
    a = {"input_ids": [1, 2, 3, S, L, E, 9], "labels": [X, X, X, X, X, X, 9]}
    b = {"input_ids": [1, S, L, L, E, 8, 8, 8], "labels": [X, X, X, X, X, 8, 8, 8]}
    batch = collate([a, b])
    P = EOS
    assert batch["input_ids"].tolist() == [[1, 2, 3, S, L, E, 9, P, P, P],
                                           [P, P, 1, S, L, L, E, 8, 8, 8]]
    assert batch["labels"].tolist() == [[X, X, X, X, X, X, 9, X, X, X],
                                        [X, X, X, X, X, X, X, 8, 8, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                                                [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 0, 0],
                                              [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]]
    gen = collate([{"input_ids": [1, 2, S, L, E]}, {"input_ids": [5, S, L, E]}], for_generation=True)
    assert gen["input_ids"].tolist() == [[1, 2, S, L, E], [P, 5, S, L, E]]
    assert gen["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert "labels" not in gen
