"""
Tests of recurrent.py, the stop decisions of evaluate.py and the FLOPs they are measured in,
against references written here: the loop written plainly for one unpadded row at a time, KL
divergences computed by hand, a stop head trained on a hand-built case, and weights counted.

Run: python -m pytest -q tests/test_recurrent.py      (about half a minute on 2 CPU cores)
"""

import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from coconut import Coconut, Curriculum, build_example, collate, naive_think  # noqa: E402
from data import Vocab  # noqa: E402
from evaluate import Run, count_thoughts, forward_flops  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from recurrent import Recurrent, RecurrentConfig, RecurrentGPT  # noqa: E402


def tiny_recurrent(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(block_size=32, vocab_size=50, n_head=2, n_embd=16, n_prelude=1, n_core=2, n_coda=1,
                  mean_iterations=4, backprop_depth=2)
    return RecurrentGPT(RecurrentConfig(**{**config, **kwargs})).eval()


def plain_loop(gpt, ids, r):
    """One unpadded row, the loop written out: prelude, r times core(adapter(cat(s, e))) from s = 0,
    coda, ln_f; the blocks plainly causal."""
    x = gpt.transformer.wte(torch.tensor([ids])) + gpt.transformer.wpe(torch.arange(len(ids)))[None]
    layers = list(gpt.transformer.h)
    prelude, core, coda = layers[:1], layers[1:3], layers[3:]
    for block in prelude:
        x = block(x, None)[0]
    s = torch.zeros_like(x)
    for _ in range(r):
        s = gpt.adapter(torch.cat([s, x], dim=-1))
        for block in core:
            s = block(s, None)[0]
    for block in coda:
        s = block(s, None)[0]
    return gpt.transformer.ln_f(s)[0]


ROWS = [[3, 7, 9, 11, 2], [5, 1], [8, 8, 4, 30, 12, 40, 6]]
SPECIAL = Vocab().special._replace(eos=49)  # within the tiny vocabulary


def batch_of(rows):
    return collate([{"input_ids": r} for r in rows], for_generation=True, special=SPECIAL)


def threshold_between(kls, n):
    """A threshold that the rows' KL trajectories cross at different steps, none of them within 1%
    of it nor below 1e-12 (float64's rounding), and each row's first step below it (n: never)."""
    values = sorted({v for row in kls for v in row})
    for low, high in zip(values, values[1:]):
        threshold = (low + high) / 2
        stops = [next((i for i, kl in enumerate(row) if kl < threshold), n) for row in kls]
        if len(set(stops)) > 1 and high - low > 0.02 * high and low > 1e-12:
            return threshold, stops
    raise AssertionError(f"no threshold parts these rows: {kls}")


def test_the_batched_loop_equals_the_plain_loop_row_by_row():
    gpt = tiny_recurrent()
    batch = batch_of(ROWS)
    for r in (1, 3, 6):
        gpt.iterations = r
        with torch.no_grad():
            h = gpt.hidden(batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"])
            for i, ids in enumerate(ROWS):
                torch.testing.assert_close(h[i, -len(ids):], plain_loop(gpt, ids, r), atol=1e-5, rtol=1e-5)
        assert gpt.iterations_used.tolist() == [r] * len(ROWS)


def test_training_back_propagates_through_the_last_iterations_only(monkeypatch):
    gpt = tiny_recurrent().train()
    monkeypatch.setattr(gpt, "sample_iterations", lambda: (4, 2))  # r = 6, the last 2 with gradients
    graded = []
    gpt.transformer.h[1].register_forward_hook(lambda module, inputs, output: graded.append(output[0].requires_grad))
    batch = batch_of(ROWS)
    loss = gpt.hidden(batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=batch["attention_mask"]).square().mean()
    assert graded == [False] * 4 + [True] * 2
    loss.backward()
    assert gpt.adapter.weight.grad is not None and gpt.transformer.h[0].mlp.c_fc.weight.grad is not None


def test_the_iteration_sampler_is_huginns():
    """r = Poisson(tau) + 1, tau log-normal of mean mean_iterations: the mean of r is about
    mean_iterations + 1; at most backprop_depth of them carry gradients."""
    gpt = tiny_recurrent(mean_iterations=8, backprop_depth=3).train()
    torch.manual_seed(1)
    draws = [gpt.sample_iterations() for _ in range(4000)]
    r = torch.tensor([free + grad for free, grad in draws], dtype=torch.float)
    assert 8.6 < r.mean() < 9.4 and r.min() >= 1
    assert all(grad == min(free + grad, 3) for free, grad in draws)


def kl_trajectory(gpt, ids, n):
    """By hand: KL(p_{i-1} || p_i) of the next-token distribution after the last position, for
    i = 2..n iterations, each row alone."""
    with torch.no_grad():
        logps = [F.log_softmax(gpt.lm_head(plain_loop(gpt, ids, i)[-1]), -1) for i in range(1, n + 1)]
    return [float((a.exp() * (a - b)).sum()) for a, b in zip(logps, logps[1:])]


def test_the_kl_exit_stops_each_row_as_it_would_alone():
    """In float64, so that KL divergences down to 1e-12 are read exactly: the rows of a random
    model settle at rates of their own."""
    gpt = tiny_recurrent(seed=3).double()
    n = 12
    kls = [kl_trajectory(gpt, ids, n) for ids in ROWS]
    threshold, steps = threshold_between(kls, n - 2)
    expected = [step + 2 for step in steps]  # the first check compares iterations 1 and 2
    gpt.iterations, gpt.exit_threshold = n, threshold
    batch = batch_of(ROWS)
    with torch.no_grad():
        h = gpt.hidden(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
    assert gpt.iterations_used.tolist() == expected
    for i, ids in enumerate(ROWS):
        torch.testing.assert_close(h[i, -len(ids):], plain_loop(gpt, ids, expected[i]), atol=1e-5, rtol=1e-5)


def test_recurrent_generation_equals_greedy_decoding_by_hand():
    gpt = tiny_recurrent(seed=2)
    gpt.iterations = 3
    model = Recurrent(gpt, SPECIAL)
    answers = model.generate(**batch_of(ROWS), max_new_tokens=5)
    for ids, answer in zip(ROWS, answers):
        expected = list(ids)
        for _ in range(5):
            token = int(gpt.lm_head(plain_loop(gpt, expected, 3)[-1]).argmax())
            if token == 49:
                break
            expected.append(token)
        assert answer == expected[len(ids):]
    assert [r.tolist() for r in model.iterations_per_token[:1]] == [[3, 3, 3]]


def test_the_stop_head_stops_at_the_count_it_was_trained_on():
    """Questions that start with token 1 get one thought, with token 2 three: trained with the
    language loss plus its own, the head stops each at its count."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=50260, n_layer=1, n_head=2, n_embd=16, stop_head=True))
    model = Coconut(gpt)
    cur = Curriculum(c=1, max_latent_stage=3, pad_latent_to_max=False)
    tokens = [{"question": [q, 7, 8], "steps": [[20]] * n, "answer": [30, 50256]} for q, n in ((1, 1), (2, 3))]
    examples = [build_example(t, cur, 4) for t in tokens]
    assert [e["input_ids"].count(50259) for e in examples] == [1, 3]  # thoughts for its own steps only
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    for _ in range(150):
        model(**collate(examples)).backward()
        optimizer.step()
        optimizer.zero_grad()
    run = Run(model.eval(), Vocab(), cur, stage=4)
    assert count_thoughts(run, tokens, "head", None, batch_size=2) == [1, 3]


def test_the_kl_rule_stops_where_a_step_adds_nothing():
    """A thought that predicts what the thought c before it predicted ends the thinking, counted
    by hand from the thoughts of naive_think."""
    torch.manual_seed(4)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=50260, n_layer=1, n_head=2, n_embd=16)).eval().double()
    cur = Curriculum(c=1, max_latent_stage=6)
    tokens = [{"question": q, "steps": [], "answer": [30]} for q in ([3, 4, 5], [9, 2], [7, 7, 7, 1])]
    run = Run(Coconut(gpt), Vocab(), cur, stage=7)
    with torch.no_grad():
        lens = []
        for t in tokens:  # each thought's distribution through the output layer: thought j = h(slot j - 1)
            ids = build_example(t, cur, 7, prompt_only=True)["input_ids"][:-1]
            embeds = naive_think(gpt, ids)
            thoughts = [gpt.hidden(embeds=embeds[:, :j])[0, -1] for j in range(len(t["question"]) + 1, len(ids) + 1)]
            lens.append([F.log_softmax(gpt.lm_head(h), -1) for h in thoughts])
    kls = [[float((a.exp() * (a - b)).sum()) for a, b in zip(row, row[1:])] for row in lens]
    threshold, steps = threshold_between(kls, 5)
    expected = [step + 1 for step in steps]  # KL(thought j || thought j + 1) small: j thoughts
    assert count_thoughts(run, tokens, "kl", threshold, batch_size=3) == expected


def test_forward_flops_count_each_weight_twice_per_position():
    """A 1-layer GPT 16 wide: 3*16*16 + 16*16 + 4*16*16 + 4*16*16 = 3072 weights in its matrices;
    the output layer 50 x 16. The recurrent model adds its core and adapter once per iteration."""
    gpt = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    assert forward_flops(gpt, 10, 3) == 2 * 3072 * 10 + 2 * 800 * 3
    rec = tiny_recurrent()  # prelude 1, core 2, coda 1 blocks of 3072; adapter 32 x 16
    assert forward_flops(rec, 10, 3, iterations=5) == 2 * (2 * 3072 + 5 * (2 * 3072 + 512)) * 10 + 2 * 800 * 3
