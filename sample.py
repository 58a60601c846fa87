"""
Ask trained models questions and look at their continuous thoughts.

Flow of the repository: data -> model -> coconut -> checkpoint -> train -> sample -> analyze.

    python sample.py                                   # the newest runs (e.g. the CPU preset's), side by side
    python sample.py --ckpt out/prosqa/coconut --index 0,17,42
    python sample.py --ckpt out/cpu-small --file data/prosqa-small/valid.json --num 5
    python sample.py --question "Every lempus is a zumpus. Tom is a lempus. Is Tom a zumpus or gorpus?"

A continuous thought is a hidden state, not a token. Two ways to read it are shown:
- the paper's lens for ProsQA (Figures 6-7): after thought k, make the model start the next step
  in language ("Every") and read the probability of each node's name there, its "value": a
  model that searches breadth-first spreads it over the nodes k steps from the root;
- the LM head applied to the thought itself (Figure 4): its most likely tokens.
"""

import glob
import os

import torch

from checkpoint import CheckpointError, check_fits, load_run, read_questions, runs_in
from coconut import build_example, collate
from data import PAPER_RECIPE, ArgumentParser, bfs, bounded, children_of, counts, decode, encode, errors_in_one_line, grade


@torch.no_grad()
def node_values(run, questions, k, batch_size=256):
    """For each (tokens, record) of a ProsQA question, {node: value} after k thoughts: the
    probability of the node's name right after the forced start of a step, "Every" (the product
    over its tokens; nodes with a parent: the others are never an "Every")."""
    every, rows, examples = encode("Every"), [], []
    for q, (tokens, record) in enumerate(questions):
        prompt = build_example(tokens, run.curriculum, run.stage, prompt_only=True, n_thoughts=k)["input_ids"]
        for node in sorted({v for _, v in record["edges"]}):
            name = encode(" " + record["idx_to_symbol"][node])
            rows.append((q, node))
            labels = [-100] * (len(prompt) + len(every)) + name
            examples.append({"input_ids": prompt + every + name, "labels": labels})
    values = [{} for _ in questions]
    device = run.model.gpt.lm_head.weight.device
    for i in range(0, len(examples), batch_size):
        logp = run.model.score(**collate(examples[i:i + batch_size], device=device))
        for (q, node), value in zip(rows[i:i + batch_size], logp.exp().tolist()):
            values[q][node] = value
    return values


def runs_under(path):
    """The run folders or checkpoint a path names: a run, a checkpoint, or a folder of runs (the
    newest one under out/ when path is None, so that after a preset all of its methods answer)."""
    if path is None:
        found = glob.glob(os.path.join("out", "**", "best.pt"), recursive=True)
        if not found:
            raise CheckpointError("no run under out/: train one (python train.py --preset cpu), or pass --ckpt")
        path = os.path.dirname(os.path.dirname(max(found, key=os.path.getmtime)))
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "best.pt")) and runs_in(path):
        order = ["coconut", "cot", "no-cot"]  # the method first, then its baselines
        rank = {m: i for i, m in enumerate(order)}
        return sorted(runs_in(path), key=lambda r: rank.get(os.path.basename(r), len(order)))
    return [path]


def show(run, record, tokens, n_thoughts, args):
    """One model's answer to one question, with its thoughts read both ways."""
    prompt = build_example(tokens, run.curriculum, run.stage, prompt_only=True, n_thoughts=n_thoughts)
    batch = collate([prompt], for_generation=True, device=run.model.gpt.lm_head.weight.device)
    answers, thoughts, n_passes = run.model.generate(**batch, max_new_tokens=args.max_new_tokens or
                                                     run.args.max_new_tokens, return_thoughts=True)
    print(f"  {run.curriculum.method} ({run.path}, stage {run.stage}):")
    with torch.no_grad():  # a thought read through the LM head, as the paper decodes them
        probs = torch.softmax(run.model.gpt.lm_head(thoughts[0]).float(), dim=-1)
        top = torch.topk(probs, min(args.top_k, probs.size(-1)), dim=-1)
    depth = bfs(children_of(record), record["root"])[0] if "edges" in record else None
    for k in range(thoughts[0].size(0)):
        shown = "tokens " + ", ".join(f"{decode(run.model.vocab.to_gpt2([i]))!r} {p:.2f}"
                                      for p, i in zip(top.values[k].tolist(), top.indices[k].tolist()))
        if depth is not None:  # a ProsQA graph: the nodes first, with how many steps from the root
            values = sorted(node_values(run, [(tokens, record)], k + 1)[0].items(), key=lambda x: -x[1])
            shown = "nodes " + ", ".join(f"{record['idx_to_symbol'][n]} {v:.2f} (step {depth.get(n, '-')})"
                                         for n, v in values[:args.top_k]) + " | " + shown
        print(f"    thought {k + 1}: {shown}")
    text = decode(answers[0])
    verdict = "" if record["answer"] is None else "  right" if grade(text, record["answer"]) else "  wrong"
    print("    A: " + text.replace("\n", "\n       ") + verdict)
    print(f"       ({len(answers[0])} tokens, {thoughts[0].size(0)} thoughts, {n_passes} forward passes)")


