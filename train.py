"""
Train and evaluate Coconut and its baselines, in the style of nanoGPT's train.py.

Flow of the repository: data -> model -> coconut -> checkpoint -> train -> sample -> analyze.

    python train.py --dataset prosqa --stage all          # the paper's recipe: GPT-2 124M, 50 epochs
    torchrun --standalone --nproc_per_node=4 train.py --dataset prosqa --stage all
    python train.py --preset cpu                          # a laptop: Coconut vs CoT vs No-CoT
    python train.py --eval out/prosqa/coconut --n-thoughts 0,1,2,3,4,5,6   # the paper's k-sweep

Each method gets a run folder <out-dir>/<method>: ckpt.pt (the last epoch: model, optimizer, RNG
states, history), best.pt (the best validation accuracy at the latest stage) and log.jsonl (a line
of metrics per epoch, then the test result). `--resume` continues from ckpt.pt.
"""

import json
import multiprocessing
import os
import random
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
from tqdm import tqdm

from checkpoint import (check_fits, check_run_folders, curriculum_of, export_hf, load_model, load_run,
                        pick_device, read_checkpoint, read_questions, resume_checkpoint, rng_state,
                        save_checkpoint, set_rng_state)
from coconut import METHODS, Coconut, Vocab, build_example, collate
from data import (LATENT, PAPER_RECIPE, SPLITS, ArgumentParser, DataError, bounded, counts, decode,
                  errors_in_one_line, given_flags, grade, gsm8k_help, load_split, prepare_splits, write_atomic,
                  write_jsonl)
from model import GPT, HUB_MODELS, GPTConfig, fetch_from_hub

# Presets replace the defaults of many flags at once; any flag given explicitly still wins.
PRESETS = {
    # A tiny GPT from scratch on small generated ProsQA graphs (at most 7 nodes, answers 2-3 steps
    # away): the three methods of Table 1, trained side by side, one process and one thread each,
    # so that two cores serve three runs. Every stage gets one epoch of 12,000 questions: many
    # distinct questions teach these models more than many passes over few, which they memorize.
    # Coconut mixes in other stages (uniform_prob), as the paper's analysis model: it can then
    # finish a chain in language after any number of thoughts, which analyze.py needs.
    "cpu": dict(dataset="prosqa", name="cpu-small", data_dir="data/prosqa-small",
                method="coconut,cot,no-cot", jobs=3, threads=1, init="scratch", vocab="data",
                n_layer=2, n_head=4, n_embd=128, block_size=256, dropout=0.0, n_train=12000,
                n_valid=200, n_test=500, max_nodes=7, min_steps=2, max_steps=3, c=1,
                max_latent_stage=3, epochs_per_stage=1, epochs=5, uniform_prob=0.3, batch_size=16,
                micro_batch_size=16, learning_rate=2e-3, warmup_iters=50, grad_clip=1.0,
                max_new_tokens=48, eval_batch_size=100),
}
# Flags a resumed run may change: where things are (a run or its data may move; the data is
# compared by content) and how the machine runs it. Every other flag must match the run's.
RUNTIME_FLAGS = {"resume", "device", "dtype", "compile", "threads", "jobs", "eval_batch_size",
                 "out_dir", "name", "data_dir", "train_file", "valid_file", "test_file", "preset", "given"}
EVAL_FLAGS = {"eval", "eval_file", "n_thoughts", "max_new_tokens", "eval_batch_size", "predictions", "device",
              "dtype", "threads", "method", "dataset"}  # the last two for checkpoints trained elsewhere
SIZE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")
GRAPH_FLAGS = ("max_nodes", "min_steps", "max_steps")  # ProsQA's generator only
GENERATOR_FLAGS = {"n_train", "n_valid", "n_test", "data_seed", *GRAPH_FLAGS}
# the methods whose examples each curriculum flag changes (with --stage all; --stage N uses
# --epochs-per-stage for every method): no other layout depends on it
CURRICULUM_FLAGS = {"c": ("coconut", "pause", "no-curriculum"),
                    "max_latent_stage": ("coconut", "pause", "no-thoughts", "no-curriculum"),
                    "epochs_per_stage": ("coconut", "pause", "no-thoughts"),
                    "uniform_prob": ("coconut", "pause", "no-thoughts")}


