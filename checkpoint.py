"""
Checkpoints in and out: every format a model comes in, turned into a GPT and its vocabulary.

What it reads, by what it finds (load_model; evaluate.load_run makes a model ready to answer of it):
- a run of train.py: a run folder (its best.pt) or any .pt it wrote (ckpt.pt, best.pt), which
  carries the model, its vocabulary, the curriculum flags and the stage it was trained at, and,
  for ckpt.pt, what a resumed run needs (optimizer, RNG states: rng_state);
- GPT-2 weights: OpenAI's by name (gpt2 ... gpt2-xl), a Hugging Face folder, or a weights file,
  such as the state dicts the official code saves (official_tensors); these do not say their
  method and dataset, which load_run must be told.
What it writes: our checkpoints, atomically (save_checkpoint), and a model in the Hugging Face
layout (export_hf; `python checkpoint.py RUN --export DIR`). Which run folders train.py may write
in, and which checkpoint it resumes from, are decided here too (check_run_folders, resume_checkpoint).
Every file is loaded with torch.load(weights_only=True): loading a checkpoint never runs code.
"""

import json
import os
import pickle
import random
import shutil
import zipfile

import torch

from common import ArgumentParser, InputError, check_output, errors_in_one_line, flag, nonempty, write_atomic
from config import RUNTIME_FLAGS
from data import EOS, N_VOCAB, SPECIAL_TOKENS, Vocab, bpe_dir, encode
from model import GPT, HUB_MODELS, WEIGHT_FILES, GPTConfig, WeightsUnavailable, fetch_from_hub, read_gpt2_weights
from recurrent import RecurrentConfig, RecurrentGPT


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the file."""


class UnknownRecipe(CheckpointError):
    """GPT-2 weights trained elsewhere, whose method or dataset was not given (missing: which)."""

    def __init__(self, message, missing):
        super().__init__(message)
        self.missing = missing


class WrongMethod(CheckpointError):
    """Weights that cannot be the method they were said to be."""


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


def check_run_folders(chain):
    """Before any work, for the runs of train.py's flags (each link of a chain: config.get_chain):
    never overwrite a run without --resume, and resume only what can be. A run killed in its first
    epoch (no ckpt.pt, no log.jsonl yet) starts again, as does a link of a chain not yet reached;
    a folder that lost its ckpt.pt but has a log is refused rather than overwritten."""
    runs = [os.path.join(args.out_dir, m) for args in chain for m in args.methods]
    resume, out_dir = chain[-1].resume, chain[-1].out_dir
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


def resume_checkpoint(run_dir, flags, data):
    """The checkpoint of the run to resume (None for a new run), if it was trained with the same
    flags (but RUNTIME_FLAGS) on the same data, compared by content: the files may have moved."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None
    ckpt = read_checkpoint(path)
    changed = [k for k, v in flags.items() if k not in RUNTIME_FLAGS and ckpt["args"].get(k) != v]
    if changed:
        raise CheckpointError(f"{path} was trained with different settings: " + ", ".join(
            f"{flag(k)} {ckpt['args'].get(k)} (now {flags[k]})" for k in changed))
    for split, d in data.items():
        if ckpt["data"][split] != d["sha256"]:
            raise CheckpointError(f"{d['path']} is not the {split} data that {path} was trained on")
    return ckpt


def runs_in(folder):
    """The run folders (those with a best.pt) directly inside folder, by name."""
    return sorted(os.path.join(folder, d) for d in os.listdir(folder)
                  if os.path.exists(os.path.join(folder, d, "best.pt")))


def best_checkpoint(folder):
    """A run folder's best.pt; an output folder of several runs is pointed at its runs."""
    if os.path.exists(os.path.join(folder, "best.pt")):
        return os.path.join(folder, "best.pt")
    runs = runs_in(folder)
    if runs:
        raise CheckpointError(f"{folder} holds the runs {', '.join(map(os.path.basename, runs))}: pass one of "
                              f"them, e.g. {runs[0]}")
    raise CheckpointError(f"{folder}: no best.pt here, nor Hugging Face weights (not a run folder?)")


def official_tensors(raw):
    """The official code's state dicts in the Hugging Face layout model.py reads, and whether the
    file is its Coconut: that one wraps GPT2LMHeadModel as "base_causallm." and keeps a second
    handle on the token embedding as "embedding.weight"; saved from DDP, every key is behind
    "module." (outside Coconut's prefix, so it is stripped first)."""
    keys = {k: k.removeprefix("module.") for k in raw}
    official = any(k.startswith("base_causallm.") for k in keys.values())
    tensors = {k.removeprefix("base_causallm."): raw[old] for old, k in keys.items()}
    tensors.pop("embedding.weight", None)  # the same tensor as wte
    return tensors, official


