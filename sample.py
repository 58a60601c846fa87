"""
Ask a trained model questions and look at its continuous thoughts.

Flow of the repository: data -> model -> coconut -> train -> sample.

    python sample.py                                   # the latest run's best checkpoint, 3 test questions
    python sample.py --ckpt out/prosqa/coconut --index 0,17,42
    python sample.py --file data/prosqa/valid.json --num 5 --n-thoughts 2
    python sample.py --question "Every lempus is a zumpus. Tom is a lempus. Is Tom a zumpus or gorpus?"

Each continuous thought is a hidden state, not a token; as in the paper (Figure 4) we read it
through the language-model head and print its most likely tokens, which shows what the model is
"thinking of" (in ProsQA, often several candidate nodes at once: the frontier of a search).
"""

import glob
import os
import sys

import torch

from checkpoint import CheckpointError, load_run, read_questions
from coconut import build_example, collate
from data import ArgumentParser, DataError, decode, encode, grade


def latest_checkpoint(root="out"):
    """The best.pt written most recently under root: the run you just trained."""
    found = glob.glob(os.path.join(root, "**", "best.pt"), recursive=True)
    if not found:
        raise CheckpointError(f"no checkpoint under {root}/: train one first (python train.py --preset cpu), "
                         f"or pass --ckpt")
    return max(found, key=os.path.getmtime)


def main(argv=None):
    p = ArgumentParser(description="Answer questions with a trained checkpoint and show its thoughts.")
    p.add_argument("--ckpt", help="a checkpoint (.pt) or run folder (default: the newest best.pt under out/)")
    p.add_argument("--file", help="an official-format JSON file (default: the run's test file)")
    p.add_argument("--index", help="which records of the file, e.g. 0,5,9 (default: the first --num)")
    p.add_argument("--num", type=int, default=3, help="how many records when --index is not given")
    p.add_argument("--question", help="ask this question instead (no gold answer to grade against)")
    p.add_argument("--n-thoughts", type=int, help="thoughts to use (default: as the model was trained)")
    p.add_argument("--top-k", type=int, default=3, help="tokens shown per thought")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu is plenty for a few questions")
    args = p.parse_args(argv)
    for flag in ("num", "top_k", "max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.n_thoughts is not None and args.n_thoughts < 0:
        p.error(f"--n-thoughts {args.n_thoughts}: must be at least 0")
    ks = None if args.n_thoughts is None else [args.n_thoughts]
    try:
        run = load_run(args.ckpt or latest_checkpoint(), args.device)
        if args.question:
            records = [dict(question=args.question, steps=[], answer=None)]
            tokens = [dict(question=encode(args.question + "\n"), steps=[], answer=[])]
        else:
            records, tokens = read_questions(run, args.file, "--file", ks)
            if args.index and not all(i.strip().isdigit() for i in args.index.split(",")):
                raise CheckpointError(f"--index {args.index}: expected record numbers separated by commas, e.g. 0,5,9")
            picked = [int(i) for i in args.index.split(",")] if args.index else range(min(args.num, len(records)))
            for i in picked:
                if not 0 <= i < len(records):
                    raise CheckpointError(f"--index {i}: {args.file or run.args.test_file} has records 0 to "
                                     f"{len(records) - 1}")
            records, tokens = [records[i] for i in picked], [tokens[i] for i in picked]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    model, gpt, vocab = run.model.eval(), run.model.gpt, run.model.vocab
    print(f"{run.path}: {run.curriculum.method} on {run.args.dataset}, stage {run.stage}, epoch {run.epoch}\n")
    for record, t in zip(records, tokens):
        prompt = build_example(t, run.curriculum, run.stage, prompt_only=True, n_thoughts=args.n_thoughts)
        batch = collate([prompt], for_generation=True, device=args.device)
        answers, thoughts, n_passes = model.generate(**batch, max_new_tokens=args.max_new_tokens, return_thoughts=True)
        print(f"Q: {record['question']}")
        with torch.no_grad():  # a thought read through the LM head, as the paper decodes them
            probs = torch.softmax(gpt.lm_head(thoughts[0]).float(), dim=-1)
            top = torch.topk(probs, min(args.top_k, probs.size(-1)), dim=-1)
        for k in range(thoughts[0].size(0)):
            shown = ", ".join(f"{decode(vocab.to_gpt2([i]))!r} {p:.2f}"
                              for p, i in zip(top.values[k].tolist(), top.indices[k].tolist()))
            print(f"  thought {k + 1}: {shown}")
        text = decode(answers[0])
        print("A: " + text.replace("\n", "\n   "))
        if record["answer"] is not None:
            verdict = "right" if grade(text, record["answer"]) else f"wrong (gold: {record['answer']})"
            print(f"   {verdict}")
        print(f"   ({len(answers[0])} tokens, {thoughts[0].size(0)} thoughts, {n_passes} forward passes)\n")


if __name__ == "__main__":
    main()
