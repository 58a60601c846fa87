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

from checkpoint import CheckpointError, UnknownRecipe, WrongMethod, best_checkpoint, check_method, load_model
from coconut import METHODS, Coconut, Curriculum, build_example, collate
from common import (ArgumentParser, InputError, bounded, check_output, counts, ddp, errors_in_one_line, flag,
                    nonempty, pick_device, rank, setup_device, to_device, world, write_jsonl)
from config import PAPER_RECIPE, curriculum_of
from data import DataError, decode, grade, read_records, tokenize_record


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
    model = Coconut(gpt.to(device), vocab.special, curriculum.feedback).eval()
    return Run(model, vocab, curriculum, stage, args, path, epoch)


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


@torch.no_grad()
def evaluate(run, questions, ctx, batch_size, max_new_tokens, n_thoughts=None):
    """Greedy answers to questions (dict(records, tokens), as data.load_split gives them), graded
    as the paper does. Returns the metrics: accuracy, mean generated tokens (thoughts included),
    forward passes (forward_passes) and seconds per question; and each question's answer,
    {index: dict(output, correct)}. Prompts are sorted by length: batches carry little padding.
    Under torchrun each process answers its share of the questions."""
    model, device = run.model.eval(), next(run.model.parameters()).device
    prompts = [run.example(t, prompt_only=True, n_thoughts=n_thoughts) for t in questions["tokens"]]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))[rank::world]
    sums = torch.zeros(4, dtype=torch.float64)  # correct, tokens, passes, questions
    outputs, t0 = {}, time.time()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = run.batch([prompts[j] for j in idx], for_generation=True)
        with ctx:
            answers = model.generate(**batch, max_new_tokens=max_new_tokens)
        for j, ids in zip(idx, answers):
            text = decode(run.vocab.to_gpt2(ids))
            outputs[j] = dict(output=text, correct=grade(text, questions["records"][j]["answer"]))
            n_latent = prompts[j]["input_ids"].count(run.vocab.special.latent)
            passes = forward_passes(n_latent, len(ids), model.feedback)
            sums += torch.tensor([outputs[j]["correct"], len(ids) + n_latent, passes, 1], dtype=torch.float64)
    if ddp:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
    correct, n_tokens, n_passes, n = sums.tolist()
    seconds = (time.time() - t0) * world
    return dict(acc=correct / n, tokens=n_tokens / n, passes=n_passes / n, s_per_q=seconds / n), outputs


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
    p.add_argument("--predictions", type=nonempty, metavar="FILE",
                   help="each question's output, gold answer and verdict, as jsonl")
    p.add_argument("--batch-size", type=bounded(int, 1), default=32, help="questions answered at once")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU")
    p.add_argument("--threads", type=bounded(int, 1), help="CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if ddp:
        p.error("evaluate.py runs in one process: python evaluate.py ..., not under torchrun")
    with errors_in_one_line():
        if args.predictions:
            check_output(args.predictions, "--predictions")
        device, ctx = setup_device(args.device, args.dtype, args.threads)
        run = open_run(args.run, args)
        questions = read_questions(run, args.file, args.n_thoughts)
    trained = f"epoch {run.epoch}" if run.epoch else "trained elsewhere"
    print(f"{run.path}: {run.curriculum.method}, stage {run.stage}, {trained}; {questions['path']}: "
          f"{len(questions['records'])} questions")
    predictions = []
    for k in args.n_thoughts or [None]:
        r, outputs = evaluate(run, questions, ctx, args.batch_size, args.max_new_tokens or run.args.max_new_tokens,
                              n_thoughts=k)
        print(f"{'' if k is None else f'k={k}  '}accuracy {100 * r['acc']:.1f}%  tokens {r['tokens']:.1f}  "
              f"forward passes {r['passes']:.1f}  {r['s_per_q'] * 1000:.1f} ms/question")
        predictions += [dict(index=i, **({} if k is None else dict(k=k)), question=questions["records"][i]["question"],
                             output=outputs[i]["output"], answer=questions["records"][i]["answer"],
                             correct=outputs[i]["correct"]) for i in sorted(outputs)]
    if args.predictions:
        with errors_in_one_line():
            write_jsonl(predictions, args.predictions)
        print(f"wrote {len(predictions)} predictions to {args.predictions}")


if __name__ == "__main__":
    main()
