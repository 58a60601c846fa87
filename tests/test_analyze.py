"""
Tests of analyze.py: the path classifier and the heights on hand-built graphs, the node values
against a naive recomputation (a full forward per token, no cache), and the command end to end.

Run: python -m pytest -q tests/test_analyze.py      (under a minute on 2 CPU cores)
"""

import argparse
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import analyze  # noqa: E402
from analyze import (ABLATIONS, CATEGORIES, ablations, classify, frontier_hits, heights, mean_top,  # noqa: E402
                     node_values, reached_in, value_tables)
from evaluate import Run  # noqa: E402
from coconut import Coconut, Curriculum, build_example  # noqa: E402
from conftest import run_all, run_script, small_prosqa  # noqa: E402
from data import LATENT, Vocab, children_of, encode, save_records, tokenize_record  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from coconut import naive_think  # noqa: E402

# Tom -> a, b, g; a -> c, f; b -> c, d; g -> d; c -> d; Ann -> e.  Target d (shortest: Tom-b-d and
# Tom-g-d, 2 edges), other option e (reached from Ann only), f a dead end.
NAMES = ["Tom", "a", "b", "c", "d", "e", "f", "g", "Ann"]
N = {name: i for i, name in enumerate(NAMES)}
EDGES = [("Tom", "a"), ("Tom", "b"), ("Tom", "g"), ("a", "c"), ("a", "f"), ("b", "c"), ("b", "d"), ("g", "d"),
         ("c", "d"), ("Ann", "e")]
RECORD = dict(question="...", steps=["Tom is a b.", "Every b is a d."], answer="Tom is a d.", idx_to_symbol=NAMES,
              edges=[[N[u], N[v]] for u, v in EDGES], root=N["Tom"], target=N["d"], neg_target=N["e"])


@pytest.mark.parametrize("k, output, category", [
    (0, "Tom is a b.\nEvery b is a d.\n### Tom is a d.", "Correct Path"),
    (0, "Tom is a g.\nEvery g is a d.\n### Tom is a d.", "Correct Path"),  # the other shortest path
    (0, "Tom is a a.\nEvery a is a c.\nEvery c is a d.\n### Tom is a d.", "Longer Path"),
    (0, "Tom is a c.\nEvery c is a d.\n### Tom is a d.", "Hallucination"),  # no edge Tom -> c
    (0, "Tom is a a.\nEvery b is a d.\n### Tom is a d.", "Hallucination"),  # disconnected
    (0, "Tom is a zorpus.\n### Tom is a d.", "Hallucination"),  # no such node
    (0, "Tom is a a.\nEvery a is a f.\n### Tom is a f.", "Wrong Target"),
    (0, "Ann is a e.\n### Tom is a e.", "Hallucination"),  # a real edge, to the other option, not from Tom
    (0, "Tom is a b.\nEvery b is a d.", "Correct Path"),  # the path decides, not the answer line
    (0, "### Tom is a d.", "Correct Label"),
    (0, "### Tom is a e.", "Incorrect Label"),
    (0, "", "Incorrect Label"),
    (1, "Every b is a d.\n### Tom is a d.", "Correct Path"),  # 1 hidden step (Tom -> b) + 1 written
    (1, "Every a is a c.\nEvery c is a d.\n### Tom is a d.", "Longer Path"),
    (1, "Every c is a d.\n### Tom is a d.", "Hallucination"),  # c is not 1 step from Tom
    (1, "Every a is a f.\n### Tom is a f.", "Wrong Target"),
    (2, "Every c is a d.\n### Tom is a d.", "Longer Path"),  # c is 2 steps from Tom (via a or b)
    (2, "### Tom is a d.", "Correct Label"),
])
def test_classify_hand_built_outputs(k, output, category):
    assert classify(RECORD, output, k) == category


# RECORD in the compact format of scripts/compact_prosqa.py: facts "X Y .", steps " X Y .", the answer "Tom d"
COMPACT = dict(RECORD, steps=[" Tom b .", " b d ."], answer="Tom d")


@pytest.mark.parametrize("k, output, category", [
    (0, " Tom b .\n b d .\n### Tom d", "Correct Path"),
    (0, "Tom b .\nb d .\n### Tom d", "Correct Path"),  # without the steps' leading spaces
    (0, "Tom a .\na c .\nc d .\n### Tom d", "Longer Path"),
    (0, "Tom c .\nc d .\n### Tom d", "Hallucination"),  # no edge Tom -> c
    (0, "Tom zorpus .\n### Tom d", "Hallucination"),  # no such node
    (0, "Tom is a b.\nEvery b is a d.\n### Tom d", "Correct Path"),  # sentences still parse
    (0, "Tom b\n### Tom d", "Hallucination"),  # not a fact: no final " ."
    (0, "Tom a .\na f .\n### Tom f", "Wrong Target"),
    (1, "b d .\n### Tom d", "Correct Path"),
    (1, "c d .\n### Tom d", "Hallucination"),  # c is not 1 step from Tom
    (2, "### Tom d", "Correct Label"),
    (2, "### Tom e", "Incorrect Label"),
])
def test_classify_compact_outputs(k, output, category):
    assert classify(COMPACT, output, k) == category