class TrainError(ValueError):
    """A problem with the user's input: printed as one line, exit status 1."""


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = ArgumentParser(description="Train Coconut (or a baseline) and evaluate it.")
    count, natural, share = bounded(int, 1), bounded(int, 0), bounded(float, 0.0, 1.0)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults, e.g. cpu")
    p.add_argument("--dataset", default="prosqa", choices=sorted(PAPER_RECIPE))
    p.add_argument("--method", default="coconut", help=f"{', '.join(METHODS)}; or several, comma-separated")
    p.add_argument("--stage", default="all", help="all: the curriculum; N: stage N alone (README, Stages)")
    p.add_argument("--init", default="gpt2", help="gpt2[-medium|-large|-xl], scratch, a run, a checkpoint")
    g = p.add_argument_group("model (--init scratch; default GPT-2 124M's size)")
    for flag in SIZE_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), type=count)
    g.add_argument("--vocab", default="full", choices=["full", "data"], help="data: the data's tokens only")
    p.add_argument("--dropout", type=share, default=0.1, help="0.1, as the official code")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="{train,valid,test}.json, generated once (default data/<dataset>)")
    for split in SPLITS:
        g.add_argument(f"--{split}-file"), g.add_argument(f"--n-{split}", type=count)
    g.add_argument("--max-nodes", type=bounded(int, 4), help="ProsQA graph size (paper: 28)")
    g.add_argument("--min-steps", type=count), g.add_argument("--max-steps", type=count)
    g.add_argument("--data-seed", type=int, default=0)
    g = p.add_argument_group("curriculum (default: the paper's for the dataset)")
    g.add_argument("--c", type=natural, help="thoughts per reasoning step")
    g.add_argument("--max-latent-stage", type=natural)
    g.add_argument("--epochs-per-stage", type=count), g.add_argument("--epochs", type=count)
    g.add_argument("--uniform-prob", type=share, default=0.0, help="chance of a random stage per example")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=count, default=128, help="micro-batch x accumulation x processes")
    g.add_argument("--micro-batch-size", type=count, default=16)
    g.add_argument("--learning-rate", type=bounded(float, 1e-12), default=1e-4)
    g.add_argument("--weight-decay", type=bounded(float, 0.0), default=0.01)
    g.add_argument("--warmup-iters", type=natural, default=0, help="linear warm-up after each reset")
    g.add_argument("--grad-clip", type=bounded(float, 0.0), default=0.0, help="0: off, as the paper")
    g.add_argument("--reset-optimizer", choices=["stage", "epoch"], default="stage")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--max-new-tokens", type=count, help="greedy decoding budget (paper: 128, GSM8k 64)")
    g.add_argument("--eval-batch-size", type=count, default=32)
    g.add_argument("--eval", metavar="RUN", help="evaluation only: a run folder or checkpoint")
    g.add_argument("--eval-file", help="with --eval: a data file (default: the run's test file)")
    g.add_argument("--n-thoughts", type=counts, help="with --eval: thoughts per question, e.g. 0,1,2,3")
    g.add_argument("--predictions", metavar="FILE", help="with --eval: each question's answer, as jsonl")
    g.add_argument("--export", nargs=2, metavar=("RUN", "DIR"), help="RUN as a Hugging Face GPT-2 folder")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", help="runs go to <out-dir>/<method> (default out/<name or dataset>)")
    g.add_argument("--name"), g.add_argument("--resume", action="store_true")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU")
    g.add_argument("--threads", type=count), g.add_argument("--compile", action="store_true")
    g.add_argument("--jobs", type=count, default=1, help="methods trained at once, in a process each")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args, given = p.parse_args(argv), given_flags(argv)
    args.given = sorted(given | set(PRESETS.get(args.preset, {})))  # what the user (or preset) asked for
    if args.export:
        for flag in sorted(given - {"export"}):
            p.error(f"--{flag.replace('_', '-')} does not apply to --export")
        return args
    if args.eval:
        for flag in sorted(given - EVAL_FLAGS):
            p.error(f"--{flag.replace('_', '-')} does not apply to --eval (evaluation only)")
        if ddp:
            p.error("--eval runs in one process: python train.py --eval ..., not under torchrun")
        args.method, args.dataset = (getattr(args, f) if f in given else None for f in ("method", "dataset"))
        if args.predictions and os.path.exists(args.predictions):
            p.error(f"--predictions {args.predictions}: exists already; name a new file")
        return args
    for k, v in PAPER_RECIPE[args.dataset].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out_dir = args.out_dir or os.path.join("out", args.name or args.dataset)
    args.methods = args.method.split(",")
    check_training_flags(p, args, given)
    return args


