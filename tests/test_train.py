"""
Tests of train.py and sample.py, run as a user runs them: as subprocesses, on tiny models and data.

Run: python -m pytest -q tests/test_train.py      (a few minutes on 2 CPU cores, no network)

The references: an uninterrupted run with the same seed (for --resume after kill -9), numbers
worked out by hand (learning rates, optimizer steps, forward passes), a model trained until it
knows its answers (for the accuracy), scripted stubs (for which checkpoint is tested), and the
promise of the README for bad input: one line naming the culprit, exit status 1, nothing lost.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from coconut import Coconut, Curriculum, build_example, collate  # noqa: E402
from conftest import run_all, run_script, small_prosqa  # noqa: E402
from data import Vocab, encode, save_records  # noqa: E402
from evaluate import Run  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# a 1-layer model on 6-node graphs, three epochs: stage 0 (CoT), 1 (one thought), 2 (all steps gone).
# 24 training questions in batches of 8: 3 optimizer steps per epoch.
# dropout > 0 so that a resume must restore the RNG state to match.
TINY = ["--init", "scratch", "--vocab", "data", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--block-size", "160", "--dropout", "0.1", "--batch-size", "8", "--micro-batch-size", "4",
        "--learning-rate", "3e-3", "--c", "1", "--max-latent-stage", "1", "--epochs-per-stage", "1",
        "--epochs", "3", "--max-new-tokens", "8", "--eval-batch-size", "8"]
TIMING = ("seconds", "tokens_per_s", "train_minutes", "test_s_per_q")


def without(args, *flags):
    """args without the given flags and their values."""
    out, skip = [], False
    for a in args:
        if skip or a in flags:
            skip = not skip
            continue
        out.append(a)
    return out


# CoT and No-CoT have no curriculum: its flags would be ignored, so they are refused
SINGLE_STAGE = without(TINY, "--c", "--max-latent-stage", "--epochs-per-stage")
# --stage N trains --epochs-per-stage epochs: --epochs would be ignored
ONE_STAGE = without(TINY, "--epochs")


def run(*args, env=None, cwd=ROOT):
    """A script of the repository, run as a user runs it (conftest.run_script), within 3 minutes."""
    return run_script(*args, cwd=cwd, env=env, timeout=180)


def script(name):
    return os.path.join(ROOT, name)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def untimed(log):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in log]


def snapshot(folder):
    """Every file under folder with its bytes: to check that nothing was overwritten."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ProsQA data set and one finished three-epoch Coconut run on it."""
    root, data_dir, out = small_prosqa(tmp_path_factory, "train", 1, dict(train=24, valid=8, test=8), max_nodes=6,
                                       min_steps=1, max_steps=2)
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
    # at batch size 1: the prefix pass, one pass per thought, then one per answer token after the first
    assert final["test_passes"] == pytest.approx(final["test_tokens"] + 1)
    ckpt = load(os.path.join(tiny["run"], "ckpt.pt"))
    assert ckpt["epoch"] == 3 and ckpt["stage"] == 2 and "optimizer" in ckpt and "rng" in ckpt
    assert ckpt["model_args"]["n_layer"] == 1 and ckpt["vocab"] is not None
    # AdamW starts afresh at every stage: its state has seen only the last epoch's 3 steps
    assert [s["step"].item() for s in ckpt["optimizer"]["state"].values()] == [3] * len(ckpt["optimizer"]["state"])
    best = load(os.path.join(tiny["run"], "best.pt"))
    assert best["stage"] == 2  # the best of the latest stage, not an earlier (CoT) epoch
    assert not [f for f in os.listdir(tiny["run"]) if f.endswith(".tmp")]


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


