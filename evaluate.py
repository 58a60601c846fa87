"""
Ask a trained model the questions of a file, and grade its answers as the paper does.

    python evaluate.py out/prosqa/coconut                               # its test split
    python evaluate.py out/prosqa/coconut --n-thoughts 0,1,2,3,4,5,6    # the paper's sweep of k
    python evaluate.py checkpoint_50 --method coconut --dataset prosqa --file data/prosqa/test.json

It prints the accuracy, the generated tokens (thoughts counted, as the paper counts them), the
forward passes and the time per question; --predictions writes each question's output, gold
answer and verdict. It also holds what every command that takes a trained model shares (this one,
sample.py, analyze.py, and train.py's own evaluation): a Run, the model and the layout of its
prompts; load_run, which opens one from any checkpoint; and model_flags, open_run and
read_questions, which take it and its questions from the command line alike everywhere.
"""

import argparse
import os
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from checkpoint import CheckpointError, UnknownRecipe, WrongMethod, best_checkpoint, check_method, load_model
from coconut import METHODS, Coconut, Curriculum, build_example, collate
from common import (ArgumentParser, InputError, bounded, check_output, counts, ddp, errors_in_one_line, flag,
                    nonempty, pick_device, rank, setup_device, to_device, world, write_jsonl)
from config import PAPER_RECIPE, curriculum_of
from data import DataError, decode, grade, read_records, tokenize_record
from model import KVCache
from recurrent import Recurrent, RecurrentGPT


@dataclass
class Run:
    """A model ready to answer questions: the Coconut, the token ids it knows, and the layout of
    its prompts (its curriculum at a stage)."""
    model: Coconut
    vocab: object  # data.Vocab
    curriculum: Curriculum
    stage: int  # the stage it was trained at last: the layout of its prompts
    args: argparse.Namespace = None  # the flags it was trained with (for other checkpoints: the paper's)
    path: str = None
    epoch: int = None  # None for checkpoints not written by train.py

    def example(self, tokens, **kwargs):
        """coconut.build_example at the run's stage, tokens in its vocabulary."""
        return build_example(tokens, self.curriculum, self.stage, special=self.vocab.special, **kwargs)

    def batch(self, examples, for_generation=False):
        """coconut.collate, on the model's device (and padded for it: common.to_device)."""
        batch = collate(examples, for_generation, self.vocab.special)
        return to_device(batch, next(self.model.parameters()).device, self.vocab.special)


def load_run(path, device="cpu", method=None, dataset=None):
    """A trained model ready to answer: a run of train.py (a checkpoint, or a run folder: its
    best.pt), which knows its method and dataset; or GPT-2 weights trained elsewhere (the official
    code's state dicts), for which method and dataset must be given. Those answer at the last
    stage of the paper's curriculum for the dataset, as the official evaluation does."""
    gpt, vocab, ckpt = load_model(path)
    if "model_args" in ckpt:  # a run says what it is; a method or dataset given must agree
        args, epoch = argparse.Namespace(**ckpt["args"]), ckpt["epoch"]
        for asked, trained in ((method, args.method), (dataset, args.dataset)):
            if asked not in (None, trained):
                raise CheckpointError(f"{path} was trained by train.py as {args.method} on {args.dataset}, "
                                      f"not {asked}")
        path = path if os.path.isfile(path) else best_checkpoint(path)
    else:
        missing = [name for name, given in (("method", method), ("dataset", dataset)) if not given]
        if missing:
            raise UnknownRecipe(f"{path}: a GPT-2 state dict does not say what it was trained for", missing)
        args, epoch = argparse.Namespace(method=method, dataset=dataset, test_file=None, uniform_prob=0.0,
                                         **PAPER_RECIPE[dataset]), None
    curriculum = curriculum_of(args, args.method)
    if "model_args" not in ckpt:
        check_method(path, ckpt, curriculum)
    stage = ckpt["stage"] if "model_args" in ckpt else curriculum.stages[-1]
    return Run(answerer(gpt.to(device), vocab, curriculum).eval(), vocab, curriculum, stage, args, path, epoch)


