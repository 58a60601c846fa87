"""
Tests of checkpoint.py's checkpoints in and out: models saved the way the official code's run.py
saves them, and the export to the Hugging Face layout.

Run: python -m pytest -q tests/test_checkpoint.py      (under a minute on 2 CPU cores)

The official files are built here from one of our models, with the official key names (the
official Coconut wraps transformers' GPT2LMHeadModel as base_causallm and keeps a second handle
on its token embedding as embedding.weight); the reference is the model they came from.
transformers is not needed; where it is installed, the exported folder is also loaded there.
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import CheckpointError, export_hf, load_model  # noqa: E402
from conftest import run_all, run_script  # noqa: E402
from evaluate import load_run  # noqa: E402
from coconut import Coconut, Curriculum, build_example, collate  # noqa: E402
from data import LATENT, Vocab, make_splits, tokenize_record  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from reference import official_generate  # noqa: E402

# GPT-2's own width, so that the head count follows from the tensors (official files carry no config)
SIZE = dict(n_layer=1, n_head=12, n_embd=768, block_size=128)


def source_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, **SIZE)).eval()


def official_state_dict(gpt, layout, dtype=torch.float32):
    """gpt's weights as the official run.py saves them: a plain GPT2LMHeadModel (CoT, No-CoT) or
    the Coconut wrapper; with the causal-mask buffers older transformers versions kept."""
    sd = {k: v.to(dtype) for k, v in gpt.hf_state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    for i in range(gpt.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, SIZE["block_size"], SIZE["block_size"]))
    if layout in ("coconut", "ddp-coconut"):
        sd = {"base_causallm." + k: v for k, v in sd.items()}
        sd["embedding.weight"] = sd["base_causallm.transformer.wte.weight"]
    if layout == "ddp-coconut":  # saved from a DistributedDataParallel wrapper
        sd = {"module." + k: v for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("layout", ["plain", "coconut", "ddp-coconut"])
@pytest.mark.parametrize("vocab_size", [50257, 50260])
def test_official_checkpoints_load_to_the_same_logits(tmp_path, layout, vocab_size):
    gpt = source_model(vocab_size)
    path = str(tmp_path / "checkpoint_5")  # run.py's file name, no extension
    torch.save(official_state_dict(gpt, layout), path)
    loaded, vocab, info = load_model(path)
    assert info == dict(official=layout != "plain", vocab_size=vocab_size)
    assert loaded.config.vocab_size == 50260 and vocab.ids is None  # Coconut's three tokens added
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = gpt(idx)[0], loaded.eval()(idx)[0]
    torch.testing.assert_close(got[..., :vocab_size], expected, atol=1e-5, rtol=1e-5)


def test_bf16_official_checkpoint_loads(tmp_path):
    gpt = source_model(50260)
    torch.save(official_state_dict(gpt, "coconut", torch.bfloat16), str(tmp_path / "bf16"))
    loaded = load_model(str(tmp_path / "bf16"))[0]
    assert loaded.transformer.wte.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.transformer.wte.weight, gpt.transformer.wte.weight.bfloat16().float())


def test_official_coconut_answers_as_the_official_generate(tmp_path):
    """The prompt layout and the greedy tokens of the official code, thoughts included."""
    gpt = source_model(50260, seed=3)
    torch.save(official_state_dict(gpt, "coconut"), str(tmp_path / "checkpoint_50"))
    run = load_run(str(tmp_path / "checkpoint_50"), method="coconut", dataset="prosqa")
    assert run.stage == 7 and run.curriculum.max_latent_stage == 6  # the paper's last ProsQA stage
    record = dict(question="Tom is a wumpus. Every wumpus is a yumpus. Is Tom a yumpus or zumpus?",
                  steps=["Tom is a wumpus.", "Every wumpus is a yumpus."], answer="Tom is a yumpus.")
    prompt = build_example(tokenize_record(record), run.curriculum, run.stage, prompt_only=True)["input_ids"]
    assert prompt.count(LATENT) == 6
    answer = run.model.generate(**collate([{"input_ids": prompt}], for_generation=True), max_new_tokens=6)[0]
    assert answer == official_generate(gpt, prompt, 6)


def test_exported_folder_loads_back_to_the_same_logits(tmp_path):
    gpt = source_model(50260, seed=4)
    torch.save(official_state_dict(gpt, "coconut"), str(tmp_path / "checkpoint_1"))
    out = str(tmp_path / "hf")
    export_hf(str(tmp_path / "checkpoint_1"), out)
    assert sorted(os.listdir(out)) == ["README.md", "added_tokens.json", "config.json", "merges.txt",
                                       "model.safetensors", "special_tokens_map.json", "tokenizer_config.json",
                                       "vocab.json"]
    with open(os.path.join(out, "added_tokens.json")) as f:
        assert json.load(f) == {"<|start-latent|>": 50257, "<|end-latent|>": 50258, "<|latent|>": 50259}
    # GPT-2's tokenizer files under Hugging Face's names: the encoder (token -> id) and the merges
    with open(os.path.join(out, "vocab.json")) as f:
        encoder = json.load(f)
    assert len(encoder) == 50257 and encoder["<|endoftext|>"] == 50256 and encoder["Every"] == 6109
    with open(os.path.join(out, "merges.txt")) as f:
        assert f.readline().startswith("#version") and f.readline() == "\u0120 t\n"
    idx = torch.randint(0, 50260, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = gpt(idx)[0]
        torch.testing.assert_close(GPT.from_pretrained(out).eval()(idx)[0], expected, atol=1e-5, rtol=1e-5)
    try:
        import transformers
    except ImportError:
        return
    with torch.no_grad():
        theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()(idx).logits
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Official-format CoT (plain, 50257 tokens) and Coconut (wrapper) files, and a small test file."""
    root = tmp_path_factory.mktemp("official")
    make_splits("prosqa", str(root / "data"), seed=4, sizes=dict(train=2, valid=2, test=6), max_nodes=6,
                min_steps=1, max_steps=2)
    torch.save(official_state_dict(source_model(50257, seed=5), "plain"), str(root / "cot_checkpoint"))
    torch.save(official_state_dict(source_model(50260, seed=6), "coconut"), str(root / "coconut_checkpoint"))
    return dict(root=root, test=str(root / "data" / "test.json"), cot=str(root / "cot_checkpoint"),
                coconut=str(root / "coconut_checkpoint"))


