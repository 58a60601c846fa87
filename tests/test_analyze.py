"""
Tests of analyze.py: the path classifier and the heights on hand-built graphs, the node values
against a naive recomputation (a full forward per token, no cache), and the command end to end.

Run: python -m pytest -q tests/test_analyze.py      (under a minute on 2 CPU cores)
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from analyze import CATEGORIES, classify, heights, node_values, reached_in  # noqa: E402
from checkpoint import Run  # noqa: E402
from coconut import Coconut, Curriculum, build_example  # noqa: E402
from conftest import small_prosqa  # noqa: E402
from data import Vocab, children_of, encode, save_records, tokenize_record  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from reference import naive_thoughts  # noqa: E402

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


def test_node_values_equal_a_naive_recomputation():
    """The value of a node after k thoughts: the product, over its name's tokens, of each token's
    probability after "Every" and the tokens before it; recomputed here one token at a time,
    the whole sequence through the GPT with its thoughts filled in the paper's way, no cache."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=160, vocab_size=50260, n_layer=2, n_head=2, n_embd=32)).eval()
    record = dict(RECORD, idx_to_symbol=["Tom", "lempus", "grimpus", "zhorpus", "sterpus", "yumpus", "gorpus",
                                         "wumpus", "Ann"],
                  question="Tom is a lempus. Every lempus is a zhorpus. Is Tom a sterpus or yumpus?",
                  steps=["Tom is a grimpus.", "Every grimpus is a sterpus."], answer="Tom is a sterpus.")
    tokens = tokenize_record(record)
    curriculum = Curriculum(c=1, max_latent_stage=2)
    run = Run(Coconut(gpt), Vocab(), curriculum, stage=3)
    for k in (1, 2):
        values = node_values(run, [(tokens, record)], k, batch_size=3)[0]
        prompt = build_example(tokens, curriculum, 3, prompt_only=True, n_thoughts=k)["input_ids"] + encode("Every")
        assert set(values) == {v for _, v in record["edges"]}
        for node, value in values.items():
            ids, expected = prompt, 1.0
            for token in encode(" " + record["idx_to_symbol"][node]):
                with torch.no_grad():
                    logits = gpt(embeds=naive_thoughts(gpt, ids))[0][0, -1]
                expected *= torch.softmax(logits, -1)[token].item()
                ids = ids + [token]
            assert value == pytest.approx(expected, rel=1e-4, abs=1e-12), (k, node)


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


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
    r = run_script("sample.py", "--num", "2", cwd=runs["root"])
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
    for args, expected in [
        ([runs["coconut"], "--file", prontoqa], "prontoqa.json: record 0: no 'idx_to_symbol'"),
        ([runs["coconut"], "--file", str(tmp_path / "no-edges.json")], "no-edges.json: record 0: 'edges'"),
        ([runs["cot"]], "a cot model has no continuous thoughts"),
        ([runs["coconut"], "--n-thoughts", "0,200"], "--n-thoughts 200"),
        ([runs["coconut"], "--n-thoughts", "1,x"], "--n-thoughts: expected numbers separated by commas"),
        ([runs["coconut"], "--device", "foo"], "--device foo"),
        ([runs["coconut"], "--example", "99"], "--example 99"),
        ([str(tmp_path / "nope")], "nope"),
    ]:
        r = run_script("analyze.py", *args, "--out", str(tmp_path / "out"))
        assert r.returncode == 1 and expected in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert not os.path.exists(tmp_path / "out")
