"""
ProsQA in a compact format, and a lookup task to train on first: the experiment of NOTES.md that
took a small model from scratch past chance on questions that need the chain.

    python data.py --dataset prosqa --out data/sd --names short --other-option same-depth \\
        --max-nodes 7 --min-steps 2 --max-steps 3 --n-train 12000 --n-valid 200 --n-test 500
    python scripts/compact_prosqa.py data/sd data/sd-compact                 # the task
    python data.py --dataset prosqa --out data/sd-source --seed 7 --n-train 26000 --n-valid 100 \\
        --n-test 100 --names short --other-option same-depth --max-nodes 7 --min-steps 2 --max-steps 3
    python scripts/compact_prosqa.py data/sd-source data/sd-lookup --lookup

A fact "Every X is a Y." or "Tom is a Y." becomes "X Y ." (one token a name with --names short),
the question "Is Tom a A or B?" becomes "? Tom A B", a step " X Y ." and the answer "Tom A". A step
starts with a space because it starts a line: without it the name that opens the line would be
another token than the same name in the question (often two), and a thought that stands for a
node could not be the name's own token. With --lookup, each
record's answer restates all its facts in a random order instead: every fact's second name is a
lookup, the skill a ProsQA step needs, asked for as often as a question has facts. Its source
should be generated with another --seed; a question it shares with the task would show its facts
again, never its answer.
"""

import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import ArgumentParser, InputError, errors_in_one_line  # noqa: E402
from data import SPLITS, load_records, save_records  # noqa: E402

FACT = re.compile(r"(?:Every )?(\S+) is a ([^\s.]+)\.?")
QUERY = re.compile(r"Is (\S+) a (\S+) or ([^\s?]+)\?")


def compact_fact(sentence, where):
    match = FACT.fullmatch(sentence.strip())
    if not match:
        raise InputError(f"{where}: {sentence!r} is not a ProsQA fact")
    return f"{match[1]} {match[2]} ."


def compact(record, where, rng=None):
    """The record in the compact format (its graph fields kept); with rng, the lookup task's."""
    body, dot, query = record["question"].rpartition(". ")
    match = QUERY.fullmatch(query)
    if not dot or not match:
        raise InputError(f"{where}: the question does not end in 'Is X a Y or Z?'")
    facts = [compact_fact(f, where) for f in body.split(". ")]
    question = " ".join(facts) + f" ? {match[1]} {match[2]} {match[3]}"
    if rng is not None:
        return dict(record, question=question, steps=[], answer=" ".join(rng.sample(facts, len(facts))))
    steps = [" " + compact_fact(s, where) for s in record["steps"]]
    return dict(record, question=question, steps=steps, answer=compact_fact(record["answer"], where)[:-2])


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a ProsQA folder made by data.py (train.json, valid.json, test.json)")
    p.add_argument("out", help="a new folder for the compact splits")
    p.add_argument("--lookup", action="store_true", help="the lookup task: answers restate the facts")
    p.add_argument("--seed", type=int, default=0, help="the order of the restated facts")
    args = p.parse_args()
    rng = random.Random(args.seed) if args.lookup else None
    with errors_in_one_line():
        if os.path.exists(args.out):
            raise InputError(f"{args.out}: exists already; name a new folder")
        splits = {}
        for split in SPLITS:
            path = os.path.join(args.source, f"{split}.json")
            splits[split] = [compact(r, f"{path}: record {i}", rng) for i, r in enumerate(load_records(path))]
        for split, records in splits.items():
            save_records(records, os.path.join(args.out, f"{split}.json"))
    print(f"wrote {', '.join(f'{len(r)} {s}' for s, r in splits.items())} records to {args.out}")


if __name__ == "__main__":
    main()