def main(argv=None):
    p = ArgumentParser(description="Answer questions with trained models and show their thoughts.")
    p.add_argument("--ckpt", help="a run folder, a checkpoint or a folder of runs (default: the newest)")
    p.add_argument("--file", help="an official-format JSON file (default: the first run's test file)")
    p.add_argument("--index", type=counts, help="which records of the file, e.g. 0,5,9 (default: the first 3)")
    p.add_argument("--num", type=bounded(int, 1), help="how many records from the first (default 3)")
    p.add_argument("--question", help="ask this question instead (no gold answer to grade against)")
    p.add_argument("--n-thoughts", type=bounded(int, 0), help="thoughts to use (default: as trained)")
    p.add_argument("--top-k", type=bounded(int, 1), default=3, help="nodes and tokens shown per thought")
    p.add_argument("--max-new-tokens", type=bounded(int, 1), help="default: as the run was evaluated")
    p.add_argument("--device", default="cpu", help="cpu is plenty for a few questions")
    p.add_argument("--method", help="for a checkpoint trained elsewhere (the official code): its method")
    p.add_argument("--dataset", choices=sorted(PAPER_RECIPE), help="... and its dataset")
    args = p.parse_args(argv)
    for a, b in (("question", "file"), ("question", "index"), ("question", "num"), ("index", "num")):
        if getattr(args, a) is not None and getattr(args, b) is not None:
            p.error(f"--{a} and --{b} do not go together: --{a} picks the questions")
    with errors_in_one_line():
        runs = [load_run(path, args.device, args.method, args.dataset) for path in runs_under(args.ckpt)]
        questions = pick_questions(runs, args)
    for record, tokens in questions:
        print(f"Q: {record['question']}" + (f"\n   (gold: {record['answer']})" if record["answer"] else ""))
        for run in runs:
            show(run, record, tokens, thoughts_for(run, runs, args), args)
        print()


def thoughts_for(run, runs, args):
    """--n-thoughts goes to the models that have thoughts; beside them, CoT answers as it does. A
    model without thoughts given some on its own is refused (read_questions, check_fits)."""
    if args.n_thoughts is None or (not run.curriculum.markers and any(r.curriculum.markers for r in runs)):
        return None
    if not run.curriculum.markers:
        raise CheckpointError(f"--n-thoughts: a {run.curriculum.method} model has no thoughts")
    return args.n_thoughts


def pick_questions(runs, args):
    """[(record, tokens)] to ask every run: --question, or records of a file (every model must
    know their tokens and fit them in its context, with the thoughts it will get)."""
    if args.question:
        tokens = dict(question=encode(args.question + "\n"), steps=[], answer=[])
        for run in runs:
            k = thoughts_for(run, runs, args)
            check_fits([tokens], "--question", run.curriculum, [run.stage], run.model.gpt.config.block_size,
                       run.model.vocab, () if k is None else [k])
        return [(dict(question=args.question, steps=[], answer=None), tokens)]
    for i, run in enumerate(runs):  # the first run's test file by default
        k = thoughts_for(run, runs, args)
        records, tokens = read_questions(run, args.file or (runs[0].args.test_file if i else None), "--file",
                                         None if k is None else [k])
    picked = args.index or range(min(args.num or 3, len(records)))
    for i in picked:
        if i >= len(records):
            raise CheckpointError(f"--index {i}: the file has records 0 to {len(records) - 1}")
    return [(records[i], tokens[i]) for i in picked]


if __name__ == "__main__":
    main()
