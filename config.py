"""
The configuration of a training run: the paper's recipe per dataset, the presets, and train.py's
flags, parsed and checked (as nanoGPT keeps configurator.py beside its train.py).

Every flag that would change nothing is refused rather than ignored: which curriculum flags a
method uses is found by asking coconut.py (ignored_flags), not written down a second time.
"""

import argparse
import math
import os
import random
import sys
from dataclasses import fields, replace

from coconut import METHODS, Curriculum, build_example
from common import ArgumentParser, bounded, ddp, flag, given_flags, world
from data import FORMATS, NAMES, OTHER_OPTIONS, PROSQA_DEFAULTS, SPLITS, DataError, check_prosqa_settings
from recurrent import RecurrentConfig

# The paper's training recipe per dataset (Section 4.1 and the official configs): thoughts per
# step, latent stages, epochs, and the greedy decoding budget of its evaluation.
PAPER_RECIPE = {
    "prosqa": dict(c=1, max_latent_stage=6, epochs_per_stage=5, epochs=50, max_new_tokens=128),
    "prontoqa": dict(c=1, max_latent_stage=6, epochs_per_stage=5, epochs=50, max_new_tokens=128),
    "gsm8k": dict(c=2, max_latent_stage=3, epochs_per_stage=3, epochs=25, max_new_tokens=64),
}

# A preset is a chain of runs, trained one after the other: each link a dict of flag defaults, "{out}"
# in them the chain's output folder (--out-dir, or out/<--name or the preset's name>). The flags a
# user gives go to the last link, except CHAIN_FLAGS, which go to every link.
COMPACT_TASK = dict(dataset="prosqa", names="short", other_option="same-depth", max_nodes=7, min_steps=2, max_steps=3,
                    dropout=0.0, batch_size=32, micro_batch_size=16, learning_rate=1e-3, grad_clip=1.0,
                    max_new_tokens=48, eval_batch_size=100)
PRESETS = {
    # The laptop demo (NOTES.md: the sweep). ProsQA graphs of at most 7 nodes whose two options are
    # as far from a person, so that one lookup cannot tell them apart: the answer needs its 2-step
    # chain. Facts are written "X Y ." (--format compact). A 2-layer GPT from scratch does not learn
    # the lookup a step needs from these questions alone; so it first learns it from questions
    # whose answers restate their facts (--format lookup, another data seed), as GPT-2's
    # pretraining stands behind the paper's models, and hands on the epoch of the lowest validation
    # loss (an exact restatement is rarely right, so accuracy ties at 0-2%). Coconut, CoT and No-CoT
    # then start from that model, side by side, a process and a thread each. Coconut's AdamW starts
    # afresh at each stage; a long warm-up after each reset (400 steps, about an epoch) made its
    # latent stage learn on 10 seeds of 10 on one machine, where 50 steps left 3 at chance; on
    # another machine it is still a draw on some seeds (README: when a run does not learn).
    "cpu": [
        dict(COMPACT_TASK, out_dir="{out}/lookup", method="no-cot", init="scratch", vocab="data", n_layer=2, n_head=4,
             n_embd=128, block_size=256, data_dir="data/cpu-lookup", data_seed=7, format="lookup", n_train=26000,
             n_valid=100, n_test=100, epochs=2, warmup_iters=400, best_by="loss", threads=1),
        dict(COMPACT_TASK, out_dir="{out}", init="{out}/lookup/no-cot", method="coconut,cot,no-cot", jobs=3,
             threads=1, data_dir="data/cpu", data_seed=0, format="compact", n_train=12000, n_valid=200, n_test=500,
             c=2, max_latent_stage=2, epochs_per_stage=2, epochs=8, warmup_iters=400),
    ],
}
CHAIN_FLAGS = {"seed", "resume", "device", "dtype", "threads", "compile"}
# Flags a resumed run may change: where things are (a run or its data may move; the data is
# compared by content) and how the machine runs it. Every other flag must match the run's.
RUNTIME_FLAGS = {"resume", "device", "dtype", "compile", "threads", "jobs", "eval_batch_size",
                 "out_dir", "name", "data_dir", "train_file", "valid_file", "test_file", "preset", "given"}