def check_training_flags(p, args, given):
    """Refuse what cannot be meant, and every flag that would be silently ignored."""
    for flag in sorted(given & {"eval_file", "n_thoughts", "predictions"}):
        p.error(f"--{flag.replace('_', '-')} goes with --eval")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    if args.stage != "all":
        if not args.stage.isdigit():
            p.error(f"--stage must be 'all' or a number, not {args.stage!r}")
        args.stage = int(args.stage)
    try:  # the curriculum knows each method's stages
        for m in args.methods:
            curriculum_of(args, m).schedule(args.stage, args.epochs)
    except ValueError as e:
        p.error(str(e))
    if args.init != "scratch":
        for flag in sorted(given & {*SIZE_FLAGS, "vocab"}):
            p.error(f"--{flag.replace('_', '-')} is for --init scratch: --init {args.init} brings its own")
    elif (args.n_embd or 768) % (args.n_head or 12):
        p.error(f"--n-embd {args.n_embd or 768} is not a multiple of --n-head {args.n_head or 12}")
    if any(getattr(args, f"{s}_file") for s in SPLITS) or args.dataset == "gsm8k":
        for flag in sorted(given & GENERATOR_FLAGS):
            p.error(f"--{flag.replace('_', '-')} is a setting of the generated data, not of "
                    f"{'GSM8k' if args.dataset == 'gsm8k' else 'given --train/valid/test-file'}")
    for flag in sorted(given & set(GRAPH_FLAGS)):
        if args.dataset != "prosqa":
            p.error(f"--{flag.replace('_', '-')} is a setting of the ProsQA generator, not of {args.dataset}'s")
    for flag, users in CURRICULUM_FLAGS.items():
        if flag in given and not any(m in users or (flag == "epochs_per_stage" and args.stage != "all")
                                     for m in args.methods):
            p.error(f"--{flag.replace('_', '-')} changes nothing for {args.method}")
    if "epochs" in given and args.stage != "all":
        p.error("--epochs is the length of --stage all; --stage N trains for --epochs-per-stage epochs")
    if "jobs" in given and args.jobs > 1 and (len(args.methods) == 1 or ddp):
        p.error("--jobs trains several --method side by side, in one process each (not under torchrun)")
    if args.batch_size % (args.micro_batch_size * world):
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                f"{args.micro_batch_size} x {world} processes")
    if "name" in given and "out_dir" in given:
        p.error("--name names a folder under out/: give it or --out-dir, not both")


# -----------------------------------------------------------------------------
# Device and data

ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0


def barrier():
    if ddp:
        torch.distributed.barrier()


