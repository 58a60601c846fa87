"""
Ask trained models questions and look at their continuous thoughts.

    python sample.py                                   # the newest runs (e.g. the CPU preset's), side by side
    python sample.py out/prosqa/coconut --index 0,17,42
    python sample.py out/cpu --file data/cpu/valid.json --num 5 --n-thoughts 0,4
    python sample.py --question "Every lempus is a zumpus. Tom is a lempus. Is Tom a zumpus or gorpus?"

A continuous thought is a hidden state, not a token. Two ways to read it are shown:
- the paper's lens for ProsQA (Figures 6-7): after thought k, make the model start the next step
  in language ("Every") and read the probability of each node's name there, its "value"
  (analyze.node_values): a model that searches breadth-first spreads it over the nodes k steps
  from the root;
- the LM head applied to the thought itself (Figure 4): its most likely tokens.
"""

import glob
import os

import torch

from analyze import node_values, thoughts_of
from checkpoint import runs_in
from common import ArgumentParser, InputError, bounded, counts, errors_in_one_line, nonempty
from data import bfs, children_of, decode, encode, grade
from evaluate import check_thoughts, fitted_tokens, forward_passes, model_flags, open_run, read_questions


def runs_under(path):
    """The run folders or checkpoint a path names: a run, a checkpoint, or a folder of runs (the
    newest one under out/ when path is None, so that after a preset all of its methods answer)."""
    if path is None:
        found = glob.glob(os.path.join("out", "**", "best.pt"), recursive=True)
        if not found:
            raise InputError("no run under out/: train one (python train.py --preset cpu), or pass RUN")
        path = os.path.dirname(os.path.dirname(max(found, key=os.path.getmtime)))
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "best.pt")) and runs_in(path):
        order = ["coconut", "cot", "no-cot"]  # the method first, then its baselines
        rank = {m: i for i, m in enumerate(order)}
        return sorted(runs_in(path), key=lambda r: rank.get(os.path.basename(r), len(order)))
    return [path]


def show(run, record, tokens, n_thoughts, args):
    """One model's answer to one question, with its thoughts read both ways."""
    prompt = run.example(tokens, prompt_only=True, n_thoughts=n_thoughts)
    batch = run.batch([prompt], for_generation=True)
    answer = run.model.generate(**batch, max_new_tokens=args.max_new_tokens or run.args.max_new_tokens)[0]
    thoughts = thoughts_of(run.model, batch)[0]
    print(f"  {run.curriculum.method} ({run.path}, stage {run.stage}"
          f"{'' if n_thoughts is None else f', {n_thoughts} thoughts'}):")
    with torch.no_grad():  # a thought read through the LM head, as the paper decodes them
        probs = torch.softmax(run.model.gpt.lm_head(thoughts).float(), dim=-1)
        top = torch.topk(probs, min(args.top_k, probs.size(-1)), dim=-1)
    depth = bfs(children_of(record), record["root"])[0] if "edges" in record else None
    for k in range(thoughts.size(0)):
        shown = "tokens " + ", ".join(f"{decode(run.vocab.to_gpt2([i]))!r} {p:.2f}"
                                      for p, i in zip(top.values[k].tolist(), top.indices[k].tolist()))
        if depth is not None:  # a ProsQA graph: the nodes first, with how many steps from the root
            values = sorted(node_values(run, [(tokens, record)], k + 1)[0].items(), key=lambda x: -x[1])
            shown = "nodes " + ", ".join(f"{record['idx_to_symbol'][n]} {v:.2f} (step {depth.get(n, '-')})"
                                         for n, v in values[:args.top_k]) + " | " + shown
        print(f"    thought {k + 1}: {shown}")
    text = decode(run.vocab.to_gpt2(answer))
    verdict = "" if record["answer"] is None else "  right" if grade(text, record["answer"]) else "  wrong"
    print("    A: " + text.replace("\n", "\n       ") + verdict)
    n_passes = forward_passes(thoughts.size(0), len(answer), run.model.feedback)
    print(f"       ({len(answer)} tokens, {thoughts.size(0)} thoughts, {n_passes} forward passes)")


def main(argv=None):
    p = ArgumentParser(description="Answer questions with trained models and show their thoughts.")
    model_flags(p, default_run="the runs of the newest folder under out/")
    p.add_argument("--index", type=counts, help="which records of the file, e.g. 0,5,9 (default: the first 3)")
    p.add_argument("--num", type=bounded(int, 1), help="how many records from the first (default 3)")
    p.add_argument("--question", type=nonempty, help="ask this question instead (no gold answer to grade against)")
    p.add_argument("--top-k", type=bounded(int, 1), default=3, help="nodes and tokens shown per thought")
    args = p.parse_args(argv)
    for a, b in (("question", "file"), ("question", "index"), ("question", "num"), ("index", "num")):
        if getattr(args, a) is not None and getattr(args, b) is not None:
            p.error(f"--{a} and --{b} do not go together: --{a} picks the questions")
    with errors_in_one_line():
        runs = [open_run(path, args) for path in runs_under(args.run)]
        questions = pick_questions(runs, args)
    for record, tokens_per_run in questions:
        print(f"Q: {record['question']}" + (f"\n   (gold: {record['answer']})" if record["answer"] else ""))
        for run, tokens in zip(runs, tokens_per_run):
            for k in thoughts_for(run, runs, args):
                show(run, record, tokens, k, args)
        print()


def thoughts_for(run, runs, args):
    """The thought counts a run answers with: --n-thoughts goes to the models that have thoughts;
    beside them, CoT answers once, as it does. A model without thoughts given some on its own is
    refused (read_questions)."""
    if args.n_thoughts is None or (not run.curriculum.markers and any(r.curriculum.markers for r in runs)):
        return [None]
    return args.n_thoughts


def pick_questions(runs, args):
    """[(record, [its tokens in each run's vocabulary])] to ask every run: --question, or records of
    a file (every model must know their tokens and fit them in its context, with the thoughts it
    will get)."""
    if args.question:
        tokens = [dict(question=encode(args.question + "\n"), steps=[], answer=[])]
        per_run = []
        for run in runs:
            ks = [k for k in thoughts_for(run, runs, args) if k is not None]
            check_thoughts(run, ks)
            per_run.append(fitted_tokens(run, tokens, "--question", ks))
        return [(dict(question=args.question, steps=[], answer=None), [t[0] for t in per_run])]
    per_run = []
    for i, run in enumerate(runs):  # the first run's test file by default
        ks = [k for k in thoughts_for(run, runs, args) if k is not None]
        questions = read_questions(run, args.file or (runs[0].args.test_file if i else None), ks or None)
        per_run.append(questions["tokens"])
    records = questions["records"]
    picked = args.index or range(min(args.num or 3, len(records)))
    for i in picked:
        if i >= len(records):
            raise InputError(f"--index {i}: the file has records 0 to {len(records) - 1}")
    return [(records[i], [tokens[i] for tokens in per_run]) for i in picked]


if __name__ == "__main__":
    main()
