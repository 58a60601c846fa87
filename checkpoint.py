"""
Checkpoints in and out: the one loader that turns any checkpoint into a model ready to answer.

Flow of the repository: data -> model -> coconut -> checkpoint -> train -> sample.

It also keeps a run folder safe (never overwritten, resumed only as itself) and holds what a
checkpoint saves besides weights (the RNG states). What it reads, by what it finds:
- a run of train.py: a run folder (its best.pt) or any .pt it wrote (ckpt.pt, best.pt), which
  carries the model, its vocabulary, the curriculum flags and the stage it was trained at;
- GPT-2 weights: OpenAI's by name (gpt2 ... gpt2-xl), a Hugging Face folder, or a weights file.
Every file is loaded with torch.load(weights_only=True): loading a checkpoint never runs code.
"""

import argparse
import os
import pickle
import random
import zipfile
from dataclasses import dataclass

import torch

from coconut import Coconut, Curriculum, Vocab, check_fits
from data import N_VOCAB, encode, read_records, tokenize_record, write_atomic
from model import GPT, HUB_MODELS, GPTConfig, WeightsUnavailable


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def rng_state():
    """The generators a run draws from (dropout, data order, --uniform-prob), in types that
    torch.load(weights_only=True) reads back: tuples of ints and byte tensors."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def check_run_folders(out_dir, methods, resume):
    """Before any work: never overwrite a run (without --resume), never resume nothing."""
    runs = [os.path.join(out_dir, m) for m in methods]
    for run_dir in runs:
        kept = [f for f in ("ckpt.pt", "best.pt", "log.jsonl") if os.path.exists(os.path.join(run_dir, f))]
        if kept and not resume:
            raise CheckpointError(f"{run_dir} already holds a run: pass --resume to continue it, or "
                                  f"choose another --out-dir")
        if kept and "ckpt.pt" not in kept:
            raise CheckpointError(f"{run_dir} holds {' and '.join(kept)} but no ckpt.pt to resume from: "
                                  f"move it away, or choose another --out-dir")
    if resume and not any(os.path.exists(os.path.join(d, "ckpt.pt")) for d in runs):
        raise CheckpointError(f"--resume: no run to resume in {out_dir} (no <method>/ckpt.pt there)")


def read_checkpoint(path):
    """A file written by torch.save, as a dict, loaded without running any code it may carry."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds Python objects besides tensors and plain values, which "
                              f"are not loaded (a checkpoint written by train.py holds none)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint")
    return ckpt


def best_checkpoint(folder):
    """A run folder's best.pt; an output folder of several runs is pointed at its runs."""
    if os.path.exists(os.path.join(folder, "best.pt")):
        return os.path.join(folder, "best.pt")
    runs = sorted(d for d in os.listdir(folder) if os.path.exists(os.path.join(folder, d, "best.pt")))
    if runs:
        raise CheckpointError(f"{folder} holds the runs {', '.join(runs)}: pass one of them, e.g. "
                              f"{os.path.join(folder, runs[0])}")
    raise CheckpointError(f"{folder}: no best.pt here, nor a Hugging Face config.json (not a run folder?)")


def resume_checkpoint(run_dir, run_args, data, may_differ):
    """The checkpoint of the run to resume (None for a new run), if it was trained with the same
    flags (but those in may_differ) on the same data, compared by content: the files may have moved."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None
    ckpt = read_checkpoint(path)
    changed = [k for k, v in run_args.items() if k not in may_differ and ckpt["args"].get(k) != v]
    if changed:
        raise CheckpointError(f"{path} was trained with different settings: " + ", ".join(
            f"--{k.replace('_', '-')} {ckpt['args'].get(k)} (now {run_args[k]})" for k in changed))
    for split, d in data.items():
        if ckpt["data"][split] != d["sha256"]:
            raise CheckpointError(f"{d['path']} is not the {split} data that {path} was trained on")
    return ckpt


def load_model(path, dropout=0.0):
    """(gpt, vocab, ckpt) from any checkpoint. Ours comes with its checkpoint dict; GPT-2 weights
    with ckpt None, and Coconut's three tokens added as copies of "<<", as in the official code."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        path = best_checkpoint(path)
    ckpt = None
    if path not in HUB_MODELS and not os.path.isdir(path) and not path.endswith(".safetensors"):
        ckpt = read_checkpoint(path)
    if ckpt is not None and "model_args" in ckpt:
        gpt = GPT(GPTConfig(**dict(ckpt["model_args"], dropout=dropout)))
        try:
            gpt.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit its model ({str(e).splitlines()[1].strip()})") from None
        return gpt, Vocab(ckpt["vocab"]), ckpt
    try:  # GPT-2 tensors in the Hugging Face layout
        gpt = GPT.from_pretrained(path, override_args=dict(dropout=dropout))
    except (WeightsUnavailable, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # tensors that are not GPT-2's, a corrupt file, a config.json without sizes
        raise CheckpointError(f"{path}: not a readable GPT-2 checkpoint ({type(e).__name__}: {e})") from None
    if gpt.config.vocab_size not in (50257, N_VOCAB):
        raise CheckpointError(f"{path} has a vocabulary of {gpt.config.vocab_size} tokens; Coconut needs "
                              f"GPT-2's 50257 (grown here to {N_VOCAB})")
    gpt.grow_vocab(N_VOCAB, init_from_id=encode("<<")[0])
    return gpt, Vocab(), None


def curriculum_of(args, method):
    """The curriculum that train.py's flags (or a run's saved flags) describe."""
    return Curriculum(method=method, c=args.c, max_latent_stage=args.max_latent_stage,
                      epochs_per_stage=args.epochs_per_stage, uniform_prob=args.uniform_prob)


@dataclass
class Run:
    """A trained model, ready to answer questions."""
    model: Coconut
    curriculum: Curriculum
    stage: int  # the stage it was trained at last: the layout of its prompts
    args: argparse.Namespace  # the flags it was trained with
    path: str
    epoch: int


def load_run(path, device="cpu"):
    """A run of train.py (a checkpoint, or a run folder: its best.pt), ready to answer."""
    gpt, vocab, ckpt = load_model(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: GPT-2 weights, not a trained run of train.py")
    args = argparse.Namespace(**ckpt["args"])
    curriculum = curriculum_of(args, args.method)
    model = Coconut(gpt.to(device), vocab, feedback=curriculum.feedback)
    path = path if os.path.isfile(path) else best_checkpoint(path)
    return Run(model, curriculum, ckpt["stage"], args, path, ckpt["epoch"])


def read_questions(run, path, flag, n_thoughts=None, check=None):
    """Records and tokens of a file (the run's test file when path is None), checked to fit the
    run's model, also with each number of thoughts in n_thoughts, and by check(record, where) if
    given. flag: how the user names a file."""
    if path is None:
        path = run.args.test_file
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: the run's test file is gone (moved?): pass {flag} FILE")
    if n_thoughts is not None and not run.curriculum.markers:
        raise CheckpointError(f"--n-thoughts: a {run.curriculum.method} model has no thoughts")
    records = read_records(run.args.dataset, path)
    for i, r in enumerate(records):
        if check:
            check(r, f"{path}: record {i}")
    tokens = [tokenize_record(r, i, path) for i, r in enumerate(records)]
    check_fits(tokens, path, run.curriculum, [run.stage], run.model.gpt.config.block_size, run.model.vocab,
               n_thoughts or ())
    return records, tokens