SIZE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")
RECURRENT_FLAGS = ("n_prelude", "n_core", "n_coda", "mean_iterations", "backprop_depth")  # recurrent.RecurrentConfig
GRAPH_FLAGS = tuple(PROSQA_DEFAULTS)  # the ProsQA generator's settings, each a flag of its own
GENERATOR_FLAGS = {"n_train", "n_valid", "n_test", "data_seed", *GRAPH_FLAGS}
CURRICULUM_FLAGS = tuple(f.name for f in fields(Curriculum) if f.name != "method")


def get_chain(argv=None):
    """The runs train.py trains, in order, as the flags of each (get_args): one, or with --preset
    one per link of its chain."""
    argv = sys.argv[1:] if argv is None else argv
    preset = parser().parse_known_args(argv)[0].preset
    if preset is None:
        return [get_args(argv)]
    user = parser().parse_known_args(argv)[0]
    out = user.out_dir or os.path.join("out", user.name or preset)
    links = [{k: v.format(out=out) if isinstance(v, str) else v for k, v in link.items()} for link in PRESETS[preset]]
    return [get_args(argv if link is links[-1] else flags_named(argv, CHAIN_FLAGS), link) for link in links]


def flags_named(argv, names):
    """The flags of argv whose names are in names, each with the values that follow it."""
    kept, keep = [], False
    for a in argv:
        if a.startswith("--"):
            keep = a[2:].split("=")[0].replace("-", "_") in names
        if keep:
            kept.append(a)
    return kept