def load_model(path, dropout=0.0):
    """(gpt, vocab, ckpt) from any checkpoint. Ours comes with its checkpoint dict. GPT-2 weights
    come with dict(official=..., vocab_size=...): whether the file is the official code's Coconut,
    and the vocabulary it had before Coconut's three tokens were added (as copies of "<<", as in
    the official code) where they were missing."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES):
        path = best_checkpoint(path)
    try:
        if path in HUB_MODELS or os.path.isdir(path) or path.endswith(".safetensors"):
            raw, config_path = read_gpt2_weights(path)
        else:
            raw, config_path = read_checkpoint(path), os.path.join(os.path.dirname(path), "config.json")
            config_path = config_path if os.path.exists(config_path) else None
            if "model_args" in raw:  # ours: a GPT, or a recurrent-depth one
                recurrent = "n_core" in raw["model_args"]
                config = (RecurrentConfig if recurrent else GPTConfig)(**dict(raw["model_args"], dropout=dropout))
                gpt = (RecurrentGPT if recurrent else GPT)(config)
                gpt.load_state_dict(raw["model"])
                return gpt, Vocab(raw["vocab"]), raw
        raw, official = official_tensors(raw)
        gpt = GPT.from_state_dict(raw, path, config_path, override_args=dict(dropout=dropout))
    except CheckpointError:  # already says what is wrong
        raise
    except (WeightsUnavailable, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # not GPT-2's tensors, or not all of them
        raise CheckpointError(f"{path}: not a GPT-2 checkpoint we can read ({str(e).splitlines()[0]})") from None
    info = dict(official=official, vocab_size=gpt.config.vocab_size)
    if gpt.config.vocab_size not in (50257, N_VOCAB):
        raise CheckpointError(f"{path} has a vocabulary of {gpt.config.vocab_size} tokens; Coconut needs "
                              f"GPT-2's 50257 (grown here to {N_VOCAB})")
    gpt.grow_vocab(N_VOCAB, init_from_id=encode("<<")[0])
    return gpt, Vocab(), info


def fetch_weights(name):
    """OpenAI's weights into the Hugging Face cache, once; or a clear error."""
    try:
        return fetch_from_hub(name)
    except WeightsUnavailable as e:
        raise CheckpointError(str(e)) from None


def check_method(path, info, curriculum):
    """A method must fit the weights: the official code wraps only its Coconut models (thoughts
    fed back, 50260 tokens); its CoT, No-CoT and w/o-thought models stay plain GPT-2 with 50257
    tokens, without the <|latent|> token that thoughts need."""
    if info["official"] and not (curriculum.markers and curriculum.feedback):
        raise WrongMethod(f"{path} is the official code's Coconut (keys base_causallm.*), a model with "
                          f"thoughts: it is a coconut model")
    if curriculum.markers and info["vocab_size"] < N_VOCAB:
        raise WrongMethod(f"{path} has {info['vocab_size']} tokens, no <|latent|>: a model without "
                          f"thoughts (cot, no-cot or no-thoughts)")


def export_hf(path, folder):
    """Write the model of any checkpoint as a Hugging Face GPT-2 folder, which
    transformers.GPT2LMHeadModel.from_pretrained(folder) loads with the same logits: config.json,
    model.safetensors, GPT-2's tokenizer files with Coconut's three tokens (50260 in all) and a
    note on them. A model with a data vocabulary cannot be one: its token ids are not GPT-2's."""
    from safetensors.torch import save_file
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise CheckpointError(f"{folder}: exists and is not an empty folder; export into a new one")
    gpt, vocab, _ = load_model(path)
    if isinstance(gpt, RecurrentGPT) or gpt.config.stop_head:
        what = "a recurrent-depth model" if isinstance(gpt, RecurrentGPT) else "a model with a stop head"
        raise CheckpointError(f"{path} is {what}, which GPT-2's layout has no place for: no Hugging Face export")
    if vocab.ids is not None:
        raise CheckpointError(f"{path} was trained with --vocab data: it knows {vocab.size} of GPT-2's "
                              f"tokens, under ids of its own, so it cannot be a GPT-2 checkpoint")
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
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot be made ({e.strerror or e})") from None
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
    except OSError as e:  # no space left, no permission: the user's to fix
        raise CheckpointError(f"{folder}: could not be written ({e.strerror or e}: {e.filename})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {folder}: a Hugging Face GPT-2, {gpt.get_num_params() / 1e6:.1f}M parameters, "
          f"{c.vocab_size} tokens")


EXPORT_NOTE = """# A Coconut model in the Hugging Face GPT-2 layout

Exported from {source} by coconut's `python checkpoint.py RUN --export DIR`.

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


def main(argv=None):
    p = ArgumentParser(description="Write a trained model as a Hugging Face GPT-2 folder.")
    p.add_argument("run", type=nonempty, help="a run folder or checkpoint (ours, or the official code's)")
    p.add_argument("--export", type=nonempty, metavar="DIR", required=True,
                   help="a new folder for the Hugging Face files")
    args = p.parse_args(argv)
    with errors_in_one_line():
        check_output(args.export, "--export", new=False)
        export_hf(args.run, args.export)


if __name__ == "__main__":
    main()