def test_eval_sample_and_analyze_take_official_checkpoints(official):
    predictions = str(official["root"] / "predictions.jsonl")
    r = run_script("evaluate.py", official["coconut"], "--method", "coconut", "--dataset", "prosqa",
                   "--file", official["test"], "--n-thoughts", "0,6", "--max-new-tokens", "4",
                   "--predictions", predictions)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "k=0  accuracy" in r.stdout and "k=6  accuracy" in r.stdout
    with open(predictions) as f:
        rows = [json.loads(line) for line in f]
    with open(official["test"]) as f:
        records = json.load(f)
    assert [(row["k"], row["index"]) for row in rows] == [(k, i) for k in (0, 6) for i in range(6)]
    for row in rows:
        assert row["question"] == records[row["index"]]["question"] and row["answer"] == records[row["index"]]["answer"]
        assert isinstance(row["output"], str) and "<|" not in row["output"] and row["correct"] in (True, False)
    r = run_script("evaluate.py", official["cot"], "--method", "cot", "--dataset", "prosqa",
                   "--file", official["test"], "--max-new-tokens", "4", "--predictions",
                   str(official["root"] / "cot.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(official["root"] / "cot.jsonl") as f:
        assert "k" not in json.loads(f.readline())
    r = run_script("sample.py", official["coconut"], "--method", "coconut", "--dataset", "prosqa",
                   "--file", official["test"], "--num", "1", "--max-new-tokens", "4")
    assert r.returncode == 0 and "thought 6: nodes" in r.stdout, r.stderr[-3000:]
    r = run_script("analyze.py", official["coconut"], "--method", "coconut", "--file", official["test"],
                   "--n-thoughts", "0,1,2", "--max-new-tokens", "4", "--out", str(official["root"] / "analysis"))
    assert r.returncode == 0 and "| k=2 |" in r.stdout, r.stderr[-3000:]


def test_training_starts_from_an_official_checkpoint(official, tmp_path):
    """--init takes the official CoT model (50257 tokens) as the start of a Coconut run: the three
    new tokens are added as copies of "<<", every other weight is the checkpoint's."""
    out = str(tmp_path / "out")
    r = run_script("train.py", "--init", official["cot"], "--method", "coconut", "--stage", "1", "--epochs-per-stage",
                   "1", "--data-dir", os.path.dirname(official["test"]), "--out-dir", out, "--batch-size", "2",
                   "--micro-batch-size", "2", "--learning-rate", "1e-12", "--max-new-tokens", "2", "--dropout", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    trained = torch.load(os.path.join(out, "coconut", "ckpt.pt"), weights_only=True)["model"]
    source = official_state_dict(source_model(50257, seed=5), "plain")
    wte = trained["transformer.wte.weight"]
    torch.testing.assert_close(wte[:50257], source["transformer.wte.weight"], atol=1e-8, rtol=1e-4)
    torch.testing.assert_close(wte[50257:], wte[[16791] * 3])  # "<<" is token 16791


def test_bad_checkpoints_and_flags_are_refused(official, tmp_path):
    other = str(tmp_path / "other.pt")
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 3)}, other)
    missing = str(tmp_path / "missing.pt")
    sd = official_state_dict(source_model(50257, seed=7), "plain")
    del sd["transformer.h.0.mlp.c_fc.weight"]
    torch.save(sd, missing)
    full = [official["coconut"], "--method", "coconut", "--dataset", "prosqa", "--file", official["test"]]
    cases = [
        (["evaluate.py", official["coconut"], "--file", official["test"]], "pass --method and --dataset"),
        (["evaluate.py", official["coconut"], "--method", "cot", "--dataset", "prosqa"],
         "--method cot: " + official["coconut"] + " is the official code's Coconut"),
        (["evaluate.py", official["cot"], "--method", "coconut", "--dataset", "prosqa"],
         "has 50257 tokens, no <|latent|>"),
        (["evaluate.py", other, "--method", "cot", "--dataset", "prosqa"], "other.pt: not a GPT-2 checkpoint"),
        (["evaluate.py", missing, "--method", "cot", "--dataset", "prosqa"], "mlp.c_fc.weight"),
        (["evaluate.py", *full, "--predictions", official["test"]], "exists already"),
        (["sample.py", official["coconut"], "--file", official["test"]], "pass --method and --dataset"),
        (["analyze.py", official["coconut"], "--file", official["test"]], "pass --method (e.g."),
        (["checkpoint.py", official["coconut"], "--export", official["root"] / "data"], "not an empty folder"),
        (["checkpoint.py", official["coconut"], "--export", str(tmp_path / "x"), "--method", "coconut"],
         "unrecognized arguments: --method"),
        (["evaluate.py", official["coconut"], "--method", "foo", "--dataset", "prosqa"], "--method: invalid choice"),
        (["evaluate.py", *full, "--predictions", os.path.join(official["test"], "p.jsonl")],
         "is not a folder that can be written in"),  # refused before the questions are answered
        (["evaluate.py", *full, "--predictions", ""], "--predictions: must not be empty"),
        (["sample.py", *full, "--question", " "], "--question: must not be empty"),
        (["evaluate.py", "--method", "cot", "--dataset", "prosqa", str(tmp_path / "nothing.pt")],
         f"error: {tmp_path / 'nothing.pt'}: no such checkpoint file\n"),  # named once
        (["checkpoint.py", official["coconut"], "--export", os.path.join(official["test"], "sub")],
         "is not a folder that can be written in"),
        (["checkpoint.py", official["coconut"], "--export", ""], "--export: must not be empty"),
    ]
    before = sorted(os.listdir(official["root"] / "data"))
    for (args, expected), r in zip(cases, run_all([args for args, _ in cases])):
        assert r.returncode == 1 and expected in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert sorted(os.listdir(official["root"] / "data")) == before
    assert not os.path.exists(tmp_path / "x")