def kill_after_first_epoch(cmd, run_dir, cwd=ROOT):
    """Start cmd, kill -9 it once an epoch is logged in run_dir (the log is written last)."""
    proc = subprocess.Popen([sys.executable, *cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = os.path.join(run_dir, "log.jsonl")
    deadline = time.time() + 120
    while not os.path.exists(log) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="kill -9 of a subprocess, Linux")
def test_kill_9_then_resume_from_a_moved_folder_matches_an_uninterrupted_run(tiny):
    """One stage trained for 4 epochs (--stage 1), so the resumed run must restore AdamW's moments,
    its warm-up position and the RNG states, not just the weights; the run folder is moved between
    the kill and the resume, and the resume spells its --out-dir with a trailing slash."""
    args = [*without(ONE_STAGE, "--epochs-per-stage"), "--data-dir", tiny["data"], "--method", "coconut",
            "--stage", "1", "--epochs-per-stage", "4", "--warmup-iters", "5"]
    reference = str(tiny["root"] / "out-uninterrupted")
    r = run("train.py", *args, "--out-dir", reference)
    assert r.returncode == 0, r.stderr[-3000:]
    killed, moved = str(tiny["root"] / "out-killed"), str(tiny["root"] / "out-moved")
    kill_after_first_epoch(["train.py", *args, "--out-dir", killed], os.path.join(killed, "coconut"))
    assert 1 <= len(read_log(os.path.join(killed, "coconut"))) < 4
    shutil.move(killed, moved)
    r = run("train.py", *args, "--out-dir", moved + "/", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after epoch" in r.stdout
    assert untimed(read_log(os.path.join(moved, "coconut"))) == untimed(read_log(os.path.join(reference, "coconut")))
    assert [m["stage"] for m in read_log(os.path.join(reference, "coconut"))[:-1]] == [1, 1, 1, 1]
    a, b = load(os.path.join(moved, "coconut", "ckpt.pt")), load(os.path.join(reference, "coconut", "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in b["optimizer"]["state"].items():
        assert s["step"].item() == 12  # one AdamW across the stage's 4 epochs of 3 steps
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["state"][i][k], s[k]), (i, k)


def test_warmup_and_optimizer_resets(tiny, tmp_path):
    """One optimizer step per epoch (batch 24 = the whole training set), warm-up of 4 steps: the
    learning rate of step s (counted from the last reset) is lr * min(1, s / 5)."""
    args = [*without(ONE_STAGE, "--epochs-per-stage", "--batch-size", "--micro-batch-size"), "--data-dir",
            tiny["data"], "--method", "coconut", "--stage", "1", "--epochs-per-stage", "3", "--batch-size", "24",
            "--micro-batch-size", "8", "--warmup-iters", "4"]
    for reset, lrs, steps in [("stage", [0.2, 0.4, 0.6], 3), ("epoch", [0.2, 0.2, 0.2], 1)]:
        out = str(tmp_path / reset)
        r = run("train.py", *args, "--reset-optimizer", reset, "--out-dir", out)
        assert r.returncode == 0, r.stderr[-3000:]
        assert [m["lr"] for m in read_log(os.path.join(out, "coconut"))[:-1]] == pytest.approx([x * 3e-3 for x in lrs])
        state = load(os.path.join(out, "coconut", "ckpt.pt"))["optimizer"]["state"]
        assert {s["step"].item() for s in state.values()} == {steps}


def test_the_other_methods_end_to_end(tiny, tmp_path):
    """no-thoughts, pause and no-curriculum, with stage mixing and gradient clipping on. Forward
    passes per question, worked out from the layouts (1 thought at the last stage): pause feeds no
    thought back, so its thought costs no pass; without thoughts, one prompt pass."""
    out = str(tmp_path / "out")
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out, "--method",
            "no-thoughts,pause,no-curriculum", "--uniform-prob", "0.5", "--grad-clip", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    logs = {m: read_log(os.path.join(out, m)) for m in ("no-thoughts", "pause", "no-curriculum")}
    assert [m["stage"] for m in logs["no-curriculum"][:-1]] == [2, 2, 2]  # the last stage from the start
    assert [m["stage"] for m in logs["pause"][:-1]] == [0, 1, 2]
    final = {m: log[-1] for m, log in logs.items()}
    assert final["pause"]["test_passes"] == pytest.approx(final["pause"]["test_tokens"])
    assert final["no-thoughts"]["test_passes"] == pytest.approx(final["no-thoughts"]["test_tokens"] + 1)
    assert final["no-curriculum"]["test_passes"] == pytest.approx(final["no-curriculum"]["test_tokens"] + 1)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A No-CoT model trained until it knows the answers of its 8 questions (train = valid = test)."""
    root, splits, out = small_prosqa(tmp_path_factory, "learned", 3, dict(train=8, valid=1, test=1), max_nodes=5,
                                     min_steps=1, max_steps=1)
    with open(os.path.join(splits, "train.json")) as f:
        records = json.load(f)
    save_records(records * 16, str(root / "train.json"))
    files = ["--train-file", str(root / "train.json")] + [
        x for s in ("valid", "test") for x in (f"--{s}-file", os.path.join(splits, "train.json"))]
    r = run("train.py", "--init", "scratch", "--vocab", "data", "--n-layer", "1", "--n-head", "2", "--n-embd",
            "32", "--block-size", "96", "--dropout", "0", "--batch-size", "16", "--micro-batch-size", "16",
            "--learning-rate", "1e-2", "--epochs", "6", "--max-new-tokens", "12", "--method", "no-cot",
            *files, "--out-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(run=os.path.join(out, "no-cot"), records=records, file=os.path.join(splits, "train.json"))


def test_a_model_that_knows_its_answers_scores_100_percent(learned):
    assert read_log(learned["run"])[-1]["test_acc"] == 1.0
    r = run("evaluate.py", learned["run"], "--file", learned["file"])
    assert r.returncode == 0 and "accuracy 100.0%" in r.stdout, r.stderr[-2000:]
    # the same questions with the other option as the gold answer: every one is then wrong
    names = lambda q, *keys: [q["idx_to_symbol"][q[k]] for k in keys]  # noqa: E731
    wrong = [dict(q, answer="{} is a {}.".format(*names(q, "root", "neg_target"))) for q in learned["records"]]
    path = os.path.join(os.path.dirname(learned["file"]), "wrong.json")
    save_records(wrong, path)
    r = run("evaluate.py", learned["run"], "--file", path)
    assert r.returncode == 0 and "accuracy 0.0%" in r.stdout, r.stderr[-2000:]
    # a model without thoughts is given none, by train.py and sample.py alike
    for cmd in (["evaluate.py", learned["run"]], ["sample.py", learned["run"]]):
        r = run(*cmd, "--n-thoughts", "1")
        assert r.returncode == 1 and "a no-cot model has no thoughts" in r.stderr, r.stderr


def test_test_split_is_scored_with_the_best_checkpoint(tiny, tmp_path, monkeypatch):
    """A stub evaluation that scripts the validation accuracies (best: epoch 2 of 3, one stage)
    and, on the test split, reports a fingerprint of the weights it was handed."""
    calls = []

    def fingerprint(state_dict):
        return round(sum(v.double().sum().item() for v in state_dict.values()), 5)

    def stub(run, questions, *rest, **kwargs):
        calls.append(1)
        acc = [0.25, 0.75, 0.5][len(calls) - 1] if len(calls) <= 3 else fingerprint(run.model.gpt.state_dict())
        return dict(acc=acc, tokens=1.0, passes=2.0, s_per_q=0.0), {}
    monkeypatch.setattr(train, "evaluate", stub)
    out = str(tmp_path / "out")
    train.main([*without(ONE_STAGE, "--epochs-per-stage"), "--data-dir", tiny["data"], "--out-dir", out,
                "--method", "coconut", "--stage", "1", "--epochs-per-stage", "3"])
    final = read_log(os.path.join(out, "coconut"))[-1]
    best, last = load(os.path.join(out, "coconut", "best.pt")), load(os.path.join(out, "coconut", "ckpt.pt"))
    assert final["best_epoch"] == 2 and best["epoch"] == 2
    assert final["test_acc"] == fingerprint(best["model"]) != fingerprint(last["model"])


def test_micro_batches_are_weighed_by_their_share_of_the_batch():
    """One SGD step (lr 1) on a batch of 6 examples in micro-batches of 4 and 2: the weights move
    by minus the gradient of (4/6) * mean loss of the first 4 + (2/6) * mean loss of the last 2."""
    cur = Curriculum(c=1, max_latent_stage=2)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 200, (n,), generator=g).tolist()  # noqa: E731
    examples = [build_example({"question": ids(3 + i % 3), "steps": [ids(2), ids(1 + i % 2)],
                               "answer": ids(2) + [50256]}, cur, stage=i % 3) for i in range(6)]
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=50260, n_layer=1, n_head=2, n_embd=16))
    reference = GPT(GPTConfig(block_size=32, vocab_size=50260, n_layer=1, n_head=2, n_embd=16))
    reference.load_state_dict(gpt.state_dict())
    run = Run(Coconut(gpt), Vocab(), cur, stage=None)
    args = argparse.Namespace(batch_size=6, micro_batch_size=4, learning_rate=1.0, warmup_iters=0,
                              grad_clip=0.0)
    optimizer = torch.optim.SGD(gpt.parameters(), lr=1.0)
    train.train_epoch(run, run.model, optimizer, examples, train.Progress(), args, contextlib.nullcontext(), "test")
    loss = sum(Coconut(reference)(**collate(part)) * len(part) / 6 for part in (examples[:4], examples[4:]))
    loss.backward()
    for (name, p), p0 in zip(gpt.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, p0 - p0.grad, msg=name)


def write_hf_folder(folder, vocab_size):
    """A tiny GPT-2 in the Hugging Face layout, with a vocabulary that is not GPT-2's."""
    from safetensors.torch import save_file
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
    """(name, args after train.py, env, text the error must contain)."""
    root, data, ckpt = tiny["root"], tiny["data"], os.path.join(tiny["run"], "best.pt")
    payload = str(root / "payload.pt")
    torch.save(dict(load(ckpt), extra=Payload(str(root / "payload-ran"))), payload)
    malformed = root / "malformed.json"
    malformed.write_text('[{"question": "Is Tom a wumpus?", "steps": "not a list", "answer": "yes"}]')
    truncated = root / "truncated.json"
    truncated.write_text('[{"question": "Is Tom')
    (root / "random.pt").write_bytes(os.urandom(2000))
    (root / "text.pt").write_text("just some text\n")
    files = lambda train: ["--train-file", str(train), "--valid-file", os.path.join(data, "valid.json"),  # noqa: E731
                           "--test-file", os.path.join(data, "test.json")]
    sized = without(TINY, "--n-layer", "--n-head", "--n-embd", "--block-size", "--vocab")
    handmade = root / "handmade"  # splits that data.py did not generate: no generator.json
    handmade.mkdir(exist_ok=True)
    for split in ("train", "valid", "test"):
        shutil.copy(os.path.join(data, f"{split}.json"), handmade)
    cases = [
        ("unknown dataset", ["--dataset", "mnist"], "invalid choice: 'mnist'"),
        ("unknown method", ["--method", "coconut,telepathy"], "unknown method 'telepathy'"),
        ("missing file", files(root / "nope.json"), "nope.json: no such file"),
        ("malformed record", files(malformed), "malformed.json: record 0"),
        ("not JSON", files(truncated), "truncated.json: not valid JSON"),
        ("too long", ["--block-size", "40"], "more than the model's context of 40"),
        ("gsm8k missing", ["--dataset", "gsm8k", "--data-dir", str(root / "no-gsm8k")],
         f"wget -P {root / 'no-gsm8k'} https://"),
        ("unknown device", ["--device", "foo"], "--device foo"),
        ("zero micro-batch", ["--micro-batch-size", "0"], "--micro-batch-size: must be at least 1"),
        ("uneven micro-batches", ["--micro-batch-size", "3"], "--batch-size 8 is not a multiple of --micro-batch-size 3"),
        ("stage beyond the last", ["--stage", "3"], "--stage 3: coconut trains at stages 0, 1, 2"),
        ("stage of cot", ["--method", "cot", "--stage", "1"], "--stage 1: cot trains at stage 0"),
        ("negative warm-up", ["--warmup-iters", "-1"], "--warmup-iters: must be at least 0"),
        ("no layers", ["--n-layer", "0"], "--n-layer: must be at least 1"),
        ("no heads", ["--n-head", "0"], "--n-head: must be at least 1"),
        ("heads do not divide", ["--n-embd", "30", "--n-head", "4"], "--n-embd 30 is not a multiple of --n-head 4"),
        ("zero learning rate", ["--learning-rate", "0"], "--learning-rate: must be at least"),
        ("thoughts without evaluation", ["--n-thoughts", "2"], "unrecognized arguments: --n-thoughts 2"),
        ("curriculum of cot", ["--method", "cot"], "--c changes nothing for cot"),
        ("curriculum of no-curriculum", ["--method", "no-curriculum"],
         "--epochs-per-stage changes nothing for no-curriculum"),
        ("epochs of one stage", ["--stage", "1", "--epochs", "4"], "--epochs is the length of --stage all"),
        ("steps the wrong way round", ["--min-steps", "3", "--max-steps", "2"],
         "--min-steps 3 is more than --max-steps 2"),
        ("graphs of prontoqa", ["--dataset", "prontoqa", "--max-nodes", "7"],
         "--max-nodes is a setting of the ProsQA generator"),
        ("generator with files", [*files(os.path.join(data, "train.json")), "--n-train", "5"],
         "--n-train is a setting of the generated data"),
        ("generator of hand-made splits", ["--data-dir", str(handmade), "--max-nodes", "5"],
         f"--max-nodes is a setting of the generator, and {handmade} has no generator.json"),
        ("fresh hand-made splits", ["--data-dir", str(handmade), "--fresh-data"], "--fresh-data is a setting of"),
        ("fresh data for one epoch", ["--epochs", "1", "--fresh-data"], "--fresh-data draws new questions"),
        ("jobs for one method", ["--jobs", "2"], "--jobs trains several --method"),
        ("name and out-dir", ["--name", "x"], "--name names a folder under out/"),
        ("resume of nothing", ["--resume"], "--resume: no run to resume"),
    ]
    # the size flags of TINY are refused with --init: these cases leave them out
    init_cases = [
        ("code in a checkpoint", ["--init", payload], "payload.pt: holds Python objects"),
        ("random bytes", ["--init", str(root / "random.pt")], "random.pt: not a PyTorch checkpoint"),
        ("text file", ["--init", str(root / "text.pt")], "text.pt: not a PyTorch checkpoint"),
        ("size of a checkpoint", ["--init", ckpt, "--n-layer", "3"], "--n-layer is for --init scratch"),
        ("vocab of a checkpoint", ["--init", ckpt, "--vocab", "data"], "--vocab is for --init scratch"),
        ("other vocabulary", ["--init", write_hf_folder(str(root / "hf-1000"), 1000)], "vocabulary of 1000 tokens"),
    ]
    offline = dict(HF_HUB_OFFLINE="1", HF_HOME=str(root / "empty-hf-home"))
    return ([(name, [*TINY, *args], {}, text) for name, args, text in cases]
            + [(name, [*sized, *args], {}, text) for name, args, text in init_cases]
            + [("gpt2 offline", [*sized, "--init", "gpt2"], offline, "could not get the gpt2 weights")])


def test_bad_inputs_fail_clearly_and_touch_nothing(tiny):
    cases = bad_inputs(tiny)
    outs = [tiny["root"] / f"out-bad-{name.replace(' ', '-')}" for name, *_ in cases]
    before = snapshot(tiny["root"] / "data")
    results = run_all([["train.py", "--data-dir", tiny["data"], "--out-dir", out, *args]
                       for out, (_, args, _, _) in zip(outs, cases)], [env for _, _, env, _ in cases])
    for (name, _, _, expected), out, r in zip(cases, outs, results):
        assert r.returncode == 1, (name, r.stderr[-2000:])
        assert expected in r.stderr, (name, r.stderr[-2000:])
        one_line = r.stderr.count("\n") == 1 or name == "gsm8k missing"  # which prints the commands to run
        assert r.stderr.startswith("error: ") and one_line, (name, r.stderr[-2000:])
        assert not os.path.exists(out), name  # no run folder for a run that never started
    assert snapshot(tiny["root"] / "data") == before
    assert not os.path.exists(tiny["root"] / "payload-ran")  # the checkpoint's code never ran


def test_runs_are_never_overwritten(tiny, tmp_path):
    before = snapshot(tiny["run"])
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", tiny["out"], "--method", "coconut")
    assert r.returncode == 1 and "already holds a run" in r.stderr and "--resume" in r.stderr
    assert snapshot(tiny["run"]) == before
    # a run folder whose ckpt.pt is gone keeps its best.pt and log, with or without --resume
    partial = tmp_path / "out" / "coconut"
    shutil.copytree(tiny["run"], partial)
    os.remove(partial / "ckpt.pt")
    kept = snapshot(partial)
    for resume in ([], ["--resume"]):
        r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", str(tmp_path / "out"), *resume)
        assert r.returncode == 1 and str(partial) in r.stderr, r.stderr
        assert snapshot(partial) == kept
    # resuming a finished run, its folder spelled in other ways, does nothing
    relative = os.path.relpath(tiny["out"], ROOT)
    for spelling in (tiny["out"] + "/", "./" + relative, relative):
        r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", spelling, "--resume")
        assert r.returncode == 0 and "already finished" in r.stdout, r.stderr[-2000:]
    assert snapshot(tiny["run"]) == before


def test_a_run_killed_in_its_first_epoch_starts_again_on_resume(tiny, tmp_path):
    """Killed before its first ckpt.pt, even between writing best.pt and ckpt.pt: --resume has no
    epoch to continue from, so the run starts again, and ends as a run never killed."""
    run_dir = tmp_path / "out" / "coconut"
    run_dir.mkdir(parents=True)
    shutil.copy(os.path.join(tiny["run"], "args.json"), run_dir / "args.json")
    shutil.copy(os.path.join(tiny["run"], "best.pt"), run_dir / "best.pt")
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", str(tmp_path / "out"), "--method", "coconut",
            "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert untimed(read_log(str(run_dir))) == untimed(read_log(tiny["run"]))


def test_diverging_run_stops_clearly_before_saving_nan_weights(tiny, tmp_path):
    """A learning rate of 1e30 overflows the forward of the second step: the run must stop there
    with a clear error, not train on NaN weights and save them as its checkpoint."""
    out = str(tmp_path / "out")
    r = run("train.py", *SINGLE_STAGE, "--data-dir", tiny["data"], "--out-dir", out, "--method", "cot",
            "--learning-rate", "1e30", "--warmup-iters", "0")
    assert r.returncode == 1
    assert "cot epoch 1/3 stage 0: the gradient became nan at step 2" in r.stderr.lower(), r.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "cot", "ckpt.pt"))


def test_eval_only_prints_accuracy_and_k_sweep(tiny, tmp_path):
    r = run(script("evaluate.py"), tiny["run"], cwd=tmp_path)  # from another folder
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_log(tiny["run"])[-1]  # measured by the training run on the same file
    assert f"accuracy {100 * final['test_acc']:.1f}%  tokens {final['test_tokens']:.1f}" in r.stdout
    r = run("evaluate.py", os.path.join(tiny["run"], "best.pt"), "--file",
            os.path.join(tiny["data"], "valid.json"), "--n-thoughts", "0,2", "--max-new-tokens", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "accuracy" in line]
    assert lines[0].startswith("k=0") and lines[1].startswith("k=2") and "forward passes" in lines[1]
    # one new token at most (the thoughts are counted as tokens too)
    assert float(lines[0].split("tokens ")[1].split()[0]) <= 1 and float(lines[1].split("tokens ")[1].split()[0]) <= 3
    for extra, expected in [([tiny["out"]], f"pass one of them, e.g. {tiny['run']}"),
                            ([tiny["run"], "--n-thoughts", "1,a"], "--n-thoughts: expected numbers"),
                            ([tiny["run"], "--n-thoughts", "-1"], "not -1"),
                            ([tiny["run"], "--epochs", "3"], "unrecognized arguments: --epochs 3")]:
        r = run("evaluate.py", *extra)
        assert r.returncode == 1 and expected in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)