def get_args(argv=None, defaults=None):
    """train.py's flags: its defaults, then the defaults a preset's link gives, then the user's;
    checked (check_args)."""
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    p.set_defaults(**(defaults or {}))
    args, given = p.parse_args(argv), given_flags(argv)
    args.given = sorted(given | set(defaults or {}))  # what the user (or preset) asked for
    for k, v in PAPER_RECIPE[args.dataset].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out_dir = args.out_dir or os.path.join("out", args.name or args.dataset)
    args.methods = args.method.split(",")
    args.micro_batch_size = args.micro_batch_size or default_micro_batch(args.batch_size // world, on_gpu(args))
    check_args(p, args, given)
    return args


def parser():
    p = ArgumentParser(description="Train Coconut (or a baseline), then score it on the test split.")
    count, natural, share = bounded(int, 1), bounded(int, 0), bounded(float, 0.0, 1.0)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named chain of runs, e.g. cpu (README)")
    p.add_argument("--dataset", default="prosqa", choices=sorted(PAPER_RECIPE))
    p.add_argument("--method", default="coconut", help=f"{', '.join(METHODS)}; or several, comma-separated")
    p.add_argument("--stage", default="all", help="all: the curriculum; N: stage N alone (README, Stages)")
    p.add_argument("--init", default="gpt2", help="gpt2[-medium|-large|-xl], scratch, a run, a checkpoint")
    g = p.add_argument_group("model (--init scratch; default GPT-2 124M's size)")
    for name in SIZE_FLAGS:
        g.add_argument(flag(name), type=count)
    g.add_argument("--vocab", default="full", choices=["full", "data"], help="data: the data's tokens only")
    for name in RECURRENT_FLAGS:
        g.add_argument(flag(name), type=count, help=f"--method recurrent (default {getattr(RecurrentConfig, name)})")
    p.add_argument("--dropout", type=share, default=0.1, help="0.1, as the official code")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="{train,valid,test}.json, generated once (default data/<dataset>)")
    for split in SPLITS:
        g.add_argument(f"--{split}-file"), g.add_argument(f"--n-{split}", type=count)
    g.add_argument("--max-nodes", type=bounded(int, 4), help="ProsQA graph size (paper: 28)")
    g.add_argument("--min-steps", type=count), g.add_argument("--max-steps", type=count)
    g.add_argument("--names", choices=sorted(NAMES), help="ProsQA names: the paper's, or one token each")
    g.add_argument("--other-option", choices=OTHER_OPTIONS, help="ProsQA's wrong option: any leaf of "
                   "another person (the paper's), or one as far from it as the answer from the root")
    g.add_argument("--min-root-children", type=count, help="ProsQA: the root has at least this many (paper: 1)")
    g.add_argument("--format", choices=FORMATS, help="ProsQA: the paper's sentences, facts as 'X Y .', or the "
                   "lookup task (answers restate the facts)")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--fresh-data", action="store_true", help="every epoch after the first trains on new "
                   "questions from the generator of --data-dir (never a validation or test one)")
    g = p.add_argument_group("curriculum (default: the paper's for the dataset)")
    g.add_argument("--c", type=natural, help="thoughts per reasoning step")
    g.add_argument("--max-latent-stage", type=natural)
    g.add_argument("--epochs-per-stage", type=count), g.add_argument("--epochs", type=count)
    g.add_argument("--uniform-prob", type=share, default=0.0, help="chance of a random stage per example")
    g.add_argument("--pad-latent-to-max", action=argparse.BooleanOptionalAction, default=True, help="as the "
                   "official code: an example with fewer steps than its stage still gets the stage's thoughts")
    g.add_argument("--stop-head", action="store_true", help="also train a classifier of when to stop thinking "
                   "(the paper's unshipped option; evaluate.py --exit head)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=count, default=128, help="micro-batch x accumulation x processes")
    g.add_argument("--micro-batch-size", type=count, help="default: 16 on a CPU; on a GPU the batch of a "
                   "process, up to 64 (the thoughts' small passes keep a GPU busy only with many rows)")
    g.add_argument("--learning-rate", type=bounded(float, 1e-12), default=1e-4)
    g.add_argument("--weight-decay", type=bounded(float, 0.0), default=0.01)
    g.add_argument("--warmup-iters", type=natural, default=0, help="linear warm-up after each reset")
    g.add_argument("--grad-clip", type=bounded(float, 0.0), default=0.0, help="0: off, as the paper")
    g.add_argument("--reset-optimizer", choices=["stage", "epoch"], default="stage")
    g.add_argument("--best-by", choices=["accuracy", "loss"], default="accuracy", help="what picks best.pt among "
                   "a stage's epochs: validation accuracy (the paper's), or loss (answers rarely exactly right)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--max-new-tokens", type=count, help="greedy decoding budget (paper: 128, GSM8k 64)")
    g.add_argument("--eval-batch-size", type=count, default=32)
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", help="runs go to <out-dir>/<method> (default out/<name or dataset>)")
    g.add_argument("--name"), g.add_argument("--resume", action="store_true")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU")
    g.add_argument("--threads", type=count), g.add_argument("--compile", action="store_true")
    g.add_argument("--jobs", type=count, default=1, help="methods trained at once, in a process each")
    return p


def check_args(p, args, given):
    """Refuse what cannot be meant, and every flag that would be silently ignored."""
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    if args.stage != "all":
        if not args.stage.isdigit():
            p.error(f"--stage must be 'all' or a number, not {args.stage!r}")
        args.stage = int(args.stage)
    for m in args.methods:
        try:  # the curriculum knows each method's stages
            curriculum_of(args, m).schedule(args.stage, args.epochs)
        except ValueError as e:
            p.error(f"--stage {args.stage}: {e}")
    if args.init != "scratch":
        for name in sorted(given & {*SIZE_FLAGS, *RECURRENT_FLAGS, "vocab"}):
            p.error(f"{flag(name)} is for --init scratch: --init {args.init} brings its own")
    recurrent = [m == "recurrent" for m in args.methods]
    if not any(recurrent):
        for name in sorted(given & set(RECURRENT_FLAGS)):
            p.error(f"{flag(name)} is for --method recurrent")
    elif all(recurrent) and "n_layer" in given:
        p.error("--n-layer is a GPT's: the recurrent model's layers are --n-prelude, --n-core and --n-coda")
    if args.stop_head and not any(curriculum_of(args, m).markers and curriculum_of(args, m).feedback
                                  for m in args.methods):
        p.error(f"--stop-head learns when to stop thinking: {args.method} has no thoughts")
    elif (args.n_embd or 768) % (args.n_head or 12):
        p.error(f"--n-embd {args.n_embd or 768} is not a multiple of --n-head {args.n_head or 12}")
    not_generated = None  # why the generator's flags cannot apply to the data
    if any(getattr(args, f"{s}_file") for s in SPLITS) or args.dataset == "gsm8k":
        not_generated = (f"the generated data, not of "
                         f"{'GSM8k' if args.dataset == 'gsm8k' else 'given --train/valid/test-file'}")
    elif (all(os.path.exists(os.path.join(args.data_dir, f"{s}.json")) for s in SPLITS)
          and not os.path.exists(os.path.join(args.data_dir, "generator.json"))):
        not_generated = (f"the generator, and {args.data_dir} has no generator.json: its splits were not made "
                         f"by it, or their settings are unknown")
    if not_generated:
        for name in sorted(given & (GENERATOR_FLAGS | {"fresh_data"})):
            p.error(f"{flag(name)} is a setting of {not_generated}")
    for name in sorted(given & set(GRAPH_FLAGS)):
        if args.dataset != "prosqa":
            p.error(f"{flag(name)} is a setting of the ProsQA generator, not of {args.dataset}'s")
    if args.dataset == "prosqa":
        try:
            check_prosqa_settings({k: getattr(args, k) for k in GRAPH_FLAGS})
        except DataError as e:
            p.error(str(e))
    for name in CURRICULUM_FLAGS:
        if name in given and all(name in ignored_flags(args, m) for m in args.methods):
            p.error(f"{flag(name)} changes nothing for {args.method}")
    if args.fresh_data and all(len(curriculum_of(args, m).schedule(args.stage, args.epochs)) == 1
                               for m in args.methods):
        p.error("--fresh-data draws new questions for each epoch after the first: one epoch never sees them")
    if "epochs" in given and args.stage != "all":
        p.error("--epochs is the length of --stage all; --stage N trains for --epochs-per-stage epochs")
    if "jobs" in given and args.jobs > 1 and (len(args.methods) == 1 or ddp):
        p.error("--jobs trains several --method side by side, in one process each (not under torchrun)")
    if args.batch_size < world:
        p.error(f"--batch-size {args.batch_size}: fewer rows than the {world} processes")
    if args.batch_size % (args.micro_batch_size * world):
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                f"{args.micro_batch_size} x {world} processes")
    if "name" in given and "out_dir" in given:
        p.error("--name names a folder under out/: give it or --out-dir, not both")