def test_a_data_vocabulary_model_is_not_exported(tmp_path):
    gpt = GPT(GPTConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=16, block_size=32))
    ckpt = dict(model=gpt.state_dict(), model_args=dict(vocab_size=10, n_layer=1, n_head=2, n_embd=16,
                                                        block_size=32, dropout=0.0, bias=True),
                vocab=list(range(6)) + [50256, 50257, 50258, 50259])
    torch.save(ckpt, str(tmp_path / "best.pt"))
    assert Vocab(ckpt["vocab"]).size == 10
    with pytest.raises(CheckpointError, match="--vocab data"):
        export_hf(str(tmp_path / "best.pt"), str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def test_the_loaded_model_is_a_coconut_with_the_paper_recipe(official):
    run = load_run(official["cot"], method="cot", dataset="prosqa")
    assert isinstance(run.model, Coconut) and run.curriculum == Curriculum(method="cot", c=1, max_latent_stage=6,
                                                                           epochs_per_stage=5)
    assert run.args.max_new_tokens == 128 and run.epoch is None


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A write killed halfway (here torch.save raising after a few bytes) leaves the previous
    checkpoint whole under its name, and no temporary file behind."""
    from checkpoint import read_checkpoint, save_checkpoint
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(dict(epoch=1, weights=torch.ones(3)), path)

    def killed_halfway(obj, f):
        f = open(f, "wb") if isinstance(f, str) else f
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(dict(epoch=2, weights=torch.zeros(3)), path)
    monkeypatch.undo()
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