def answerer(gpt, vocab, curriculum):
    """The model around a GPT that trains and answers: a Coconut, or the recurrent-depth model's."""
    if isinstance(gpt, RecurrentGPT):
        return Recurrent(gpt, vocab.special)
    return Coconut(gpt, vocab.special, curriculum.feedback)


def check_fits(tokens, path, curriculum, stages, block_size, vocab, n_thoughts=()):
    """Every record must fit the context at every stage it will see (and its prompt with each of
    n_thoughts thoughts, leaving room for an answer), in tokens the model knows."""
    for i, t in enumerate(tokens):
        n = max(len(build_example(t, curriculum, s)["input_ids"]) for s in stages)
        if n > block_size:
            raise DataError(f"{path}: record {i} is {n} tokens long, more than the model's context of "
                            f"{block_size} (a model with a larger context, or shorter examples)")
        for k in n_thoughts:
            n = len(build_example(t, curriculum, stages[0], prompt_only=True, n_thoughts=k)["input_ids"])
            if n >= block_size:
                raise DataError(f"{path}: with {k} thoughts the prompt of record {i} would be {n} tokens, "
                                f"leaving no room for an answer in the model's context of {block_size}")
        unknown = [x for x in t["question"] + sum(t["steps"], []) + t["answer"] if not vocab.knows(x)]
        if unknown:
            raise DataError(f"{path}: record {i} has the token {decode(unknown[:1])!r}, which this model's "
                            f"vocabulary (the tokens of the files it was trained on) does not hold")


def forward_passes(n_thoughts, n_answer_tokens, feedback=True):
    """The forward passes one question takes at batch size 1, as the paper counts them: the prompt,
    one more per thought fed back (each needs the hidden state of the pass before), then one per
    answer token, whose pass gives the next token (the last gives the end of text)."""
    return 1 + n_thoughts * feedback + n_answer_tokens


def forward_flops(gpt, n_positions, n_reads, iterations=1):
    """Forward FLOPs of one question as a decoder with a KV cache spends them: 2 per weight of each
    matrix a position passes through (for the recurrent model, the core and its adapter once per
    iteration), and the output layer at the n_reads positions whose next token is read.
    Attention's own products are left out (under 5% at these lengths)."""
    matrices = lambda modules: 2 * sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)  # noqa: E731
    if isinstance(gpt, RecurrentGPT):
        prelude, core, coda = gpt.blocks()
        per_position = matrices([*prelude, *coda]) + iterations * matrices([*core, gpt.adapter])
    else:
        per_position = matrices(gpt.transformer.h)
    return per_position * n_positions + 2 * gpt.lm_head.weight.numel() * n_reads


@torch.no_grad()
def count_thoughts(run, tokens, exit, threshold, batch_size):
    """How many thoughts a Coconut gives each question when it decides when to stop, at most the
    thoughts of its last stage. exit "head": until its stop classifier says stop (the paper's
    unshipped option, Section 3). exit "kl", a rule with no training: until the next thought would
    predict, read through the output layer as the paper decodes thoughts, what the thought one
    reasoning step (c thoughts) before it predicted, KL below threshold: a step that adds nothing,
    as Huginn's exit stops an iteration that changes nothing."""
    gpt, c = run.model.gpt, run.curriculum.c
    cap = min(run.stage, run.curriculum.max_latent_stage) * c
    prompts = [{"input_ids": run.example(t, prompt_only=True, n_thoughts=0)["input_ids"][:-1]} for t in tokens]
    counts = []
    for i in range(0, len(prompts), batch_size):  # each batch up to <|start-latent|>, then a thought at a time
        batch, cache = run.batch(prompts[i:i + batch_size], for_generation=True), KVCache()
        h = gpt.hidden(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"],
                       cache=cache)[:, -1]
        position = batch["position_ids"][:, -1]
        n, done, lens = torch.zeros_like(position), torch.zeros_like(position, dtype=torch.bool), []
        for j in range(cap + 1):  # j thoughts so far; h would be the next
            if exit == "head":
                done |= gpt.stop_head(h)[:, 0] < 0
            else:
                logits = gpt.lm_head(h)
                lens.append(F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1))
                if j >= c:  # KL(one step before || now)
                    done |= (lens[-1 - c].exp() * (lens[-1 - c] - lens[-1])).sum(-1) < threshold
            if j == cap or done.all():
                break
            n, position = n + ~done, position + 1  # rows that are done feed theirs too, uncounted
            h = gpt.hidden(embeds=h[:, None], position_ids=position[:, None], cache=cache)[:, -1]
        counts += n.tolist()
    return counts


