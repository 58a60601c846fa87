"""
Tests of train.py and sample.py, run as a user runs them: as subprocesses, on tiny models and data.

Run: python -m pytest -q tests/test_train.py      (about a minute on 2 CPU cores, no network)

The reference for --resume is an uninterrupted run with the same seed; the reference for the bad
inputs is the promise of the README: one line naming the culprit, a non-zero exit, nothing lost.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import make_splits  # noqa: E402

# a 1-layer model on 6-node graphs, three epochs: stage 0 (CoT), 1 (one thought), 2 (all steps gone).
# dropout > 0 so that a resume must restore the RNG state to match.
TINY = ["--init", "scratch", "--vocab", "data", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--block-size", "160", "--dropout", "0.1", "--batch-size", "8", "--micro-batch-size", "4",
        "--learning-rate", "3e-3", "--c", "1", "--max-latent-stage", "1", "--epochs-per-stage", "1",
        "--epochs", "3", "--max-new-tokens", "8", "--eval-batch-size", "8"]


def run(*args, env=None):
    """Run a script of the repository; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def snapshot(folder):
    """Every file under folder with its bytes: to check that nothing was overwritten."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ProsQA data set and one finished three-epoch Coconut run on it."""
    root = tmp_path_factory.mktemp("train")
    data_dir = str(root / "data")
    make_splits("prosqa", data_dir, seed=1, sizes=dict(train=24, valid=8, test=8), max_nodes=6, min_steps=1,
                max_steps=2)
    out = str(root / "out")
    r = run("train.py", *TINY, "--data-dir", data_dir, "--out-dir", out, "--method", "coconut")
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(root=root, data=data_dir, out=out, run=os.path.join(out, "coconut"), stdout=r.stdout)


def test_end_to_end_writes_checkpoints_and_log(tiny):
    log = read_log(tiny["run"])
    epochs, final = log[:-1], log[-1]
    assert [m["epoch"] for m in epochs] == [1, 2, 3]
    assert [m["stage"] for m in epochs] == [0, 1, 2]  # --stage all walks the curriculum
    for m in epochs:
        assert 0 <= m["val_acc"] <= 1 and m["train_loss"] > 0 and m["val_loss"] > 0
    assert final["test"] and 0 <= final["test_acc"] <= 1
    # at the last stage each prompt carries max_latent_stage * c = 1 thought, counted as a token
    assert final["test_tokens"] >= 1
    ckpt = torch.load(os.path.join(tiny["run"], "ckpt.pt"), weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["stage"] == 2 and "optimizer" in ckpt and "rng" in ckpt
    assert ckpt["model_args"]["n_layer"] == 1 and ckpt["vocab"] is not None
    best = torch.load(os.path.join(tiny["run"], "best.pt"), weights_only=True)
    assert best["stage"] == 2  # the best of the latest stage, not an earlier (CoT) epoch
    assert not [f for f in os.listdir(tiny["run"]) if f.endswith(".tmp")]


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny):
    out = str(tiny["root"] / "out-resumed")
    common = ["train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out, "--method", "coconut"]
    r = run(*common, "--max-epochs-this-run", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_log(os.path.join(out, "coconut"))) == 1  # stopped after epoch 1, as if killed
    r = run(*common, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    timing = ("seconds", "tokens_per_s", "train_minutes", "test_s_per_q")
    strip = lambda log: [{k: v for k, v in m.items() if k not in timing} for m in log]  # noqa: E731
    assert strip(read_log(os.path.join(out, "coconut"))) == strip(read_log(tiny["run"]))


def test_existing_run_is_not_overwritten(tiny):
    before = snapshot(tiny["run"])
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", tiny["out"], "--method", "coconut")
    assert r.returncode != 0 and "already holds a run" in r.stderr and "--resume" in r.stderr
    assert snapshot(tiny["run"]) == before


def write_hf_folder(folder, vocab_size):
    """A tiny GPT-2 in the Hugging Face layout, with a vocabulary that is not GPT-2's."""
    from safetensors.torch import save_file
    from model import GPT, GPTConfig
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=160, vocab_size=vocab_size))
    sd = {k.removeprefix("transformer."): v.t().contiguous() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
          else v.contiguous() for k, v in gpt.state_dict().items() if k != "lm_head.weight"}
    os.makedirs(folder)
    save_file(sd, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(n_layer=1, n_head=2, n_embd=16, n_positions=160, vocab_size=vocab_size), f)
    return folder


