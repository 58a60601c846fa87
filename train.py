"""
Train Coconut and its baselines, in the style of nanoGPT's train.py.

    python train.py --dataset prosqa --stage all          # the paper's recipe: GPT-2 124M, 50 epochs
    torchrun --standalone --nproc_per_node=4 train.py --dataset prosqa --stage all
    python train.py --preset cpu                          # a laptop: Coconut vs CoT vs No-CoT

Each method gets a run folder <out-dir>/<method>: ckpt.pt (the last epoch: model, optimizer, RNG
states, progress), best.pt (the best validation accuracy at the latest stage) and log.jsonl (a
line of metrics per epoch, then the test result). `--resume` continues from ckpt.pt. The flags
and presets are in config.py.
"""

import json
import multiprocessing
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from checkpoint import (CheckpointError, check_run_folders, fetch_weights, load_model, read_checkpoint,
                        resume_checkpoint, rng_state, save_checkpoint, set_rng_state)
from common import (InputError, barrier, ddp, errors_in_one_line, master, rank, setup_device, world, write_atomic,
                    write_jsonl)
from config import GENERATOR_FLAGS, GRAPH_FLAGS, RECURRENT_FLAGS, SIZE_FLAGS, curriculum_of, get_chain
from data import SPLITS, DataError, Vocab, fresh_records, gsm8k_help, load_split, prepare_splits, tokenize_record
from evaluate import Run, answerer, check_fits, evaluate
from model import GPT, HUB_MODELS, GPTConfig
from recurrent import RecurrentConfig, RecurrentGPT


class TrainError(InputError):
    """A run that cannot go on (it diverged): one line, exit status 1."""


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint, restored by --resume."""
    epoch: int = 0  # epochs done
    stage: int = None  # the stage of the last epoch
    opt_steps: int = 0  # optimizer steps since the last reset (the warm-up counts them)
    best: float = float("-inf")  # the best validation score at the current stage (--best-by)
    history: list = field(default_factory=list)  # the metrics of each epoch


# -----------------------------------------------------------------------------
# Run folders and data

def load_data(args, generate=True):
    """{split: data.load_split(...)}: the given files, else data_dir's (ProsQA and ProntoQA are
    generated there once). Paths become absolute, so that the run finds its data from anywhere.
    generate=False only checks that the data can be had, and returns None."""
    paths = {s: getattr(args, f"{s}_file") or os.path.join(args.data_dir, f"{s}.json") for s in SPLITS}
    for path in paths.values():
        if args.dataset == "gsm8k" and not os.path.exists(path):
            raise DataError(f"{path}: no such file. {gsm8k_help(args.data_dir)}")
    if args.dataset != "gsm8k" and not any(getattr(args, f"{s}_file") for s in SPLITS) and master:
        sizes = {s: getattr(args, f"n_{s}") for s in SPLITS if getattr(args, f"n_{s}") is not None}
        knobs = {k: getattr(args, k) for k in GRAPH_FLAGS} if args.dataset == "prosqa" else {}
        asked = {"seed" if k == "data_seed" else k for k in GENERATOR_FLAGS & set(args.given)}
        prepare_splits(args.dataset, args.data_dir, args.data_seed, sizes, progress=True, asked=asked,
                       generate=generate, **knobs)
    if not generate:
        return None
    barrier()  # the other ranks wait for the generated files
    for split, path in paths.items():
        setattr(args, f"{split}_file", os.path.abspath(path))
    return {split: load_split(args.dataset, path) for split, path in paths.items()}


# -----------------------------------------------------------------------------
# Training

def epoch_order(seed, epoch, n):
    """The order of an epoch's examples: depends only on (seed, epoch), so a resumed run sees the
    same batches; under torchrun, this process's share, as many on every process."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[:n // world * world][rank::world].tolist()