@torch.no_grad()
def evaluate(run, questions, ctx, batch_size, max_new_tokens, n_thoughts=None, iterations=None, exit=None,
             threshold=1e-3):
    """Greedy answers to questions (dict(records, tokens), as data.load_split gives them), graded
    as the paper does. n_thoughts: a Coconut's thoughts (default: as trained); iterations: the
    recurrent model's (default: its mean in training); exit: either decides when to stop, "kl" by
    a KL threshold, "head" by a Coconut's stop classifier (count_thoughts, recurrent.py).
    Returns the metrics: accuracy, mean generated tokens (thoughts included), thoughts, core
    iterations per generated token, forward passes (forward_passes), forward FLOPs (forward_flops)
    and seconds per question; and each question's answer, {index: dict(output, correct)}. Prompts
    are sorted by length: batches carry little padding. Under torchrun each process answers its
    share of the questions."""
    model, device, gpt = run.model.eval(), next(run.model.parameters()).device, run.model.gpt
    recurrent = isinstance(gpt, RecurrentGPT)
    if recurrent:
        gpt.iterations, gpt.exit_threshold = iterations or gpt.config.mean_iterations, threshold if exit else None
    elif exit:
        n_thoughts = count_thoughts(run, questions["tokens"], exit, threshold, batch_size)
    ks = n_thoughts if isinstance(n_thoughts, list) else [n_thoughts] * len(questions["tokens"])
    prompts = [run.example(t, prompt_only=True, n_thoughts=k) for t, k in zip(questions["tokens"], ks)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))[rank::world]
    sums = torch.zeros(7, dtype=torch.float64)  # correct, tokens, thoughts, iterations, passes, flops, questions
    outputs, t0 = {}, time.time()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = run.batch([prompts[j] for j in idx], for_generation=True)
        with ctx:
            answers = model.generate(**batch, max_new_tokens=max_new_tokens)
        for row, (j, ids) in enumerate(zip(idx, answers)):
            text = decode(run.vocab.to_gpt2(ids))
            outputs[j] = dict(output=text, correct=grade(text, questions["records"][j]["answer"]))
            n_prompt, n_latent = len(prompts[j]["input_ids"]), prompts[j]["input_ids"].count(run.vocab.special.latent)
            if recurrent:  # the prompt at the first step's iterations, each token fed back at its own step's
                its = [int(r[row]) for r in model.iterations_per_token if r[row] > 0]
                flops = forward_flops(gpt, n_prompt, 1, its[0]) + sum(forward_flops(gpt, 1, 1, r) for r in its[1:])
            else:
                its, flops = [0], forward_flops(gpt, n_prompt + len(ids), len(ids) + 1)
            passes = forward_passes(n_latent, len(ids), model.feedback)
            sums += torch.tensor([outputs[j]["correct"], len(ids) + n_latent, n_latent, sum(its) / len(its), passes,
                                  flops, 1], dtype=torch.float64)
    if ddp:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
    correct, n_tokens, n_latent, n_iterations, n_passes, flops, n = sums.tolist()
    seconds = (time.time() - t0) * world
    return dict(acc=correct / n, tokens=n_tokens / n, thoughts=n_latent / n, iterations=n_iterations / n,
                passes=n_passes / n, flops=flops / n, s_per_q=seconds / n), outputs


