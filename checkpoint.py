"""
Checkpoints in and out: the one loader that turns any checkpoint into a model ready to answer.

Flow of the repository: data -> model -> coconut -> checkpoint -> train -> sample -> analyze.

It also keeps a run folder safe (never overwritten, resumed only as itself), holds what a
checkpoint saves besides weights (the RNG states), checks that questions fit a model (check_fits)
and writes a model out in the Hugging Face layout (export_hf). What it reads, by what it finds:
- a run of train.py: a run folder (its best.pt) or any .pt it wrote (ckpt.pt, best.pt), which
  carries the model, its vocabulary, the curriculum flags and the stage it was trained at;
- GPT-2 weights: OpenAI's by name (gpt2 ... gpt2-xl), a Hugging Face folder, or a weights file,
  such as the state dicts the official code saves (its Coconut's keys behind "base_causallm.");
  these do not say their method and dataset, which load_run must be told.
Every file is loaded with torch.load(weights_only=True): loading a checkpoint never runs code.
"""

import argparse
import json
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import dataclass

import torch

from coconut import Coconut, Curriculum, Vocab, build_example
from data import (EOS, N_VOCAB, PAPER_RECIPE, SPECIAL_TOKENS, DataError, bpe_dir, decode, encode, read_records,
                  tokenize_record, write_atomic)
from model import GPT, HUB_MODELS, WEIGHT_FILES, GPTConfig, WeightsUnavailable, read_gpt2_weights


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
    """Before any work: never overwrite a run without --resume, and resume only what can be. A run
    killed in its first epoch (no ckpt.pt, no log.jsonl yet) starts again; a folder that lost its
    ckpt.pt but has a log is refused rather than overwritten."""
    runs = [os.path.join(out_dir, m) for m in methods]
    for run_dir in runs:
        kept = [f for f in ("ckpt.pt", "best.pt", "log.jsonl") if os.path.exists(os.path.join(run_dir, f))]
        if kept and not resume:
            raise CheckpointError(f"{run_dir} already holds a run: pass --resume to continue it, or "
                                  f"choose another --out-dir")
        if "log.jsonl" in kept and "ckpt.pt" not in kept:
            raise CheckpointError(f"{run_dir} holds {' and '.join(kept)} but no ckpt.pt to resume from: "
                                  f"move it away, or choose another --out-dir")
    started = ("ckpt.pt", "args.json")  # args.json is written when a run starts
    if resume and not any(os.path.exists(os.path.join(d, f)) for d in runs for f in started):
        raise CheckpointError(f"--resume: no run to resume in {out_dir} (no <method>/ckpt.pt there)")