def train_epoch(run, model, optimizer, examples, progress, args, ctx, desc):
    """One epoch of optimizer steps over this process's share of the examples, in their order:
    warm-up, micro-batches with gradient accumulation, clipping. Returns the mean loss, the tokens
    seen (all processes), the seconds taken and the last learning rate. model: run.model, or its
    DistributedDataParallel wrapper under torchrun."""
    device = next(model.parameters()).device
    per_rank = args.batch_size // world
    n_steps = (len(examples) + per_rank - 1) // per_rank
    model.train()
    t0, n_tokens, losses = time.time(), 0, []
    tty = sys.stderr.isatty()  # a progress bar on a terminal; in a log file, a line per tenth
    for step in tqdm(range(n_steps), desc=desc, disable=not master or not tty, dynamic_ncols=True):
        # linear warm-up after each optimizer reset, then the constant rate of the paper
        lr = args.learning_rate * min(1.0, (progress.opt_steps + 1) / (args.warmup_iters + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_examples = examples[step * per_rank:(step + 1) * per_rank]
        mb = args.micro_batch_size
        micro = [batch_examples[i:i + mb] for i in range(0, len(batch_examples), mb)]
        step_loss = torch.zeros((), dtype=torch.float64, device=device)  # read at the end: no waiting on the GPU
        for m, part in enumerate(micro):
            batch = run.batch(part)
            if ddp:  # only the last micro-step of a batch needs the gradient all-reduce
                model.require_backward_grad_sync = m == len(micro) - 1
            with ctx:
                loss = model(**batch)
            # weigh each micro-batch's mean loss by its share of the examples (the official code
            # averages micro-batch means too; a per-token mean over the whole batch would differ slightly)
            (loss * len(part) / len(batch_examples)).backward()
            step_loss += loss.detach().double() * len(part) / len(batch_examples)
            n_tokens += sum(len(e["input_ids"]) for e in part)
        # the norm of the whole (all-reduced) gradient, so every process stops at the same step;
        # max_norm=inf measures without clipping (the factor is exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.gpt.parameters(), args.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise TrainError(f"{desc}: the gradient became {grad_norm.item()} at step {step + 1}; "
                             f"stopped before updating the weights, and the last checkpoint is "
                             f"untouched. Try a lower --learning-rate, or --dtype float32 if bf16 was "
                             f"on (--resume may change --dtype)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.opt_steps += 1
        losses.append(step_loss)
        if master and not tty and (step + 1) % max(1, n_steps // 10) == 0:
            print(f"{desc}: step {step + 1}/{n_steps}, loss {step_loss.item():.3f}, "
                  f"{n_tokens * world / (time.time() - t0):.0f} tokens/s", flush=True)
    return (sum(losses) / len(losses)).item(), n_tokens * world, time.time() - t0, lr


@torch.no_grad()
def validation_loss(run, examples, args, ctx):
    model = run.model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x examples, examples
    for i in range(rank * args.micro_batch_size, len(examples), args.micro_batch_size * world):
        chunk = examples[i:i + args.micro_batch_size]
        with ctx:
            loss = model(**run.batch(chunk))
        sums += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64, device=device)
    if ddp:
        torch.distributed.all_reduce(sums)
    return sums[0].item() / max(sums[1].item(), 1)


def train_and_validate(args, run, train_model, optimizer, data, progress, ctx, desc):
    """One epoch of training at run.stage, then the validation loss and accuracy, logged in
    progress.history; returns the epoch's score for --best-by (higher is better)."""
    t0, epoch = time.time(), progress.epoch
    tokens = fresh_tokens(args, run, epoch, data) if args.fresh_data and epoch > 0 else data["train"]["tokens"]
    example_rng = random.Random(args.seed * 100003 + epoch)  # the stage mixing of this epoch
    examples = [run.example(t, rng=example_rng) for t in tokens]
    examples = [examples[i] for i in epoch_order(args.seed, epoch, len(examples))]
    loss, n_tokens, seconds, lr = train_epoch(run, train_model, optimizer, examples, progress, args, ctx, desc)
    valid = data["valid"]
    val_loss = validation_loss(run, [run.example(t) for t in valid["tokens"]], args, ctx)
    val, _ = evaluate(run, valid, ctx, args.eval_batch_size, args.max_new_tokens)
    progress.epoch = epoch + 1
    progress.history.append(dict(
        epoch=epoch + 1, stage=run.stage, train_loss=round(loss, 5), val_loss=round(val_loss, 5),
        val_acc=round(val["acc"], 5), val_tokens=round(val["tokens"], 3), lr=lr,
        tokens_per_s=round(n_tokens / seconds), seconds=round(time.time() - t0, 1)))
    if master:
        print(json.dumps(progress.history[-1]), flush=True)
    return val["acc"] if args.best_by == "accuracy" else -val_loss


def fresh_tokens(args, run, epoch, data):
    """--fresh-data: an epoch's new training questions, tokenized; those the model cannot take
    (a token its data vocabulary lacks, or too long for its context) are left out, and counted."""
    exclude = {r["question"] for split in ("valid", "test") for r in data[split]["records"]}
    records = fresh_records(args.data_dir, epoch, exclude)
    tokens = []
    for i, r in enumerate(records):
        try:
            t = tokenize_record(r, i, "fresh data")
            check_fits([t], "fresh data", run.curriculum, run.curriculum.stages, run.model.gpt.config.block_size,
                       run.vocab)
            tokens.append(run.vocab.map_tokens(t))
        except DataError:
            pass
    if len(tokens) < len(records) and master:
        print(f"epoch {epoch + 1}: {len(records) - len(tokens)} of {len(records)} new questions left out "
              f"(too long for the model, or with tokens it does not know)")
    return tokens


def build_model(args, method, data, ckpt, run_dir):
    """(gpt, vocab) to train: the checkpoint's to resume, --init's, or a new one from scratch."""
    if ckpt is not None:
        gpt, vocab, _ = load_model(os.path.join(run_dir, "ckpt.pt"), args.dropout)
    elif args.init != "scratch":
        gpt, vocab, _ = load_model(args.init, args.dropout)
    else:
        vocab = Vocab.of([t for d in data.values() for t in d["tokens"]]) if args.vocab == "data" else Vocab()
        sizes = {k: getattr(args, k) or getattr(GPTConfig, k) for k in SIZE_FLAGS}  # GPT-2 124M's
        sizes.update(vocab_size=vocab.size, dropout=args.dropout)
        if method == "recurrent":
            depth = {k: getattr(args, k) or getattr(RecurrentConfig, k) for k in RECURRENT_FLAGS}
            gpt = RecurrentGPT(RecurrentConfig(**sizes, **depth))
        else:
            gpt = GPT(GPTConfig(**sizes))
    if (method == "recurrent") != isinstance(gpt, RecurrentGPT):
        raise CheckpointError(f"--init {args.init}: " + ("--method recurrent trains a recurrent-depth model, not a "
                              "GPT" if method == "recurrent" else f"a recurrent-depth model, not one for {method}"))
    if args.stop_head and not gpt.config.stop_head:
        gpt.add_stop_head()
    if args.compile:
        for block in gpt.transformer.h:
            block.compile(dynamic=True)  # Coconut's passes have many lengths
    return gpt, vocab


def train_method(args, method, data, device, ctx):
    """Train one method in <out-dir>/<method>, then score its best checkpoint on the test split."""
    run_dir, curriculum = os.path.join(args.out_dir, method), curriculum_of(args, method)
    schedule = curriculum.schedule(args.stage, args.epochs)  # the stage of each epoch
    ckpt = resume_checkpoint(run_dir, run_flags(args, method), data)
    if ckpt is not None and "test" in ckpt:
        print(f"{run_dir}: already finished")
        return ckpt["test"]
    torch.manual_seed(args.seed + rank)
    gpt, vocab = build_model(args, method, data, ckpt, run_dir)
    stages = set(schedule) | ({0} if args.uniform_prob else set())  # mixing may draw stage 0
    for d in data.values():
        check_fits(d["tokens"], d["path"], curriculum, sorted(stages), gpt.config.block_size, vocab)
    # the questions in the model's ids, once
    data = {s: dict(d, tokens=[vocab.map_tokens(t) for t in d["tokens"]]) for s, d in data.items()}
    run = Run(answerer(gpt.to(device), vocab, curriculum), vocab, curriculum, stage=None)
    train_model = torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[device] if device.startswith("cuda") else None) if ddp else run.model
    new_optimizer = lambda: gpt.configure_optimizers(  # noqa: E731
        args.weight_decay, args.learning_rate, device_type=device.split(":")[0])
    optimizer, progress = new_optimizer(), Progress()
    if ckpt is not None:
        progress = Progress(**{k: ckpt[k] for k in asdict(progress)})
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        print(f"{run_dir}: resuming after epoch {progress.epoch} (stage {progress.stage})")
    elif master:
        text = json.dumps(run_flags(args, method), indent=1)
        write_atomic(os.path.join(run_dir, "args.json"), lambda f: f.write(text.encode()))
    if master:
        steps = args.batch_size // world // args.micro_batch_size
        print(f"{method}: {gpt.get_num_params() / 1e6:.2f}M parameters, {len(data['train']['tokens'])} "
              f"training examples, {len(schedule)} epochs, batch {args.batch_size} = "
              f"{args.micro_batch_size} x {steps} x {world}, on {device}")
    for epoch in range(progress.epoch, len(schedule)):
        if schedule[epoch] != progress.stage or args.reset_optimizer == "epoch":
            if progress.stage is not None:  # a fresh AdamW: the paper resets it at each stage
                optimizer, progress.opt_steps = new_optimizer(), 0
            if schedule[epoch] != progress.stage:
                progress.best = float("-inf")  # "best" means best at the latest stage
            progress.stage = schedule[epoch]
        run.stage = progress.stage
        desc = f"{method} epoch {epoch + 1}/{len(schedule)} stage {progress.stage}"
        score = train_and_validate(args, run, train_model, optimizer, data, progress, ctx, desc)
        improved, progress.best = score > progress.best, max(score, progress.best)
        if master:
            save_epoch(args, method, run, optimizer, data, progress, improved)
        barrier()
    return test_best(args, method, run, data, ctx)


def run_flags(args, method):
    """The flags of one method's run, as its checkpoint and args.json keep them."""
    return {k: v for k, v in vars(args).items() if k != "methods"} | {"method": method}


def save_epoch(args, method, run, optimizer, data, progress, improved):
    """ckpt.pt, best.pt when the validation accuracy is the best of the stage, and the log. Best
    first, then last, then the log: a kill between two writes is repaired by the resume."""
    run_dir, gpt = os.path.join(args.out_dir, method), run.model.gpt
    ckpt = dict(model=gpt.state_dict(), model_args=asdict(gpt.config), vocab=run.vocab.ids, method=method,
                args=run_flags(args, method), data={s: d["sha256"] for s, d in data.items()},
                optimizer=optimizer.state_dict(), rng=rng_state(), **asdict(progress))
    if improved:
        save_checkpoint({k: v for k, v in ckpt.items() if k != "optimizer"}, os.path.join(run_dir, "best.pt"))
    save_checkpoint(ckpt, os.path.join(run_dir, "ckpt.pt"))
    write_jsonl(progress.history, os.path.join(run_dir, "log.jsonl"))


def test_best(args, method, run, data, ctx):
    """The test split, once, with the best checkpoint of the last stage."""
    run_dir = os.path.join(args.out_dir, method)
    best = read_checkpoint(os.path.join(run_dir, "best.pt"))
    ckpt = read_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    run.model.gpt.load_state_dict(best["model"])
    run.stage = best["stage"]
    test, _ = evaluate(run, data["test"], ctx, args.eval_batch_size, args.max_new_tokens)
    test = dict(test=True, method=method, stage=best["stage"], best_epoch=best["epoch"],
                val_acc=ckpt["history"][best["epoch"] - 1]["val_acc"],
                train_minutes=round(sum(h["seconds"] for h in ckpt["history"]) / 60, 2),
                **{f"test_{k}": round(v, 5) for k, v in test.items()})
    if master:  # the log first: a run whose ckpt.pt holds the test is finished and never rewrites it
        print(json.dumps(test) + chance_note(args, test))
        write_jsonl(ckpt["history"] + [test], os.path.join(run_dir, "log.jsonl"))
        save_checkpoint(dict(ckpt, test=test), os.path.join(run_dir, "ckpt.pt"))
    return test


# -----------------------------------------------------------------------------
# Methods side by side, and the main program

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
        return train_method(args, method, data, *setup_device(args.device, args.dtype, args.threads))
    except InputError as e:
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
            print(f"{r['method']}: done, test accuracy {100 * r['test_acc']:.1f}%" + chance_note(args, r))
            results[r["method"]] = r
        pool.close()
        pool.join()
    return [results[m] for m in args.methods]


def print_table(args, results, seconds):
    chance = " (chance: 50%)" if args.dataset in ("prosqa", "prontoqa") else ""
    print(f"\n{args.dataset} test accuracy{chance}, {seconds:.0f} s in all:")
    print("| method | test acc | val acc | tokens | passes | MFLOPs | minutes |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {100 * r['test_acc']:.1f}% | {100 * r['val_acc']:.1f}% | {r['test_tokens']:.1f} | "
              f"{r['test_passes']:.1f} | {r['test_flops'] / 1e6:.2f} | {r['train_minutes']:.1f} |")


def chance_note(args, result):
    """A plain sentence when a run's best validation accuracy at its last stage is within 10 points
    of chance (a question of ProsQA or ProntoQA has two possible answers): it did not learn."""
    if args.best_by != "accuracy" or args.dataset not in ("prosqa", "prontoqa") or result["val_acc"] >= 0.6:
        return ""
    return (f"\n{result['method']}: validation {100 * result['val_acc']:.1f}% at its last stage, at chance (50%): "
            f"it did not learn (README: when a run does not learn)")


def train_runs(args, data):
    """Every --method of one set of flags (one link of a chain) on its data, then their table."""
    device, ctx = setup_device(args.device, args.dtype, args.threads)
    t0 = time.time()
    if args.jobs > 1 and len(args.methods) > 1 and not ddp:
        results = train_in_parallel(args, data)
    else:
        results = [train_method(args, method, data, device, ctx) for method in args.methods]
    if master and len(results) > 1:
        print_table(args, results, time.time() - t0)


def main(argv=None):
    chain = get_chain(argv)
    try:
        with errors_in_one_line():
            check_run_folders(chain)  # before any long work
            for args in chain:
                if args.init in HUB_MODELS:
                    fetch_weights(args.init)
            for args in chain:  # every link's data folder checked before any is generated, or trained on
                load_data(args, generate=False)
            data = [load_data(args) for args in chain]
            for args, link_data in zip(chain, data):
                train_runs(args, link_data)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