# -----------------------------------------------------------------------------
# What every command that takes a trained model shares

def model_flags(p, dataset=True, default_run=None):
    """The flags of a trained model and its questions, spelled alike in every command."""
    p.add_argument("run", type=nonempty, nargs="?" if default_run else None, help="a run folder or checkpoint "
                   f"(ours, or the official code's: then --method{' and --dataset' * dataset})"
                   f"{f'; default: {default_run}' if default_run else ''}")
    p.add_argument("--file", type=nonempty,
                   help="an official-format JSON file of questions (default: the run's test file)")
    p.add_argument("--n-thoughts", type=counts, help="thoughts per question, e.g. 0,1,2 (default: as trained)")
    p.add_argument("--max-new-tokens", type=bounded(int, 1), help="greedy decoding budget, within the model's context "
                   "(default: the run's)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cpu, cuda:1")
    p.add_argument("--method", choices=METHODS, help="for a checkpoint trained elsewhere: its method")
    if dataset:
        p.add_argument("--dataset", choices=sorted(PAPER_RECIPE), help="... and its dataset")


def open_run(path, args, dataset=None):
    """load_run with the command's flags, its refusals worded in them."""
    try:
        return load_run(path, pick_device(args.device), args.method, dataset or args.dataset)
    except UnknownRecipe as e:
        raise InputError(f"{e}: pass {' and '.join(map(flag, e.missing))} (e.g. --method coconut "
                         f"--dataset prosqa)") from None
    except WrongMethod as e:
        raise InputError(f"--method {args.method}: {e}") from None


def read_questions(run, path=None, n_thoughts=None, check=None):
    """The questions of a file, dict(path, records, tokens) (path None: the run's test file),
    checked to fit the run's model, also with each number of thoughts in n_thoughts, and by
    check(record, where) if given."""
    if path is None:
        path = run.args.test_file
        if path is None:
            raise InputError(f"{run.path} comes without a test file: pass --file FILE")
        if not os.path.exists(path):
            raise InputError(f"{path}: the run's test file is gone (moved?): pass --file FILE")
    check_thoughts(run, n_thoughts)
    records = read_records(run.args.dataset, path)
    for i, r in enumerate(records):
        if check:
            check(r, f"{path}: record {i}")
    tokens = [tokenize_record(r, i, path) for i, r in enumerate(records)]
    return dict(path=path, records=records, tokens=fitted_tokens(run, tokens, path, n_thoughts))


def check_thoughts(run, n_thoughts):
    """--n-thoughts only for a model that has thoughts."""
    if n_thoughts and not run.curriculum.markers:
        raise InputError(f"--n-thoughts: a {run.curriculum.method} model has no thoughts")


def fitted_tokens(run, tokens, where, n_thoughts=None):
    """Tokenized records, checked to fit the run's model (also with each number of thoughts in
    n_thoughts), in its vocabulary's ids."""
    fits = lambda ks: check_fits(tokens, where, run.curriculum, [run.stage], run.model.gpt.config.block_size,  # noqa: E731
                                 run.vocab, ks)
    fits(())
    for k in n_thoughts or ():
        try:
            fits([k])
        except DataError as e:
            raise InputError(f"--n-thoughts {k}: {e}") from None
    return [run.vocab.map_tokens(t) for t in tokens]