class Payload:
    """Unpickling this writes a file: a checkpoint that carries it must be refused, not run."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_inputs(tiny):
    """(name, extra args, env, text the error must contain)."""
    root, data, ckpt = tiny["root"], tiny["data"], os.path.join(tiny["run"], "best.pt")
    payload = str(root / "payload.pt")
    torch.save(dict(torch.load(ckpt, weights_only=True), extra=Payload(str(root / "payload-ran"))), payload)
    malformed = root / "malformed.json"
    malformed.write_text('[{"question": "Is Tom a wumpus?", "steps": "not a list", "answer": "yes"}]')
    truncated = root / "truncated.json"
    truncated.write_text('[{"question": "Is Tom')
    return [
        ("unknown dataset", ["--dataset", "mnist"], {}, "invalid choice: 'mnist'"),
        ("unknown method", ["--method", "coconut,telepathy"], {}, "unknown method 'telepathy'"),
        ("missing file", ["--train-file", str(root / "nope.json"), "--valid-file", os.path.join(data, "valid.json"),
                          "--test-file", os.path.join(data, "test.json")], {}, "nope.json: no such file"),
        ("malformed record", ["--train-file", str(malformed), "--valid-file", os.path.join(data, "valid.json"),
                              "--test-file", os.path.join(data, "test.json")], {}, "malformed.json: record 0"),
        ("not JSON", ["--train-file", str(truncated), "--valid-file", os.path.join(data, "valid.json"),
                      "--test-file", os.path.join(data, "test.json")], {}, "truncated.json: not valid JSON"),
        ("code in a checkpoint", ["--init", payload], {}, "payload.pt: holds Python objects"),
        ("other model size", ["--init", ckpt, "--vocab", "full", "--n-layer", "3"], {}, "n_layer=1, but --n-layer 3"),
        ("other vocabulary", ["--init", write_hf_folder(str(root / "hf-1000"), 1000), "--vocab", "full"], {},
         "vocabulary of 1000 tokens"),
        ("too long", ["--block-size", "40"], {}, "more than the model's context of 40"),
        ("gpt2 offline", ["--init", "gpt2", "--vocab", "full"],
         dict(HF_HUB_OFFLINE="1", HF_HOME=str(root / "empty-hf-home")), "could not get the gpt2 weights"),
        ("gsm8k missing", ["--dataset", "gsm8k", "--data-dir", str(root / "no-gsm8k")], {}, "wget -P data/gsm8k https://"),
        ("unknown device", ["--device", "foo"], {}, "--device foo"),
        ("zero micro-batch", ["--micro-batch-size", "0"], {}, "--micro-batch-size must be at least 1"),
    ]


def test_bad_inputs_fail_clearly_and_touch_nothing(tiny):
    for name, extra, env, expected in bad_inputs(tiny):
        out = tiny["root"] / f"out-bad-{name.replace(' ', '-')}"
        before = snapshot(tiny["root"] / "data")
        r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", str(out), *extra, env=env)
        assert r.returncode != 0, name
        assert expected in r.stderr, (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert not os.path.exists(out), name  # no run folder for a run that never started
        assert snapshot(tiny["root"] / "data") == before, name
    assert not os.path.exists(tiny["root"] / "payload-ran")  # the checkpoint's code never ran


def test_diverging_run_stops_clearly_before_saving_nan_weights(tiny, tmp_path):
    """A learning rate of 1e30 overflows the forward of the second step: the run must stop there
    with a clear error, not train on NaN weights and save them as its checkpoint."""
    out = str(tmp_path / "out")
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out, "--method", "cot",
            "--learning-rate", "1e30", "--warmup-iters", "0")
    assert r.returncode == 1
    assert "cot epoch 1/3 stage 0: the gradient became nan at step 2" in r.stderr.lower(), r.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "cot", "ckpt.pt"))


def test_eval_only_prints_accuracy_and_k_sweep(tiny):
    r = run("train.py", "--eval", tiny["run"])
    assert r.returncode == 0, r.stderr[-3000:]
    test_acc = read_log(tiny["run"])[-1]["test_acc"]  # measured by the training run on the same file
    assert f"accuracy {100 * test_acc:.1f}%" in r.stdout
    r = run("train.py", "--eval", os.path.join(tiny["run"], "best.pt"), "--eval-file",
            os.path.join(tiny["data"], "valid.json"), "--n-thoughts", "0,2")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "accuracy" in line]
    assert lines[0].startswith("k=0") and lines[1].startswith("k=2") and "forward passes" in lines[1]


def test_sample_shows_thoughts_and_answers(tiny):
    r = run("sample.py", "--ckpt", tiny["run"], "--index", "0,1", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Q: ") == 2 and r.stdout.count("thought 1: ") == 2 and r.stdout.count("A: ") == 2
    r = run("sample.py", "--ckpt", str(tiny["root"] / "nope.pt"))
    assert r.returncode != 0 and "nope.pt" in r.stderr


def test_parallel_jobs_match_a_run_on_its_own(tiny):
    """--jobs trains the methods in separate processes; each ends as it does when trained alone."""
    out = str(tiny["root"] / "out-parallel")
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out, "--method", "coconut,no-cot",
            "--jobs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    timing = ("seconds", "tokens_per_s", "train_minutes", "test_s_per_q")
    strip = lambda log: [{k: v for k, v in m.items() if k not in timing} for m in log]  # noqa: E731
    assert strip(read_log(os.path.join(out, "coconut"))) == strip(read_log(tiny["run"]))
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| coconut", "| no-cot"]
    assert os.path.exists(os.path.join(out, "no-cot", "train.log"))


def test_generated_data_is_not_reused_with_other_settings(tiny):
    """A data folder generated by train.py remembers its generator settings; asking for other
    settings is refused instead of silently training on the old files."""
    data_dir, out = str(tiny["root"] / "generated"), str(tiny["root"] / "out-generated")
    sizes = ["--n-valid", "4", "--n-test", "4", "--max-nodes", "6", "--min-steps", "1", "--max-steps", "2"]
    common = ["train.py", *TINY, "--data-dir", data_dir, *sizes, "--method", "no-cot", "--epochs", "1"]
    r = run(*common, "--n-train", "12", "--out-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(data_dir, "train.json")) as f:
        assert len(json.load(f)) == 12
    before = snapshot(data_dir)
    r = run(*common, "--n-train", "13", "--out-dir", out + "-2")
    assert r.returncode != 0 and "generated with other settings" in r.stderr and "(now" in r.stderr
    assert snapshot(data_dir) == before


def processes_with(text):
    """Pids of the processes whose command line contains text (read from /proc: Linux)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_kill_9_of_a_parallel_run_leaves_no_trainer_behind(tiny):
    """A kill -9 of train.py --jobs also ends its children, so a --resume never races an orphan."""
    import signal
    import time
    out = str(tiny["root"] / "out-killed")
    parent = subprocess.Popen([sys.executable, "train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out,
                               "--method", "coconut,no-cot", "--jobs", "2", "--epochs", "50"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(processes_with(out)) < 3 and time.time() < deadline:  # the parent and its two children
        time.sleep(0.2)
    assert len(processes_with(out)) == 3
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while processes_with(out) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_with(out) == []