def test_a_moved_run_is_evaluated_and_sampled_from_anywhere(tiny, tmp_path):
    moved = str(tmp_path / "elsewhere")
    shutil.copytree(tiny["run"], moved)
    assert run(script("evaluate.py"), moved, cwd=tmp_path).returncode == 0
    assert run(script("sample.py"), moved, "--num", "1", cwd=tmp_path).returncode == 0
    # data that moved too: the message says which flag to pass
    test_file = os.path.join(tiny["data"], "test.json")
    os.rename(test_file, test_file + ".away")
    try:
        r = run("evaluate.py", moved)
        assert r.returncode == 1 and "--file" in r.stderr and test_file in r.stderr, r.stderr
        r = run("sample.py", moved)
        assert r.returncode == 1 and "--file" in r.stderr, r.stderr
    finally:
        os.rename(test_file + ".away", test_file)


def test_sample_shows_thoughts_and_answers(tiny, tmp_path):
    r = run("sample.py", tiny["run"], "--index", "0,1", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Q: ") == 2 and r.stdout.count("thought 1: ") == 2 and r.stdout.count("A: ") == 2
    for extra, expected in [([str(tmp_path / "nope.pt")], "nope.pt"),
                            ([tiny["run"], "--question", "Is Tom a wumpus?", "--index", "1"],
                             "--question and --index do not go together"),
                            ([tiny["run"], "--device", "foo"], "--device foo"),
                            ([tiny["run"], "--n-thoughts", "500"], "--n-thoughts 500"),
                            ([tiny["run"], "--n-thoughts", "-1"], "--n-thoughts"),
                            ([tiny["run"], "--index", "99"], "--index 99")]:
        r = run("sample.py", *extra)
        assert r.returncode == 1 and expected in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)