def main(argv=None):
    p = ArgumentParser(description="Answer the questions of a file with a trained model, graded as the paper does.")
    model_flags(p)
    p.add_argument("--iterations", type=counts, help="the recurrent model's core iterations, e.g. 1,2,4,8 "
                   "(default: its mean in training)")
    p.add_argument("--exit", choices=["kl", "head"], help="decide when to stop: the recurrent model's iterations, or "
                   "a Coconut's thoughts, when the next-token distribution stops changing (kl), or by a Coconut's "
                   "stop classifier (head, trained with --stop-head)")
    p.add_argument("--exit-threshold", type=bounded(float, 0.0), help="KL below which --exit kl stops (default 1e-3)")
    p.add_argument("--predictions", type=nonempty, metavar="FILE",
                   help="each question's output, gold answer and verdict, as jsonl")
    p.add_argument("--batch-size", type=bounded(int, 1), default=32, help="questions answered at once")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU")
    p.add_argument("--threads", type=bounded(int, 1), help="CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if ddp:
        p.error("evaluate.py runs in one process: python evaluate.py ..., not under torchrun")
    if args.exit_threshold is not None and args.exit != "kl":
        p.error("--exit-threshold is the threshold of --exit kl")
    if args.exit and args.n_thoughts:
        p.error("--exit decides the number of thoughts: give it or --n-thoughts, not both")
    with errors_in_one_line():
        if args.predictions:
            check_output(args.predictions, "--predictions")
        device, ctx = setup_device(args.device, args.dtype, args.threads)
        run = open_run(args.run, args)
        check_compute(run, args)
        questions = read_questions(run, args.file, args.n_thoughts)
    trained = f"epoch {run.epoch}" if run.epoch else "trained elsewhere"
    print(f"{run.path}: {run.curriculum.method}, stage {run.stage}, {trained}; {questions['path']}: "
          f"{len(questions['records'])} questions")
    settings = ([("k", dict(n_thoughts=k)) for k in args.n_thoughts or []] + [("r", dict(iterations=r))
                for r in args.iterations or []]) or [(None, dict(iterations=None))]
    predictions = []
    for name, setting in settings:
        value = next(iter(setting.values()))
        r, outputs = evaluate(run, questions, ctx, args.batch_size, args.max_new_tokens or run.args.max_new_tokens,
                              **setting, exit=args.exit, threshold=args.exit_threshold or 1e-3)
        label = f"{name}={value}  " if value is not None else f"exit {args.exit}  " if args.exit else ""
        extra = (f"thoughts {r['thoughts']:.2f}  " if run.curriculum.markers else "") + (
            f"iterations {r['iterations']:.2f}  " if isinstance(run.model.gpt, RecurrentGPT) else "")
        print(f"{label}accuracy {100 * r['acc']:.1f}%  tokens {r['tokens']:.1f}  {extra}forward passes "
              f"{r['passes']:.1f}  {r['flops'] / 1e6:.2f} MFLOPs  {r['s_per_q'] * 1000:.1f} ms/question")
        predictions += [dict(index=i, **({} if value is None else {name: value}),
                             question=questions["records"][i]["question"], output=outputs[i]["output"],
                             answer=questions["records"][i]["answer"], correct=outputs[i]["correct"])
                        for i in sorted(outputs)]
    if args.predictions:
        with errors_in_one_line():
            write_jsonl(predictions, args.predictions)
        print(f"wrote {len(predictions)} predictions to {args.predictions}")


def check_compute(run, args):
    """--iterations and --exit only where they change something."""
    recurrent = isinstance(run.model.gpt, RecurrentGPT)
    if args.iterations and not recurrent:
        raise InputError(f"--iterations: a {run.curriculum.method} model has no loop to iterate (--method recurrent)")
    if args.exit and not (recurrent or run.curriculum.markers and run.curriculum.feedback):
        raise InputError(f"--exit: a {run.curriculum.method} model has neither thoughts nor iterations to stop")
    if args.exit == "head" and not run.model.gpt.config.stop_head:
        raise InputError(f"--exit head: {run.path} has no stop head (train.py --stop-head trains one)")
    if args.exit and args.iterations and len(args.iterations) > 1:
        raise InputError("--exit decides the iterations: give at most one --iterations, the cap")


if __name__ == "__main__":
    main()