def setup_device(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    else:
        device = pick_device(args.device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.startswith("cuda")
                                        and torch.cuda.is_bf16_supported())
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
    return device, ctx


def load_data(args):
    """{split: data.load_split(...)}: the given files, else data_dir's (ProsQA and ProntoQA are
    generated there once). Paths become absolute, so that the run finds its data from anywhere."""
    paths = {s: getattr(args, f"{s}_file") or os.path.join(args.data_dir, f"{s}.json") for s in SPLITS}
    for path in paths.values():
        if args.dataset == "gsm8k" and not os.path.exists(path):
            raise DataError(f"{path}: no such file. {gsm8k_help(args.data_dir)}")
    if args.dataset != "gsm8k" and not any(getattr(args, f"{s}_file") for s in SPLITS) and master:
        sizes = {s: getattr(args, f"n_{s}") for s in SPLITS if getattr(args, f"n_{s}") is not None}
        knobs = {k: getattr(args, k) for k in GRAPH_FLAGS} if args.dataset == "prosqa" else {}
        prepare_splits(args.dataset, args.data_dir, args.data_seed, sizes, progress=True,
                       asked=GENERATOR_FLAGS & set(args.given), **knobs)
    barrier()  # the other ranks wait for the generated files
    for split, path in paths.items():
        setattr(args, f"{split}_file", os.path.abspath(path))
    return {split: load_split(args.dataset, path) for split, path in paths.items()}


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, tokens, records, curriculum, stage, device, ctx, batch_size, max_new_tokens,
             n_thoughts=None):
    """Greedy answers graded as the paper does. Returns the metrics: accuracy, mean generated
    tokens (thoughts included, as the paper counts them), forward passes (at batch size 1: thought
    passes plus one per answer token) and seconds per question; and each question's answer,
    {index: dict(output, correct)}. Prompts are sorted by length: batches carry little padding."""
    model.eval()
    prompts = [build_example(t, curriculum, stage, prompt_only=True, n_thoughts=n_thoughts) for t in tokens]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))[rank::world]
    sums = torch.zeros(4, dtype=torch.float64)  # correct, tokens, passes, questions
    outputs, t0 = {}, time.time()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        with ctx:
            answers = model.generate(**collate([prompts[j] for j in idx], for_generation=True, device=device),
                                     max_new_tokens=max_new_tokens)
        for j, ids in zip(idx, answers):
            n_latent = prompts[j]["input_ids"].count(LATENT)
            outputs[j] = dict(output=decode(ids), correct=grade(decode(ids), records[j]["answer"]))
            passes = (n_latent + 1 if model.feedback else 1) + len(ids)
            sums += torch.tensor([outputs[j]["correct"], len(ids) + n_latent, passes, 1], dtype=torch.float64)
    if ddp:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
    correct, n_tokens, n_passes, n = sums.tolist()
    seconds = (time.time() - t0) * world
    return dict(acc=correct / n, tokens=n_tokens / n, passes=n_passes / n, s_per_q=seconds / n), outputs


@torch.no_grad()
def validation_loss(model, examples, micro_batch_size, device, ctx):
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x examples, examples
    for i in range(rank * micro_batch_size, len(examples), micro_batch_size * world):
        chunk = examples[i:i + micro_batch_size]
        with ctx:
            loss, _ = model(**collate(chunk, device=device), return_logits=False)
        sums += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64, device=device)
    if ddp:
        torch.distributed.all_reduce(sums)
    return sums[0].item() / max(sums[1].item(), 1)


# -----------------------------------------------------------------------------
# Training