def default_micro_batch(rows, gpu):
    """Rows in one pass by default: as many as the device takes at once (64 on a GPU, 16 on a CPU)
    that divide a process's share of the batch."""
    return math.gcd(rows, 64 if gpu else 16)


def on_gpu(args):
    """Whether the run will be on a CUDA device (common.setup_device decides the same way)."""
    import torch
    return args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()


def curriculum_of(args, method):
    """The curriculum that train.py's flags (or a run's saved flags) describe."""
    # a flag the run's flags lack (an official checkpoint, an older run) keeps the paper's default
    return Curriculum(method, **{name: getattr(args, name) for name in CURRICULUM_FLAGS if hasattr(args, name)})


# examples with three steps and one, whose layouts every curriculum flag may change
PROBES = [{"question": [1], "steps": [[2], [3], [4]], "answer": [5]}, {"question": [1], "steps": [[2]], "answer": [5]}]


def ignored_flags(args, method):
    """The curriculum flags that change nothing for a method: with the flag changed, its stages,
    its schedule and its examples at each of its stages (with stage mixing) stay the same."""
    def trace(curriculum):
        rng = random.Random(0)
        examples = [build_example(t, curriculum, s, rng=rng) for s in curriculum.stages for t in PROBES for _ in range(8)]
        return curriculum.stages, curriculum.schedule(args.stage, 12), examples
    base = replace(curriculum_of(args, method), uniform_prob=0.5)
    other = dict(c=base.c + 1, max_latent_stage=base.max_latent_stage + 1,
                 epochs_per_stage=base.epochs_per_stage + 1, uniform_prob=0.0,
                 pad_latent_to_max=not base.pad_latent_to_max)
    return {name for name in CURRICULUM_FLAGS if trace(base) == trace(replace(base, **{name: other[name]}))}