def pick_device(name):
    """--device as torch names it: auto is cuda, then mps, then cpu; others must exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CheckpointError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if (device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
            or device.type == "mps" and not torch.backends.mps.is_available()):
        raise CheckpointError(f"--device {name}: not available on this machine")
    return name


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


def runs_in(folder):
    """The run folders (those with a best.pt) directly inside folder, by name."""
    return sorted(os.path.join(folder, d) for d in os.listdir(folder) if os.path.exists(os.path.join(folder, d, "best.pt")))


def best_checkpoint(folder):
    """A run folder's best.pt; an output folder of several runs is pointed at its runs."""
    if os.path.exists(os.path.join(folder, "best.pt")):
        return os.path.join(folder, "best.pt")
    runs = runs_in(folder)
    if runs:
        raise CheckpointError(f"{folder} holds the runs {', '.join(map(os.path.basename, runs))}: pass one of "
                              f"them, e.g. {runs[0]}")
    raise CheckpointError(f"{folder}: no best.pt here, nor Hugging Face weights (not a run folder?)")


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
    """(gpt, vocab, ckpt) from any checkpoint. Ours comes with its checkpoint dict. GPT-2 weights
    come with dict(official=..., vocab_size=...): whether the file is the official code's Coconut
    (keys "base_causallm.*"), and the vocabulary it had before Coconut's three tokens were added
    (as copies of "<<", as in the official code) where they were missing."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES):
        path = best_checkpoint(path)
    try:
        if path in HUB_MODELS or os.path.isdir(path) or path.endswith(".safetensors"):
            raw, config_path = read_gpt2_weights(path)
        else:
            raw, config_path = read_checkpoint(path), os.path.join(os.path.dirname(path), "config.json")
            config_path = config_path if os.path.exists(config_path) else None
            if "model_args" in raw:  # ours
                gpt = GPT(GPTConfig(**dict(raw["model_args"], dropout=dropout)))
                gpt.load_state_dict(raw["model"])
                return gpt, Vocab(raw["vocab"]), raw
        gpt = GPT.from_state_dict(raw, path, config_path, override_args=dict(dropout=dropout))
    except (WeightsUnavailable, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # not GPT-2's tensors, or not all of them
        raise CheckpointError(f"{path}: not a GPT-2 checkpoint we can read ({str(e).splitlines()[0]})") from None
    info = dict(official=any(k.removeprefix("module.").startswith("base_causallm.") for k in raw),
                vocab_size=gpt.config.vocab_size)
    if gpt.config.vocab_size not in (50257, N_VOCAB):
        raise CheckpointError(f"{path} has a vocabulary of {gpt.config.vocab_size} tokens; Coconut needs "
                              f"GPT-2's 50257 (grown here to {N_VOCAB})")
    gpt.grow_vocab(N_VOCAB, init_from_id=encode("<<")[0])
    return gpt, Vocab(), info


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
    args: argparse.Namespace  # the flags it was trained with (for other checkpoints: the paper's)
    path: str
    epoch: int  # None for checkpoints not written by train.py


def load_run(path, device="cpu", method=None, dataset=None):
    """A trained model ready to answer: a run of train.py (a checkpoint, or a run folder: its
    best.pt), which knows its method and dataset; or GPT-2 weights trained elsewhere (the official
    code's state dicts), for which method and dataset must be given. Those answer at the last
    stage of the paper's curriculum for the dataset, as the official evaluation does."""
    device = pick_device(device)
    gpt, vocab, ckpt = load_model(path)
    if "model_args" in ckpt:  # a run says what it is; a method or dataset given must agree
        args, epoch = argparse.Namespace(**ckpt["args"]), ckpt["epoch"]
        for asked, trained in ((method, args.method), (dataset, args.dataset)):
            if asked not in (None, trained):
                raise CheckpointError(f"{path} was trained by train.py as {args.method} on {args.dataset}, "
                                      f"not {asked}")
        path = path if os.path.isfile(path) else best_checkpoint(path)
    else:
        missing = " and ".join(flag for flag, given in (("--method", method), ("--dataset", dataset)) if not given)
        if missing:
            raise CheckpointError(f"{path}: a GPT-2 state dict does not say what it was trained for: pass "
                                  f"{missing} (e.g. --method coconut --dataset prosqa)")
        args, epoch = argparse.Namespace(method=method, dataset=dataset, test_file=None, uniform_prob=0.0,
                                         **PAPER_RECIPE[dataset]), None
    curriculum = curriculum_of(args, args.method)
    if "model_args" not in ckpt:
        check_method(path, ckpt, curriculum)
    stage = ckpt["stage"] if "model_args" in ckpt else curriculum.stages[-1]
    model = Coconut(gpt.to(device), vocab, feedback=curriculum.feedback).eval()
    return Run(model, curriculum, stage, args, path, epoch)


def check_method(path, info, curriculum):
    """A --method must fit the weights: the official code wraps only its Coconut models
    (thoughts fed back, 50260 tokens); its CoT, No-CoT and w/o-thought models stay plain GPT-2
    with 50257 tokens, without the <|latent|> token that thoughts need."""
    if info["official"] and not (curriculum.markers and curriculum.feedback):
        raise CheckpointError(f"--method {curriculum.method}: {path} is the official code's Coconut "
                              f"(keys base_causallm.*), a model with thoughts: pass --method coconut")
    if curriculum.markers and info["vocab_size"] < N_VOCAB:
        raise CheckpointError(f"--method {curriculum.method}: {path} has {info['vocab_size']} tokens, no "
                              f"<|latent|>: a model without thoughts (cot, no-cot or no-thoughts)")


def check_fits(tokens, path, curriculum, stages, block_size, vocab, n_thoughts=()):
    """Every record must fit the context at every stage it will see (and its prompt with each of
    n_thoughts thoughts, leaving room for an answer), in tokens the model knows."""
    for i, t in enumerate(tokens):
        n = max(len(build_example(t, curriculum, s)["input_ids"]) for s in stages)
        if n > block_size:
            raise DataError(f"{path}: record {i} is {n} tokens long, more than the model's context of "
                            f"{block_size} (use a model with a larger --block-size, or shorter examples)")
        for k in n_thoughts:
            n = len(build_example(t, curriculum, stages[0], prompt_only=True, n_thoughts=k)["input_ids"])
            if n >= block_size:
                raise DataError(f"--n-thoughts {k}: the prompt of record {i} of {path} would be {n} tokens, "
                                f"leaving no room for an answer in the model's context of {block_size}")
        unknown = [x for x in t["question"] + sum(t["steps"], []) + t["answer"] if vocab.table[x] < 0]
        if unknown:
            raise DataError(f"{path}: record {i} has the token {decode(unknown[:1])!r}, which this model's "
                            f"vocabulary (--vocab data: the tokens of the files it was trained with) does not hold")


def read_questions(run, path, flag, n_thoughts=None, check=None):
    """Records and tokens of a file (the run's test file when path is None), checked to fit the
    run's model, also with each number of thoughts in n_thoughts, and by check(record, where) if
    given. flag: how the user names a file."""
    if path is None:
        path = run.args.test_file
        if path is None:
            raise CheckpointError(f"{run.path} comes without a test file: pass {flag} FILE")
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


def export_hf(path, folder):
    """Write the model of any checkpoint as a Hugging Face GPT-2 folder, which
    transformers.GPT2LMHeadModel.from_pretrained(folder) loads with the same logits: config.json,
    model.safetensors, GPT-2's tokenizer files with Coconut's three tokens (50260 in all) and a
    note on them. A --vocab data model cannot be one: its token ids are not GPT-2's."""
    from safetensors.torch import save_file
    gpt, vocab, _ = load_model(path)
    if vocab.ids is not None:
        raise CheckpointError(f"{path} was trained with --vocab data: it knows {vocab.size} of GPT-2's "
                              f"tokens, under ids of its own, so it cannot be a GPT-2 checkpoint")
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise CheckpointError(f"{folder}: exists and is not an empty folder; export into a new one")
    c = gpt.config
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  activation_function="gelu_new",  # the tanh approximation, as model.MLP
                  layer_norm_epsilon=1e-5, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=EOS,
                  eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=True)
    added = {name: i for name, i in SPECIAL_TOKENS.items() if i != EOS}
    files = {"config.json": json.dumps(config, indent=1), "added_tokens.json": json.dumps(added, indent=1),
             "special_tokens_map.json": json.dumps({k: "<|endoftext|>" for k in ("bos_token", "eos_token",
                                                                                 "unk_token", "pad_token")}),
             "tokenizer_config.json": json.dumps(dict(tokenizer_class="GPT2Tokenizer",
                                                      model_max_length=c.block_size)),
             "README.md": EXPORT_NOTE.format(source=os.path.abspath(path))}
    tmp = f"{folder.rstrip(os.sep)}.{os.getpid()}.tmp"  # all files, then one rename: never half a folder
    os.makedirs(tmp)
    try:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        for name, ours in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
            shutil.copyfile(os.path.join(bpe_dir(), ours), os.path.join(tmp, name))
        save_file(gpt.hf_state_dict(), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {folder}: a Hugging Face GPT-2, {gpt.get_num_params() / 1e6:.1f}M parameters, "
          f"{c.vocab_size} tokens")


EXPORT_NOTE = """# A Coconut model in the Hugging Face GPT-2 layout

Exported from {source} by coconut's `python train.py --export`.

    from transformers import GPT2LMHeadModel, GPT2Tokenizer
    model = GPT2LMHeadModel.from_pretrained(this_folder)
    tokenizer = GPT2Tokenizer.from_pretrained(this_folder)

The vocabulary is GPT-2's 50257 tokens and Coconut's three, with the official code's ids:
`<|start-latent|>` 50257 and `<|end-latent|>` 50258 mark where thoughts begin and end, and
`<|latent|>` 50259 is a thought's slot. A plain `generate` treats a slot as an ordinary token: a
continuous thought replaces the slot's input embedding with the last hidden state of the position
before it, so thoughts need Coconut's forward (coconut.py, or the official Coconut wrapper, which
loads these weights). Padding and end of text are `<|endoftext|>` 50256.
"""