def test_layers_and_heights_of_a_hand_built_dag():
    children = children_of(RECORD)
    assert reached_in(children, N["Tom"], 1) == {N["a"], N["b"], N["g"]}
    assert reached_in(children, N["Tom"], 2) == {N["c"], N["d"], N["f"]}
    assert reached_in(children, N["Tom"], 3) == {N["d"]}
    short, long = heights(children)
    # leaves d, e, f; c -> d; a -> c -> d and a -> f; Tom -> a -> c -> d
    expected = {"d": (0, 0), "e": (0, 0), "f": (0, 0), "c": (1, 1), "b": (1, 2), "g": (1, 1), "a": (1, 2),
                "Tom": (2, 3), "Ann": (1, 1)}
    assert {name: (short[N[name]], long[N[name]]) for name in NAMES} == expected


SYMBOLS = ["Tom", "lempus", "grimpus", "zhorpus", "sterpus", "yumpus", "gorpus", "wumpus", "Ann"]
SENTENCES = dict(RECORD, idx_to_symbol=SYMBOLS,
                 question="Tom is a lempus. Every lempus is a zhorpus. Is Tom a sterpus or yumpus?",
                 steps=["Tom is a grimpus.", "Every grimpus is a sterpus."], answer="Tom is a sterpus.")
COMPACT_SYMBOLS = dict(RECORD, idx_to_symbol=SYMBOLS, question="Tom lempus . lempus zhorpus . ? Tom sterpus yumpus",
                       steps=[" Tom grimpus .", " grimpus sterpus ."], answer="Tom sterpus")


