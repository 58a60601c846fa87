"""
Tests of the research scripts in scripts/: the sweep (a tiny grid trained, reported, not trained
again, and a stopped run continued) and the recall toy (its sequences checked against the facts
they state).

Run: python -m pytest -q tests/test_scripts.py      (about half a minute on 2 CPU cores)
"""

import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import small_prosqa  # noqa: E402
from recall_probe import sequence  # noqa: E402
from test_train import SINGLE_STAGE, load, read_log, run, snapshot, untimed, without  # noqa: E402


def test_recall_sequences_state_a_chain_of_facts_and_ask_for_them():
    names, facts, queries = 9, 5, 3
    for seed in range(20):
        tokens = sequence(random.Random(seed), names, facts, queries)
        assert len(tokens) == 3 * facts + 3 * queries
        stated = [tokens[i:i + 3] for i in range(0, 3 * facts, 3)]
        assert all(dot == names for _, _, dot in stated)
        successor = {u: v for u, v, _ in stated}
        # a chain: every name at most once on each side, one start and one end
        assert len(successor) == facts and len(set(successor.values())) == facts
        assert len(set(successor) - set(successor.values())) == 1
        asked = [tokens[i:i + 3] for i in range(3 * facts, len(tokens), 3)]
        assert all(q == names + 1 and successor[u] == v for q, u, v in asked)
        assert len({u for _, u, _ in asked}) == queries


def test_recall_probe_refuses_impossible_settings_in_one_line():
    for flags, culprit in ((["--facts", "40", "--names", "40"], "--names 40"), (["--queries", "13"], "--queries"),
                           (["--n-head", "3"], "--n-embd"), (["--steps", "0"], "--steps")):
        r = run("scripts/recall_probe.py", *flags)
        assert r.returncode == 1 and culprit in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_recall_probe_reports_accuracy(tmp_path):
    r = run("scripts/recall_probe.py", "--facts", "2", "--names", "4", "--steps", "4", "--every", "2")
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == ["step 2", "step 4"]


def test_sweep_trains_each_seed_once_and_reports_the_logs(tmp_path_factory):
    _, data_dir, _ = small_prosqa(tmp_path_factory, "sweep", 1, dict(train=16, valid=4, test=4), max_nodes=6,
                                  min_steps=1, max_steps=2)
    here = tmp_path_factory.mktemp("sweep-cwd")  # a relative --out is the caller's, not the repository's
    out = str(here / "sweeps")
    flags = " ".join(without(SINGLE_STAGE, "--epochs") + ["--epochs", "1", "--data-dir", data_dir])
    args = (os.path.join(ROOT, "scripts", "sweep.py"), "--out", "sweeps", "--seeds", "3,4",
            "--setting", f"tiny run: {flags} --method=no-cot")
    r = run(*args, cwd=here)
    assert r.returncode == 0, r.stderr
    for seed in (3, 4):
        final = read_log(os.path.join(out, "tiny_run", f"s{seed}", "no-cot"))[-1]
        assert final["test"] and f"tiny run / no-cot / seed {seed}: test {100 * final['test_acc']:.1f}%" in r.stdout
    row = [line for line in r.stdout.splitlines() if line.startswith("| tiny run | no-cot | 2 |")]
    assert len(row) == 1
    before = snapshot(out)
    again = run(*args, cwd=here)  # finished runs are read, not trained again
    assert again.returncode == 0 and snapshot(out) == before and row[0] in again.stdout

    before = snapshot(out)
    for setting, expected in (("broken: --n-train -3", "setting 'broken': argument --n-train: must be at least 1"),
                              ("seeded: --seed=3", "--setting 'seeded': --seed is the sweep's to set"),
                              ("twice: --method cot --method no-cot", "--method once"),
                              ("tiny_run: --epochs 1", "two labels name one folder"),
                              ("tiny run: --epochs 1", "two labels name one folder")):
        bad = run("scripts/sweep.py", "--out", out, "--setting", f"tiny run: {flags}", "--setting", setting)
        assert bad.returncode == 1 and expected in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert snapshot(out) == before  # refused before anything ran

    # a sweep stopped in a run (its ckpt.pt there, the test not yet scored) continues it: --resume
    stopped = os.path.join(out, "tiny_run", "s3", "no-cot")
    finished = read_log(stopped)[-1]
    ckpt = load(os.path.join(stopped, "ckpt.pt"))
    torch.save({k: v for k, v in ckpt.items() if k != "test"}, os.path.join(stopped, "ckpt.pt"))
    with open(os.path.join(stopped, "log.jsonl")) as f:
        lines = f.readlines()
    with open(os.path.join(stopped, "log.jsonl"), "w") as f:
        f.writelines(lines[:-1])
    again = run(*args, cwd=here)
    assert again.returncode == 0, again.stderr
    assert untimed([read_log(stopped)[-1]]) == untimed([finished]) and row[0] in again.stdout
