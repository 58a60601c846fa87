"""
Tests of the presets, chains of train.py runs (config.PRESETS): the CPU demo's chain run at a
test's size through the same code path (config.get_chain, train.main), its resume after kill -9
in each link, and the commands a newcomer runs after it with no flag (sample.py, analyze.py).

Run: python -m pytest -q tests/test_preset.py      (about a minute on 2 CPU cores)
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
from data import make_splits  # noqa: E402
from test_train import kill_after_first_epoch, read_log, run, script, snapshot, untimed  # noqa: E402


def small_chain():
    """config.PRESETS["cpu"] at a test's size: its links and flags, with tiny models and data. The
    pretraining's data seed is the task's, so that its vocabulary holds every token of the task's
    few questions (the preset's 26,000 other questions hold them all)."""
    lookup, methods = config.PRESETS["cpu"]
    tiny = dict(batch_size=8, micro_batch_size=4, eval_batch_size=8, max_new_tokens=24)
    return [dict(lookup, **tiny, n_layer=1, n_head=2, n_embd=16, n_train=40, n_valid=4, n_test=4, epochs=3,
                 data_seed=methods["data_seed"]),
            dict(methods, **tiny, n_train=24, n_valid=8, n_test=8, max_latent_stage=1, epochs_per_stage=1, epochs=3)]


def run_chain(cwd, *args):
    """python train.py --preset cpu ARGS in cwd, with the small chain in place of the preset's."""
    code = (f"import sys, json; sys.path.insert(0, {ROOT!r}); import config\n"
            f"config.PRESETS['cpu'] = json.loads({json.dumps(small_chain())!r})\n"
            f"import train; train.main(sys.argv[1:])")
    return ["-c", code, "--preset", "cpu", *args]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The small chain, finished, in a folder of its own (data/ and out/ in it, as for a user)."""
    cwd = tmp_path_factory.mktemp("preset")
    r = run(*run_chain(cwd), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(cwd=cwd, out=cwd / "out" / "cpu", stdout=r.stdout)


def test_the_chain_pretrains_then_trains_the_methods_from_the_model_it_claims(chain):
    out = chain["out"]
    lookup = read_log(out / "lookup" / "no-cot")
    history, final = lookup[:-1], lookup[-1]
    # best.pt of the pretraining is the epoch of the lowest validation loss (its accuracy is no guide)
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert final["best_epoch"] == best_epoch
    with open(out / "lookup" / "no-cot" / "args.json") as f:
        assert json.load(f)["format"] == "lookup"
    for method in ("coconut", "cot", "no-cot"):
        with open(out / method / "args.json") as f:
            flags = json.load(f)
        assert flags["init"] == str(out / "lookup" / "no-cot") or flags["init"] == os.path.join("out", "cpu", "lookup",
                                                                                                 "no-cot")
        assert flags["format"] == "compact" and flags["c"] == 2
        assert read_log(out / method)[-1]["test"]
    with open(chain["cwd"] / "data" / "cpu-lookup" / "generator.json") as f:
        assert json.load(f)["format"] == "lookup"
    table = [line for line in chain["stdout"].splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| coconut", "| cot", "| no-cot"]


def test_a_newcomer_samples_and_analyses_the_preset_with_no_flag(chain):
    r = run(script("sample.py"), "--num", "1", cwd=chain["cwd"])
    assert r.returncode == 0, r.stderr[-3000:]
    for method in ("coconut", "cot", "no-cot"):
        assert f"  {method} (out/cpu/{method}" in r.stdout
    assert "thought 1: nodes " in r.stdout  # a ProsQA graph's nodes, read after the first thought
    r = run(script("analyze.py"), os.path.join("out", "cpu", "coconut"), cwd=chain["cwd"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| cot |" in r.stdout and "| no-cot |" in r.stdout  # the references beside it, found
    assert os.path.exists(chain["out"] / "coconut" / "analysis-cpu-test" / "summary.json")


def test_the_preset_refuses_a_data_folder_made_with_other_settings(tmp_path):
    """The preset's settings count as asked for: a data/cpu generated otherwise is refused before
    anything is trained."""
    make_splits("prosqa", str(tmp_path / "data" / "cpu"), sizes=dict(train=24, valid=8, test=8), max_nodes=6,
                min_steps=1, max_steps=2)
    r = run(*run_chain(tmp_path), cwd=tmp_path)
    assert r.returncode == 1 and "generated with other settings" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="kill -9 of a subprocess, Linux")
def test_a_chain_killed_in_the_pretraining_and_in_a_method_ends_as_an_unbroken_one(chain):
    cwd, out = chain["cwd"], chain["cwd"] / "out" / "killed"
    kill_after_first_epoch(run_chain(cwd, "--out-dir", str(out)), out / "lookup" / "no-cot", cwd=cwd)
    assert len(read_log(out / "lookup" / "no-cot")) < 4  # killed before its test line
    kill_after_first_epoch(run_chain(cwd, "--out-dir", str(out), "--resume"), out / "coconut", cwd=cwd)
    assert len(read_log(out / "coconut")) < 4
    r = run(*run_chain(cwd, "--out-dir", str(out), "--resume"), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    for folder in ("lookup/no-cot", "coconut", "cot", "no-cot"):
        assert untimed(read_log(out / folder)) == untimed(read_log(chain["out"] / folder)), folder
    before = snapshot(out)
    r = run(*run_chain(cwd, "--out-dir", str(out)), cwd=cwd)  # without --resume: refused, nothing touched
    assert r.returncode == 1 and "already holds a run" in r.stderr and snapshot(out) == before