# a step is forced to start with "Every", and a name follows it with a space; in the compact format
# nothing is forced, and the step's own leading space comes before the name
@pytest.mark.parametrize("record, forced", [(SENTENCES, "Every"), (COMPACT_SYMBOLS, "")])
def test_node_values_equal_a_naive_recomputation(record, forced):
    """The value of a node after k thoughts: the product, over its name's tokens, of each token's
    probability after the forced start of a step and the tokens before it; recomputed here one
    token at a time, the whole sequence through the GPT with its thoughts filled in the paper's
    way, no cache."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=160, vocab_size=50260, n_layer=2, n_head=2, n_embd=32)).eval()
    tokens = tokenize_record(record)
    curriculum = Curriculum(c=1, max_latent_stage=2)
    run = Run(Coconut(gpt), Vocab(), curriculum, stage=3)
    for k in (1, 2):  # the run was trained at 2 thoughts: after thought 1 only one of them runs
        values = node_values(run, [(tokens, record)], k, batch_size=3)[0]
        prompt = build_example(tokens, curriculum, 3, prompt_only=True, n_thoughts=k)["input_ids"] + encode(forced)
        assert set(values) == {v for _, v in record["edges"]}
        for node, value in values.items():
            ids, expected = prompt, 0.0
            for token in encode(" " + record["idx_to_symbol"][node]):
                with torch.no_grad():
                    logits = gpt(embeds=naive_think(gpt, ids))[0][0, -1]
                expected += torch.log_softmax(logits, -1)[token].item()
                ids = ids + [token]
            # values are products of small probabilities (about 1e-14 here): compared as logarithms
            assert math.log(value) == pytest.approx(expected, abs=1e-4), (k, node)


# RECORD with a third step: Tom -> a -> c -> h, the target h, so that thought 2 is analysed on it
RECORD3 = dict(RECORD, idx_to_symbol=NAMES + ["h"], edges=RECORD["edges"] + [[N["c"], 9]], target=9,
               steps=["Tom is a a.", "Every a is a c.", "Every c is a h."], answer="Tom is a h.")


def test_frontier_and_parallelism_on_hand_built_values(monkeypatch):
    """Node values given by hand (a stub for node_values): the frontier after thought k is the BFS
    layer k, read only on questions more than k steps from their answer; the parallelism sums the
    largest values first; the frontier test counts a question when its top-valued node is there."""
    given = {1: {N["a"]: 0.5, N["b"]: 0.2, N["g"]: 0.1, N["c"]: 0.05, N["d"]: 0.3, N["f"]: 0.01, 9: 0.02},
             2: {N["a"]: 0.1, N["b"]: 0.1, N["g"]: 0.1, N["c"]: 0.3, N["d"]: 0.2, N["f"]: 0.05, 9: 0.6}}
    seen = []

    def stub(run, questions, k, batch_size=256):
        seen.append((k, [r["target"] for _, r in questions]))
        return [{n: v for n, v in given[k].items() if n < len(r["idx_to_symbol"])} for _, r in questions]
    monkeypatch.setattr(analyze, "node_values", stub)
    run = Run(None, Vocab(), Curriculum(c=1, max_latent_stage=3), stage=4)
    questions = dict(records=[RECORD, RECORD3], tokens=[None, None])
    rows, tops, hits = value_tables(run, questions, argparse.Namespace(batch_size=8))
    # RECORD's answer is 2 steps away: read after thought 1 only; RECORD3's (3 steps) after both
    assert seen == [(1, [N["d"], 9]), (2, [9])]
    layer = lambda q, k: {r["node"] for r in rows if r["index"] == q and r["thought"] == k}  # noqa: E731
    assert layer(0, 1) == layer(1, 1) == {"a", "b", "g"} and layer(1, 2) == {"c", "d", "f"} and not layer(0, 2)
    assert {r["node"]: r["correct"] for r in rows if r["index"] == 1 and r["thought"] == 2} == \
        {"c": True, "d": False, "f": False}  # only c leads on to h
    assert tops[1][0] == [0.5, 0.2, 0.1] and tops[2][1] == [0.3, 0.2, 0.05]
    assert mean_top(tops[2].values(), 1) == 0.3 and mean_top(tops[2].values(), 2) == pytest.approx(0.5)
    # after thought 1 the top node (a, 0.5) is in the frontier {a, b, g} of 6 and 7 valued nodes;
    # after thought 2 the top node of RECORD3 is h (0.6), not in its frontier {c, d, f} of 7
    assert hits[1] == (2, 2, pytest.approx(3 / 6 + 3 / 7)) and hits[2] == (1, 0, pytest.approx(3 / 7))
    assert frontier_hits([RECORD3], {0: given[2]}, 2) == (1, 0, pytest.approx(3 / 7))


def test_ablations_change_the_thoughts_exactly_as_described(monkeypatch):
    """What the model is given under each ablation, read where the thoughts are written in: (a)
    its own thoughts, (b) no slots at all, (c) the next question's own thoughts (the last question
    the first's), (d) vectors of its own thoughts' norms that are not its thoughts; every prompt
    ends with "###". The own thoughts are recomputed the naive way."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=96, vocab_size=50260, n_layer=1, n_head=2, n_embd=16)).eval()
    curriculum = Curriculum(c=1, max_latent_stage=2)
    run = Run(Coconut(gpt), Vocab(), curriculum, stage=3)  # trained at 2 thoughts
    records = [dict(RECORD, question=q, answer="Tom is a d.") for q in
               ("Tom is a b. Is Tom a d or e?", "Every b is a d. Is Tom a e or d?", "Ann is a e. Tom is a g.")]
    tokens = [tokenize_record(r) for r in records]

    def own(t):
        ids = build_example(t, curriculum, 3, prompt_only=True)["input_ids"] + encode("###")
        with torch.no_grad():
            filled = naive_think(gpt, ids)[0]
        return filled[[j for j, x in enumerate(ids) if x == LATENT]]
    own = [own(t) for t in tokens]
    calls, think = [], run.model.think

    def spy(input_ids, attention_mask, position_ids, cache=None, intervene=None):
        written = []
        record = lambda j, t: written.append(intervene(j, t)) or written[-1]  # noqa: E731
        calls.append((input_ids, written))
        return think(input_ids, attention_mask, position_ids, cache, record if intervene else None)
    monkeypatch.setattr(run.model, "think", spy)
    accuracy = ablations(run, dict(records=records, tokens=tokens), batch_size=2, k=2)
    assert list(accuracy) == list(ABLATIONS)
    # two batches (questions 0, 1 and 2) for the own thoughts, then for each of (a), (b), (c), (d)
    assert [int((ids == LATENT).sum(dim=1).max()) for ids, _ in calls] == [2, 2, 2, 2, 0, 0, 2, 2, 2, 2]
    assert all((ids[:, -1] == encode("###")[0]).all() for ids, _ in calls)
    assert all(not written for _, written in calls[:6])  # the model's own thoughts, or none
    for (_, written), rows in ((calls[6], [0, 1]), (calls[7], [2])):
        for j in range(2):
            expected = torch.stack([own[(i + 1) % 3][j] for i in rows])
            torch.testing.assert_close(written[j], expected, atol=1e-5, rtol=1e-5)
    for (_, written), rows in ((calls[8], [0, 1]), (calls[9], [2])):
        for j in range(2):
            expected = torch.stack([own[i][j] for i in rows])
            torch.testing.assert_close(written[j].norm(dim=-1), expected.norm(dim=-1), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(written[j], expected, atol=1e-2)


TINY = ["--init", "scratch", "--vocab", "data", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--block-size", "160", "--batch-size", "8", "--micro-batch-size", "8", "--learning-rate", "3e-3",
        "--max-new-tokens", "24", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Coconut with stage mixing and a tiny CoT, on small ProsQA graphs."""
    root, data_dir, out = small_prosqa(tmp_path_factory, "analyze", 2, dict(train=32, valid=8, test=12),
                                       max_nodes=7, min_steps=2, max_steps=3)
    r = run_script("train.py", *TINY, "--data-dir", data_dir, "--out-dir", out, "--method", "coconut",
                   "--c", "1", "--max-latent-stage", "2", "--epochs-per-stage", "1", "--epochs", "3",
                   "--uniform-prob", "0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("train.py", *TINY, "--data-dir", data_dir, "--out-dir", out, "--method", "cot", "--epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(root=root, data=data_dir, coconut=os.path.join(out, "coconut"), cot=os.path.join(out, "cot"))


def test_analyze_writes_tables_figures_and_data(runs):
    r = run_script("analyze.py", runs["coconut"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = os.path.join(runs["coconut"], "analysis-data-test")  # beside the run, named after the file analysed
    for name in ("ksweep.png", "values.png", "parallelism.png", "ksweep.jsonl", "values.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "ksweep.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {(row["index"], row["k"]) for row in rows if row["run"] != "cot"} == {(i, k) for i in range(12) for k in (0, 1, 2)}
    assert {row["category"] for row in rows} <= set(CATEGORIES)
    assert len([row for row in rows if row["run"] == "cot"]) == 12  # the CoT run beside it, as a reference
    with open(os.path.join(runs["data"], "test.json")) as f:
        records = json.load(f)
    for row in rows:  # the category of every output, judged again here
        assert row["category"] == classify(records[row["index"]], row["output"], row["k"] or 0)
    table = [line for line in r.stdout.splitlines() if line.startswith("| k=") or line.startswith("| cot")]
    assert [line.split(" |")[0] for line in table] == ["| k=0", "| k=1", "| k=2", "| cot"]
    assert "## A worked example" in r.stdout


def test_sample_shows_the_newest_runs_side_by_side_with_node_values(runs):
    """With no arguments, sample.py answers with every run of the newest output folder under out/
    (after the CPU preset: Coconut, CoT, No-CoT), Coconut's thoughts read as values of graph nodes."""
    r = run_script(os.path.join(ROOT, "sample.py"), "--num", "2", cwd=runs["root"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Q: ") == 2 and r.stdout.count("  coconut (") == 2 and r.stdout.count("  cot (") == 2
    assert r.stdout.index("  coconut (") < r.stdout.index("  cot (")
    assert r.stdout.count("thought 1: nodes ") == 2 and "| tokens " in r.stdout


def test_analyze_refuses_bad_input(runs, tmp_path):
    prontoqa = str(tmp_path / "prontoqa.json")
    save_records([dict(question="Every wumpus is a tumpus. Fae is a wumpus. True or false: Fae is a tumpus.",
                       steps=["Fae is a wumpus. Every wumpus is a tumpus.", "Fae is a tumpus."], answer="True")], prontoqa)
    with open(os.path.join(runs["data"], "test.json")) as f:
        no_edges = [{k: v for k, v in r.items() if k != "edges"} for r in json.load(f)]
    save_records(no_edges, str(tmp_path / "no-edges.json"))
    cases = [
        ([runs["coconut"], "--file", prontoqa], "prontoqa.json: record 0: no 'idx_to_symbol'"),
        ([runs["coconut"], "--file", str(tmp_path / "no-edges.json")], "no-edges.json: record 0: 'edges'"),
        ([runs["cot"]], "a cot model has no continuous thoughts"),
        ([runs["coconut"], "--n-thoughts", "0,200"], "--n-thoughts 200"),
        ([runs["coconut"], "--n-thoughts", "1,x"], "--n-thoughts: expected numbers separated by commas"),
        ([runs["coconut"], "--device", "foo"], "--device foo"),
        ([runs["coconut"], "--example", "99"], "--example 99"),
        ([str(tmp_path / "nope")], "nope"),
    ]
    cases = [(["analyze.py", *args, "--out", tmp_path / "out"], expected) for args, expected in cases] + [
        (["analyze.py", runs["coconut"], *args], expected) for args, expected in [
            (["--out", prontoqa], "--out " + prontoqa + ": a file, not a folder"),
            (["--out", os.path.join(prontoqa, "sub")], "is not a folder that can be written in"),
            (["--references", f"{runs['cot']},{runs['cot']}"], runs["cot"] + " twice")]]
    for (args, expected), r in zip(cases, run_all([args for args, _ in cases])):
        assert r.returncode == 1 and expected in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert not os.path.exists(tmp_path / "out")