def train_epoch(model, train_model, optimizer, examples, order, state, args, device, ctx, desc):
    """One epoch of optimizer steps over this rank's share of the examples, in the given order:
    warm-up, micro-batches with gradient accumulation, clipping. Returns the mean loss, the tokens
    seen (all ranks), the seconds taken and the last learning rate."""
    per_rank = args.batch_size // world
    n_steps = (len(order) + per_rank - 1) // per_rank
    model.train()
    t0, n_tokens, losses = time.time(), 0, []
    tty = sys.stderr.isatty()  # a progress bar on a terminal; in a log file, a line per tenth
    for step in tqdm(range(n_steps), desc=desc, disable=not master or not tty, dynamic_ncols=True):
        # linear warm-up after each optimizer reset, then the constant rate of the paper
        lr = args.learning_rate * min(1.0, (state["opt_steps"] + 1) / (args.warmup_iters + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_idx = order[step * per_rank:(step + 1) * per_rank]
        mb = args.micro_batch_size
        micro = [batch_idx[i:i + mb] for i in range(0, len(batch_idx), mb)]
        step_loss = 0.0
        for m, idx in enumerate(micro):
            batch = collate([examples[i] for i in idx], device=device)
            if ddp:  # only the last micro-step of a batch needs the gradient all-reduce
                train_model.require_backward_grad_sync = m == len(micro) - 1
            with ctx:
                loss, _ = train_model(**batch, return_logits=False)
            # weigh each micro-batch's mean loss by its share of the examples (the official code
            # averages micro-batch means too; a per-token mean over the whole batch would differ slightly)
            (loss * len(idx) / len(batch_idx)).backward()
            step_loss += loss.item() * len(idx) / len(batch_idx)
            n_tokens += int(batch["attention_mask"].sum())
        # the norm of the whole (all-reduced) gradient, so every rank stops at the same step;
        # max_norm=inf measures without clipping (the factor is exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.gpt.parameters(), args.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise TrainError(f"{desc}: the gradient became {grad_norm.item()} at step {step + 1}; "
                             f"stopped before updating the weights, and the last checkpoint is "
                             f"untouched. Try a lower --learning-rate, or --dtype float32 if bf16 was "
                             f"on (--resume may change --dtype)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["opt_steps"] += 1
        losses.append(step_loss)
        if master and not tty and (step + 1) % max(1, n_steps // 10) == 0:
            print(f"{desc}: step {step + 1}/{n_steps}, loss {step_loss:.3f}, "
                  f"{n_tokens * world / (time.time() - t0):.0f} tokens/s", flush=True)
    return sum(losses) / len(losses), n_tokens * world, time.time() - t0, lr


def run_args(args, method):
    """The flags of one method's run, as its checkpoint and args.json keep them."""
    return {k: v for k, v in vars(args).items() if k != "methods"} | {"method": method}


def train_method(args, method, data, device, ctx):
    """Train one method in <out-dir>/<method>, then score its best checkpoint on the test split."""
    run_dir, curriculum = os.path.join(args.out_dir, method), curriculum_of(args, method)
    schedule = curriculum.schedule(args.stage, args.epochs)  # the stage of each epoch
    ckpt = resume_checkpoint(run_dir, run_args(args, method), data, may_differ=RUNTIME_FLAGS)
    if ckpt is not None and "test" in ckpt:
        print(f"{run_dir}: already finished")
        return ckpt["test"]
    torch.manual_seed(args.seed + rank)
    if ckpt is not None:
        gpt, vocab, _ = load_model(os.path.join(run_dir, "ckpt.pt"), args.dropout)
    elif args.init != "scratch":
        gpt, vocab, _ = load_model(args.init, args.dropout)
    else:
        vocab = Vocab.of([t for d in data.values() for t in d["tokens"]]) if args.vocab == "data" else Vocab()
        sizes = {k: getattr(args, k) or getattr(GPTConfig, k) for k in SIZE_FLAGS}  # GPT-2 124M's
        gpt = GPT(GPTConfig(**sizes, vocab_size=vocab.size, dropout=args.dropout))
    stages = set(schedule) | ({0} if args.uniform_prob else set())  # mixing may draw stage 0
    for d in data.values():
        check_fits(d["tokens"], d["path"], curriculum, sorted(stages), gpt.config.block_size, vocab)
    if args.compile:
        for block in gpt.transformer.h:
            block.compile(dynamic=True)  # Coconut's passes have many lengths
    model = Coconut(gpt.to(device), vocab, feedback=curriculum.feedback)
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.startswith("cuda") else None) if ddp else model
    new_optimizer = lambda: gpt.configure_optimizers(  # noqa: E731
        args.weight_decay, args.learning_rate, device_type=device.split(":")[0])
    optimizer, state = new_optimizer(), dict(epoch=0, stage=None, opt_steps=0, history=[], best_acc=-1.0)
    if ckpt is not None:
        state = {k: ckpt[k] for k in state}
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        print(f"{run_dir}: resuming after epoch {state['epoch']} (stage {state['stage']})")
    elif master:
        text = json.dumps(run_args(args, method), indent=1)
        write_atomic(os.path.join(run_dir, "args.json"), lambda f: f.write(text.encode()))
    if master:
        steps = args.batch_size // world // args.micro_batch_size
        print(f"{method}: {gpt.get_num_params() / 1e6:.2f}M parameters, {len(data['train']['tokens'])} "
              f"training examples, {len(schedule)} epochs, batch {args.batch_size} = "
              f"{args.micro_batch_size} x {steps} x {world}, on {device}")
    for epoch in range(state["epoch"], len(schedule)):
        if schedule[epoch] != state["stage"] or args.reset_optimizer == "epoch":
            if state["stage"] is not None:  # a fresh AdamW: the paper resets it at each stage
                optimizer, state["opt_steps"] = new_optimizer(), 0
            if schedule[epoch] != state["stage"]:
                state["best_acc"] = -1.0  # "best" means best at the latest stage
            state["stage"] = schedule[epoch]
        acc = train_and_validate(args, method, model, train_model, optimizer, curriculum, data, state,
                                 len(schedule), device, ctx)
        improved, state["best_acc"] = acc > state["best_acc"], max(acc, state["best_acc"])
        if master:
            save_epoch(args, method, gpt, vocab, optimizer, data, state, improved)
        barrier()
    return test_best(args, method, model, curriculum, data, device, ctx)


def train_and_validate(args, method, model, train_model, optimizer, curriculum, data, state, n_epochs,
                       device, ctx):
    """One epoch of training, then the validation loss and accuracy, logged in state["history"];
    returns the accuracy. The data order of an epoch depends only on (seed, epoch): a resumed run
    sees the same batches."""
    epoch, stage, t0 = state["epoch"], state["stage"], time.time()
    example_rng = random.Random(args.seed * 100003 + epoch)
    examples = [build_example(t, curriculum, stage, rng=example_rng) for t in data["train"]["tokens"]]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
    order = order[:len(order) // world * world][rank::world].tolist()  # as many steps on every rank
    desc = f"{method} epoch {epoch + 1}/{n_epochs} stage {stage}"
    loss, n_tokens, seconds, lr = train_epoch(model, train_model, optimizer, examples, order, state, args,
                                              device, ctx, desc)
    valid = data["valid"]
    val_loss = validation_loss(model, [build_example(t, curriculum, stage) for t in valid["tokens"]],
                               args.micro_batch_size, device, ctx)
    val, _ = evaluate(model, valid["tokens"], valid["records"], curriculum, stage, device, ctx,
                      args.eval_batch_size, args.max_new_tokens)
    state["epoch"] = epoch + 1
    state["history"].append(dict(
        epoch=epoch + 1, stage=stage, train_loss=round(loss, 5), val_loss=round(val_loss, 5),
        val_acc=round(val["acc"], 5), val_tokens=round(val["tokens"], 3), lr=lr,
        tokens_per_s=round(n_tokens / seconds), seconds=round(time.time() - t0, 1)))
    if master:
        print(json.dumps(state["history"][-1]), flush=True)
    return val["acc"]


def save_epoch(args, method, gpt, vocab, optimizer, data, state, improved):
    """ckpt.pt, best.pt when the validation accuracy is the best of the stage, and the log. Best
    first, then last, then the log: a kill between two writes is repaired by the resume."""
    run_dir = os.path.join(args.out_dir, method)
    ckpt = dict(model=gpt.state_dict(), model_args=asdict(gpt.config), vocab=vocab.ids, method=method,
                args=run_args(args, method), data={s: d["sha256"] for s, d in data.items()},
                optimizer=optimizer.state_dict(), rng=rng_state(), **state)
    if improved:
        save_checkpoint({k: v for k, v in ckpt.items() if k != "optimizer"}, os.path.join(run_dir, "best.pt"))
    save_checkpoint(ckpt, os.path.join(run_dir, "ckpt.pt"))
    write_jsonl(state["history"], os.path.join(run_dir, "log.jsonl"))


def test_best(args, method, model, curriculum, data, device, ctx):
    """The test split, once, with the best checkpoint of the last stage."""
    run_dir = os.path.join(args.out_dir, method)
    best = read_checkpoint(os.path.join(run_dir, "best.pt"))
    ckpt = read_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    model.gpt.load_state_dict(best["model"])
    test, _ = evaluate(model, data["test"]["tokens"], data["test"]["records"], curriculum, best["stage"],
                       device, ctx, args.eval_batch_size, args.max_new_tokens)
    test = dict(test=True, method=method, stage=best["stage"], best_epoch=best["epoch"],
                val_acc=best["best_acc"], train_minutes=round(sum(h["seconds"] for h in ckpt["history"]) / 60, 2),
                **{f"test_{k}": round(v, 5) for k, v in test.items()})
    if master:  # the log first: a run whose ckpt.pt holds the test is finished and never rewrites it
        print(json.dumps(test))
        write_jsonl(ckpt["history"] + [test], os.path.join(run_dir, "log.jsonl"))
        save_checkpoint(dict(ckpt, test=test), os.path.join(run_dir, "ckpt.pt"))
    return test


# -----------------------------------------------------------------------------
# Evaluation only, methods side by side, and the main program

def eval_only(args, device, ctx):
    """Accuracy, generated tokens, forward passes and time per question of a run on a file, and
    with --predictions what each question got."""
    run = load_run(args.eval, device, args.method, args.dataset)
    records, tokens = read_questions(run, args.eval_file, "--eval-file", args.n_thoughts)
    trained = f"epoch {run.epoch}" if run.epoch else "trained elsewhere"
    print(f"{run.path}: {run.curriculum.method}, stage {run.stage}, {trained}; "
          f"{args.eval_file or run.args.test_file}: {len(records)} questions")
    predictions = []
    for k in args.n_thoughts or [None]:
        r, outputs = evaluate(run.model, tokens, records, run.curriculum, run.stage, device, ctx,
                              args.eval_batch_size, args.max_new_tokens or run.args.max_new_tokens, n_thoughts=k)
        print(f"{'' if k is None else f'k={k}  '}accuracy {100 * r['acc']:.1f}%  tokens {r['tokens']:.1f}  "
              f"forward passes {r['passes']:.1f}  {r['s_per_q'] * 1000:.1f} ms/question")
        predictions += [dict(index=i, **({} if k is None else dict(k=k)), question=records[i]["question"],
                             output=outputs[i]["output"], answer=records[i]["answer"],
                             correct=outputs[i]["correct"]) for i in sorted(outputs)]
    if args.predictions:
        write_jsonl(predictions, args.predictions)
        print(f"wrote {len(predictions)} predictions to {args.predictions}")


def train_job(job):
    """One method in a child process of --jobs, printing to <run>/train.log. A watchdog thread
    ends the child as soon as the parent is gone (even by kill -9), so that a --resume never
    finds an orphan still writing to the same run folder."""
    parent = multiprocessing.parent_process()
    threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    args, method, data = job
    os.makedirs(os.path.join(args.out_dir, method), exist_ok=True)
    with open(os.path.join(args.out_dir, method, "train.log"), "a") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    try:
        return train_method(args, method, data, *setup_device(args))
    except (ValueError, OSError) as e:  # the refusals of errors_in_one_line
        raise TrainError(f"{method}: {e}") from None


def train_in_parallel(args, data):
    """The methods in processes of their own, args.jobs at a time: on a CPU the methods of a
    comparison then share the cores instead of taking turns (one thread each)."""
    for m in args.methods:
        print(f"{m}: training in the background, progress in {os.path.join(args.out_dir, m, 'train.log')}")
    results = {}
    # each job in a fresh process; leaving the with-block on an error stops them all
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(train_job, [(args, m, data) for m in args.methods]):
            print(f"{r['method']}: done, test accuracy {100 * r['test_acc']:.1f}%")
            results[r["method"]] = r
        pool.close()
        pool.join()
    return [results[m] for m in args.methods]


def main(argv=None):
    args = get_args(argv)
    try:
        with errors_in_one_line():
            device, ctx = setup_device(args)
            if args.export:
                return export_hf(*args.export)
            if args.eval:
                return eval_only(args, device, ctx)
            check_run_folders(args.out_dir, args.methods, args.resume)  # before any long work
            if args.init in HUB_MODELS:
                fetch_from_hub(args.init)
            data = load_data(args)
            t0 = time.time()
            if args.jobs > 1 and len(args.methods) > 1 and not ddp:
                results = train_in_parallel(args, data)
            else:
                results = [train_method(args, method, data, device, ctx) for method in args.methods]
            if master and len(results) > 1:
                print_table(args, results, time.time() - t0)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def print_table(args, results, seconds):
    chance = " (chance: 50%)" if args.dataset in ("prosqa", "prontoqa") else ""
    print(f"\n{args.dataset} test accuracy{chance}, {seconds:.0f} s in all:")
    print("| method | test acc | val acc | tokens | passes | minutes |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {100 * r['test_acc']:.1f}% | {100 * r['val_acc']:.1f}% | "
              f"{r['test_tokens']:.1f} | {r['test_passes']:.1f} | {r['train_minutes']:.1f} |")


if __name__ == "__main__":
    main()