def test_parallel_jobs_match_a_run_on_its_own(tiny):
    """--jobs trains the methods in separate processes; each ends as it does when trained alone."""
    out = str(tiny["root"] / "out-parallel")
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out, "--method", "coconut,no-cot",
            "--jobs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert untimed(read_log(os.path.join(out, "coconut"))) == untimed(read_log(tiny["run"]))
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| coconut", "| no-cot"]
    with open(os.path.join(out, "no-cot", "train.log")) as f:
        lines = f.read().splitlines()
    assert len(lines) > 3 and max(map(len, lines)) < 500  # lines of progress, not one of carriage returns


def test_generated_data_is_not_reused_with_other_settings(tiny):
    """A data folder generated by train.py remembers its generator settings; asking for other
    settings is refused instead of silently training on the old files."""
    data_dir, out = str(tiny["root"] / "generated"), str(tiny["root"] / "out-generated")
    sizes = ["--n-valid", "4", "--n-test", "4", "--max-nodes", "6", "--min-steps", "1", "--max-steps", "2"]
    common = ["train.py", *SINGLE_STAGE, "--data-dir", data_dir, *sizes, "--method", "no-cot", "--epochs", "1"]
    r = run(*common, "--n-train", "12", "--out-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(data_dir, "train.json")) as f:
        assert len(json.load(f)) == 12
    before = snapshot(data_dir)
    r = run(*common, "--n-train", "13", "--out-dir", out + "-2")
    assert r.returncode == 1 and "generated with other settings" in r.stderr and "(now" in r.stderr
    assert snapshot(data_dir) == before


def children_of(pid):
    """Pids of the processes whose parent is pid (read from /proc: Linux)."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
        except (OSError, IndexError, ValueError):
            pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_kill_9_of_a_parallel_run_leaves_no_trainer_behind(tiny):
    """A kill -9 of train.py --jobs also ends its children, so a --resume never races an orphan."""
    out = str(tiny["root"] / "out-killed-parallel")
    parent = subprocess.Popen([sys.executable, "train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out,
                               "--method", "coconut,no-cot", "--jobs", "2", "--epochs", "50"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, trainers = time.time() + 60, []
    while time.time() < deadline:  # the two trainers have started once both logs have a line
        logs = [os.path.join(out, m, "train.log") for m in ("coconut", "no-cot")]
        if all(os.path.exists(p) and os.path.getsize(p) for p in logs):
            trainers = [p for p in children_of(parent.pid) if "multiprocessing" in open(f"/proc/{p}/cmdline").read()]
            break
        time.sleep(0.2)
    assert len(trainers) >= 2, trainers
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{p}") for p in trainers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in trainers)


def test_each_epoch_sees_its_own_batch_order(tiny, tmp_path, monkeypatch):
    """The data order of an epoch depends on (seed, epoch): two epochs of one stage see the same
    examples in different orders, and a second run with the same seed sees the same orders again
    (which --resume relies on). The examples each epoch is trained on are recorded by a stub."""
    orders = []

    def record(run, model, optimizer, examples, progress, args, ctx, desc):
        orders.append([tuple(e["input_ids"]) for e in examples])
        return 1.0, 1, 1.0, args.learning_rate
    monkeypatch.setattr(train, "train_epoch", record)
    args = [*without(ONE_STAGE, "--epochs-per-stage"), "--data-dir", tiny["data"], "--method", "coconut",
            "--stage", "1", "--epochs-per-stage", "2"]
    for name in ("a", "b"):
        train.main([*args, "--out-dir", str(tmp_path / name)])
    first, second, again_first, again_second = orders
    assert sorted(first) == sorted(second) and len(first) == 24
    assert first != second
    assert (again_first, again_second) == (first, second)


def test_bf16_autocast_is_used_on_a_cpu_too(tiny, tmp_path):
    """--dtype bfloat16 is honoured off CUDA: the losses differ from float32's, a little."""
    from common import setup_device
    _, ctx = setup_device("cpu", "bfloat16")
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    out = str(tmp_path / "out")
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", out, "--method", "coconut", "--dtype",
            "bfloat16", "--epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    bf16, fp32 = read_log(os.path.join(out, "coconut"))[0], read_log(tiny["run"])[0]
    assert bf16["train_loss"] != fp32["train_loss"] and abs(bf16["train_loss"] - fp32["train_loss"]) < 0.05


def test_resume_may_change_dtype(tiny):
    """A finished float32 run may be resumed with another --dtype: the very advice of the
    non-finite-gradient error."""
    r = run("train.py", *TINY, "--data-dir", tiny["data"], "--out-dir", tiny["out"], "--method", "coconut",
            "--resume", "--dtype", "bfloat16")
    assert r.returncode == 0 and "already finished" in r.stdout, r.stderr[-2000:]


def test_resume_knows_its_data_by_content_not_by_path(tiny, tmp_path):
    """Moved data resumes; changed data under the same path is refused, and nothing is touched."""
    moved = str(tmp_path / "moved-data")
    shutil.copytree(tiny["data"], moved)
    r = run("train.py", *TINY, "--data-dir", moved, "--out-dir", tiny["out"], "--method", "coconut", "--resume")
    assert r.returncode == 0 and "already finished" in r.stdout, r.stderr[-2000:]
    with open(os.path.join(moved, "valid.json")) as f:
        records = json.load(f)
    save_records(records[::-1], os.path.join(moved, "valid.json"), overwrite=True)  # the same records, reordered
    before = snapshot(tiny["run"])
    r = run("train.py", *TINY, "--data-dir", moved, "--out-dir", tiny["out"], "--method", "coconut", "--resume")
    assert r.returncode == 1 and "valid.json is not the valid data" in r.stderr and r.stderr.count("\n") == 1
    assert snapshot(tiny["run"]) == before


def test_a_bug_keeps_its_traceback(tiny, tmp_path):
    """Only the project's own refusals become one-line errors: a ValueError raised from inside the
    model (a bug, not a user's mistake) reaches the user with its traceback."""
    script = (f"import sys; sys.path.insert(0, {ROOT!r}); import model\n"
              "def broken(*args, **kwargs):\n    raise ValueError('a bug inside the model')\n"
              "model.GPT.hidden = broken\nimport train\n"
              f"train.main({[*SINGLE_STAGE, '--data-dir', tiny['data'], '--out-dir', str(tmp_path / 'out'), '--method', 'cot']!r})")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "ValueError: a bug inside the model" in r.stderr
    assert "in broken" in r.stderr  # where it was raised


def test_the_paper_recipe_generates_its_data_on_first_use(tmp_path):
    """python train.py --dataset prosqa with no generator flag: ProsQA is generated at the paper's
    settings (28-node graphs, 3 to 6 steps) into the data folder, then trained on."""
    data_dir = str(tmp_path / "prosqa")
    r = run("train.py", *without(SINGLE_STAGE, "--block-size"), "--block-size", "1024", "--dataset", "prosqa",
            "--data-dir", data_dir, "--n-train", "8", "--n-valid", "2", "--n-test", "2", "--method", "no-cot",
            "--epochs", "1", "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(data_dir, "generator.json")) as f:
        settings = json.load(f)
    assert (settings["max_nodes"], settings["min_steps"], settings["max_steps"]) == (28, 3, 6)
    with open(os.path.join(data_dir, "train.json")) as f:
        assert all(3 <= len(r["steps"]) <= 6 for r in json.load(f))


def test_the_default_micro_batch_divides_the_batch():
    """Without --micro-batch-size a CPU takes up to 16 rows at once, the greatest common divisor of
    16 and the batch: --batch-size 24 gives micro-batches of 8 (3 of them), 48 gives 16, 6 gives 2."""
    from config import get_args
    for batch, micro in ((24, 8), (48, 16), (6, 2), (128, 16), (7, 1)):
        assert get_args(["--batch-size", str(batch), "--device", "cpu"]).micro_batch_size == micro, batch


def test_every_generator_flag_reaches_the_generator(tmp_path):
    """Each ProsQA generator flag of train.py, set away from its default, is what the generated
    folder was made with (its generator.json) and shows in its records."""
    from config import get_args
    data_dir = str(tmp_path / "data")
    args = get_args(["--data-dir", data_dir, "--data-seed", "3", "--n-train", "4", "--n-valid", "2", "--n-test", "2",
                     "--max-nodes", "9", "--min-steps", "2", "--max-steps", "2", "--names", "short",
                     "--other-option", "same-depth", "--min-root-children", "2", "--format", "compact"])
    data = train.load_data(args)
    with open(os.path.join(data_dir, "generator.json")) as f:
        assert json.load(f) == dict(dataset="prosqa", seed=3, sizes=dict(train=4, valid=2, test=2), max_nodes=9,
                                    min_steps=2, max_steps=2, names="short", other_option="same-depth",
                                    min_root_children=2, format="compact")
    for r in data["train"]["records"]:
        children = sum(u == r["root"] for u, _ in r["edges"])
        assert len(r["steps"]) == 2 and children >= 2 and len(r["idx_to_symbol"]) <= 9
        assert " ? " in r["question"] and " is a " not in r["question"]  # compact, short names
        assert all(len(encode(" " + name)) == 1 for name in r["idx_to_symbol"])


RECURRENT = [*without(SINGLE_STAGE, "--n-layer"), "--n-prelude", "1", "--n-core", "1", "--n-coda", "1",
             "--mean-iterations", "3", "--backprop-depth", "2", "--method", "recurrent"]


def test_the_recurrent_model_trains_and_is_evaluated_at_each_depth(tiny, tmp_path):
    out = str(tmp_path / "out")
    r = run("train.py", *RECURRENT, "--data-dir", tiny["data"], "--out-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_log(os.path.join(out, "recurrent"))[-1]
    assert final["test"] and final["test_passes"] == pytest.approx(final["test_tokens"] + 1)  # no thoughts
    assert final["test_iterations"] == 3  # its mean in training, at evaluation
    r = run("evaluate.py", os.path.join(out, "recurrent"), "--iterations", "1,2,6")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "accuracy" in line]
    assert [line.split()[0] for line in lines] == ["r=1", "r=2", "r=6"]
    assert [float(line.split("iterations ")[1].split()[0]) for line in lines] == [1, 2, 6]
    flops = [float(line.split(" MFLOPs")[0].split()[-1]) for line in lines]
    assert flops[0] < flops[1] < flops[2]
    r = run("evaluate.py", os.path.join(out, "recurrent"), "--exit", "kl", "--iterations", "6", "--exit-threshold", "1")
    assert r.returncode == 0 and "iterations 2.00" in r.stdout, r.stdout  # any change is below 1: stops at the first check
    assert run(script("sample.py"), os.path.join(out, "recurrent"), "--num", "1", cwd=tmp_path).returncode == 0
    r = run("analyze.py", os.path.join(out, "recurrent"))
    assert r.returncode == 1 and "no continuous thoughts" in r.stderr and r.stderr.count("\n") == 1


def test_a_coconut_with_a_stop_head_decides_its_thoughts(tiny, tmp_path):
    out = str(tmp_path / "out")
    # two latent stages, so that a 1-step question gets 1 thought at stage 2 and a 2-step one 2
    args = [*without(TINY, "--max-latent-stage"), "--max-latent-stage", "2", "--stop-head", "--no-pad-latent-to-max"]
    r = run("train.py", *args, "--data-dir", tiny["data"], "--out-dir", out, "--method", "coconut")
    assert r.returncode == 0, r.stderr[-3000:]
    for exit in ("head", "kl"):
        r = run("evaluate.py", os.path.join(out, "coconut"), "--exit", exit)
        assert r.returncode == 0, r.stderr[-3000:]
        thoughts = float(r.stdout.split("thoughts ")[1].split()[0])
        assert r.stdout.count("accuracy") == 1 and 0 <= thoughts <= 2  # at most its last stage's two


def test_the_new_flags_are_refused_where_they_change_nothing(tiny):
    ckpt = os.path.join(tiny["run"], "best.pt")
    cases = (([*SINGLE_STAGE, "--method", "cot", "--stop-head"], "--stop-head learns when to stop thinking: cot"),
            ([*SINGLE_STAGE, "--method", "cot", "--no-pad-latent-to-max"], "--pad-latent-to-max changes nothing for cot"),
            ([*SINGLE_STAGE, "--method", "cot", "--n-core", "2"], "--n-core is for --method recurrent"),
            ([*RECURRENT, "--n-layer", "2"], "--n-layer is a GPT's"),
            ([*without(RECURRENT, "--init", "--vocab", "--n-head", "--n-embd", "--block-size", "--n-prelude", "--n-core",
                       "--n-coda", "--mean-iterations", "--backprop-depth"), "--init", ckpt],
             "--method recurrent trains a recurrent-depth model, not a GPT"))
    cases = [(["train.py", *args, "--data-dir", tiny["data"], "--out-dir", tiny["root"] / "out-refused"], expected)
             for args, expected in cases]
    cases += [(["evaluate.py", *args], expected) for args, expected in (
        ([tiny["run"], "--iterations", "2"], "--iterations: a coconut model has no loop"),
        ([tiny["run"], "--exit", "head"], "has no stop head (train.py --stop-head trains one)"),
        ([tiny["run"], "--exit-threshold", "0.1"], "--exit-threshold is the threshold of --exit kl"),
        ([tiny["run"], "--exit", "kl", "--n-thoughts", "1"], "--exit decides the number of thoughts"))]
    for (args, expected), r in zip(cases, run_all([args for args, _ in cases])):
        assert r.returncode == 1 and expected in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr[-2000:])
    assert not os.path.exists(tiny["root"] / "out-refused")
