"""
What the continuous thoughts hold: the paper's analyses of latent reasoning on ProsQA (Hao et al.,
2024, Section 5, Figures 5-9), for a trained run, with tables, figures and the data behind them.

    python analyze.py out/cpu/coconut              # after python train.py --preset cpu
    python analyze.py RUN --file data/prosqa/test.json --out results/

The results go to RUN's folder, in analysis-<data folder>-<file name>/ (e.g. analysis-cpu-test).
ProsQA's sentences and its compact format (data.py --format compact: "X Y ." facts) are both read.

1. k-sweep (Figure 5). The same model gets k = 0, 1, ... thoughts, then writes the rest of the chain
   in language. Each output is classified by the path it writes (the answer line aside): Correct
   Path (a shortest path to the answer), Longer Path (a valid, longer one), Hallucination (a line
   that is not a fact about the graph's nodes, an edge the graph does not have, a broken chain, or
   a path no k hidden steps lead to), Wrong Target (a valid path to another node); or, when only
   an answer is written, Correct Label / Incorrect Label. The CoT and No-CoT runs beside RUN are
   scored as references.
2. Node values (Figures 7, 9). After thought k the model is made to start the next step in
   language, "Every": the value of a node is the probability of its name there (the product over
   its tokens); in the compact format a step starts with its subject's name, so nothing is forced. Frontier nodes are split into those that can still reach
   the target and those that cannot, by height.
   The frontier test: how often the top-valued node of all is a frontier node, against chance.
3. Parallelism (Figure 8): the summed value of the top-1, top-2, top-3 frontier nodes.
4. Do the thoughts carry the answer? The model is asked for the answer right after its thoughts
   ("###" follows <|end-latent|>) with (a) its own thoughts, (b) no thought slots at all, (c) each
   thought replaced by the same thought of another question, (d) each replaced by a random vector
   of the same norm. The ablation of arXiv 2604.04902 and 2604.06374, which found (b) as good as
   (a) for GPT-2 on the paper's ProsQA.
5. A worked example (Figures 6-7): one question's graph, its node values and its outputs at each k.

Where the paper is silent, we decided:
- k thoughts stand for k hidden steps (c = 1, as for ProsQA): a partial path is valid when its
  first node is exactly k edges from the root and it then follows edges of the graph;
- the frontier after thought k is the nodes whose shortest distance from the root is k (a BFS
  layer), and thought k is analysed on the questions whose answer is more than k steps away, so
  that a step in language is still to come;
- a node's height is computed both ways (shortest and longest distance to a leaf); tables show
  both, the figure uses the longest (the paper's captions; its text says the shortest).
"""

import json
import os
import re
import time
from collections import Counter
from contextlib import nullcontext

import torch

from checkpoint import runs_in
from coconut import stage_layout
from common import (ArgumentParser, InputError, bounded, check_output, errors_in_one_line, nonempty, pick_device,
                    write_atomic, write_jsonl)
from data import bfs, check_graph, children_of, decode, encode, grade
from evaluate import evaluate, load_run, model_flags, open_run, read_questions

CATEGORIES = ("Correct Path", "Longer Path", "Hallucination", "Wrong Target", "Correct Label",
              "Incorrect Label")
# a step: "Every X is a Y." or "Tom is a Y.", or "X Y ." in the compact format
STEP = re.compile(r"(?:Every )?(\w+) is a (\w+)\.|(\w+) (\w+) \.")


# -----------------------------------------------------------------------------
# Probes: what a model makes of a continuation, and its thoughts

@torch.no_grad()
def node_values(run, questions, k, batch_size=256):
    """For each (tokens, record) of a ProsQA question, {node: value} after k thoughts: the
    probability of the node's name right after the forced start of a step, "Every" (the product
    over its tokens; nodes with a parent: the others are never an "Every"). In the compact format
    a step starts with its subject's name: nothing is forced. Either way the name has its space."""
    rows, examples = [], []
    for q, (tokens, record) in enumerate(questions):
        prompt = run.example(tokens, prompt_only=True, n_thoughts=k)["input_ids"]
        sentences = " is a " in record["answer"]
        prompt = prompt + (run.vocab.to_model(encode("Every")) if sentences else [])
        for node in sorted({v for _, v in record["edges"]}):
            name = run.vocab.to_model(encode(" " + record["idx_to_symbol"][node]))
            rows.append((q, node))
            examples.append({"input_ids": prompt + name, "labels": [-100] * len(prompt) + name})
    values = [{} for _ in questions]
    for i in range(0, len(examples), batch_size):
        # the log-probability of the name: minus its summed cross-entropy, the thoughts before it
        logp = -run.model(**run.batch(examples[i:i + batch_size]), per_row=True)
        for (q, node), value in zip(rows[i:i + batch_size], logp.exp().tolist()):
            values[q][node] = value
    return values


ABLATIONS = ("(a) its thoughts", "(b) no thoughts", "(c) another question's", "(d) random, same norm")


@torch.no_grad()
def ablations(run, questions, batch_size, k):
    """{ablation: accuracy} of the answer asked for right after k thoughts: the model's own, none
    (no slots), those of the next question in the file (k-th for k-th), or random vectors of the
    same norm (a fixed generator, so that the table repeats)."""
    answer_start = run.vocab.to_model(encode("###"))
    prompts = [run.example(t, prompt_only=True, n_thoughts=k)["input_ids"] + answer_start for t in questions["tokens"]]
    no_slots = [run.example(t, prompt_only=True, n_thoughts=0)["input_ids"] + answer_start for t in questions["tokens"]]
    device = run.model.gpt.lm_head.weight.device
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]
    batch_of = lambda rows, p: run.batch([{"input_ids": p[i]} for i in rows], for_generation=True)  # noqa: E731
    own = torch.cat([torch.stack(thoughts_of(run.model, batch_of(rows, prompts))) for rows in batches])
    other = own.roll(-1, dims=0)  # question i gets the thoughts of question i + 1
    noise = torch.Generator(device=device).manual_seed(0)

    def random_like(t):
        r = torch.randn(t.shape, generator=noise, device=device)
        return r * t.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True)
    variants = {ABLATIONS[0]: (prompts, None), ABLATIONS[1]: (no_slots, None),
                ABLATIONS[2]: (prompts, lambda rows: lambda j, t: other[list(rows), j]),
                ABLATIONS[3]: (prompts, lambda rows: lambda j, t: random_like(t))}
    accuracy = {}
    for name, (inputs, swap) in variants.items():
        correct = 0
        for rows in batches:
            answers = run.model.generate(**batch_of(rows, inputs), max_new_tokens=32,
                                         intervene=swap(rows) if swap else None)
            correct += sum(grade(decode(run.vocab.to_gpt2(a)), questions["records"][i]["answer"])
                           for i, a in zip(rows, answers))
        accuracy[name] = correct / len(prompts)
    return accuracy


@torch.no_grad()
def thoughts_of(model, batch):
    """Per row of a collated batch, its continuous thoughts as a (n_thoughts, C) tensor: a thought
    is the last hidden state of the position before its <|latent|> slot."""
    hidden = model.think(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    slots = (batch["input_ids"] == model.special.latent) & model.feedback
    return [hidden[i, slots[i].nonzero().flatten() - 1] for i in range(len(hidden))]


# -----------------------------------------------------------------------------
# Graphs and the six outcome categories

def reached_in(children, root, k):
    """The nodes at the end of the paths of exactly k edges from the root (a node may be reached
    by paths of several lengths: this is not the BFS layer, which keeps only the shortest)."""
    nodes = {root}
    for _ in range(k):
        nodes = {v for u in nodes for v in children[u]}
    return nodes


def heights(children):
    """(shortest, longest) distance from each node to a leaf of the DAG."""
    short, long = {}, {}

    def visit(u):
        if u not in short:
            below = [visit(v) for v in children[u]]
            short[u] = 1 + min(s for s, _ in below) if below else 0
            long[u] = 1 + max(t for _, t in below) if below else 0
        return short[u], long[u]
    for u in range(len(children)):
        visit(u)
    return short, long


def classify(record, output, k):
    """The paper's category of a generated text, given k thoughts before it (hidden steps)."""
    lines = [line.strip() for line in output.split("\n") if line.strip()]
    steps = lines[:next((i for i, x in enumerate(lines) if x.startswith("#")), len(lines))]
    if not steps:  # only an answer: judged by the answer alone
        return "Correct Label" if grade(output, record["answer"]) else "Incorrect Label"
    index = {name: i for i, name in enumerate(record["idx_to_symbol"])}
    edges = {tuple(e) for e in record["edges"]}
    path = []
    for step in steps:
        m = STEP.fullmatch(step)
        u, v = (m.group(1) or m.group(3), m.group(2) or m.group(4)) if m else (None, None)
        if u not in index or v not in index:
            return "Hallucination"  # not a fact about the graph's nodes
        path.append((index[u], index[v]))
    children = children_of(record)
    if any(e not in edges for e in path) or any(a[1] != b[0] for a, b in zip(path, path[1:])):
        return "Hallucination"  # an edge the graph does not have, or a broken chain
    if path[0][0] not in reached_in(children, record["root"], k):
        return "Hallucination"  # no k hidden steps lead to where the written path starts
    if path[-1][1] != record["target"]:
        return "Wrong Target"
    shortest = bfs(children, record["root"])[0][record["target"]]
    return "Correct Path" if k + len(path) == shortest else "Longer Path"


# -----------------------------------------------------------------------------
# Node values

def frontier_rows(records, values, k):
    """One row per frontier node after thought k: its value, whether it can still reach the
    target, its heights; and per question the frontier's values, largest first."""
    rows, per_question = [], {}
    for q, vals in values.items():
        r = records[q]
        children = children_of(r)
        dist = bfs(children, r["root"])[0]
        short, long = heights(children)
        front = [n for n, d in dist.items() if d == k]
        for n in front:
            rows.append(dict(index=q, thought=k, node=r["idx_to_symbol"][n], value=vals[n],
                             correct=r["target"] in bfs(children, n)[0], height_short=short[n],
                             height_long=long[n]))
        per_question[q] = sorted((vals[n] for n in front), reverse=True)
    return rows, per_question


# -----------------------------------------------------------------------------
# The four analyses

def ksweep(run, questions, ks, references, args):
    """{row label: Counter of categories, plus "accuracy"}: the model at each k, then each
    reference run; and one row per question and k for ksweep.jsonl."""
    table, rows, records = {}, [], questions["records"]
    runs = [(f"k={k}", run, k) for k in ks] + [(name, ref, None) for name, ref in references]
    for label, model_run, k in runs:
        metrics, outputs = evaluate(model_run, questions, nullcontext(), args.batch_size, args.max_new_tokens,
                                    n_thoughts=k)
        table[label] = Counter(accuracy=metrics["acc"])
        for i in sorted(outputs):
            category = classify(records[i], outputs[i]["output"], 0 if k is None else k // run.curriculum.c)
            table[label][category] += 1
            rows.append(dict(index=i, k=k, run=label, output=outputs[i]["output"], category=category,
                             correct=outputs[i]["correct"]))
    return table, rows


def value_tables(run, questions, args):
    """Node values after thoughts 1 and 2: one row per frontier node, per question the frontier's
    values, largest first ({thought: {question: [values]}}), and the frontier test
    ({thought: frontier_hits(...)})."""
    rows, tops, hits, records, tokens = [], {}, {}, questions["records"], questions["tokens"]
    for k in (1, 2):
        analysed = [q for q, r in enumerate(records) if bfs(children_of(r), r["root"])[0][r["target"]] > k]
        # thought k stands for k hidden steps: k * c thoughts (c = 1 for ProsQA)
        values = node_values(run, [(tokens[q], records[q]) for q in analysed], k * run.curriculum.c, args.batch_size)
        k_rows, tops[k] = frontier_rows(records, dict(zip(analysed, values)), k)
        hits[k] = frontier_hits(records, dict(zip(analysed, values)), k)
        rows += k_rows
    return rows, tops, hits


def frontier_hits(records, values, k):
    """On the questions analysed after thought k (values: {question: {node: value}}) whose frontier
    has two nodes or more: (questions, how often the top-valued node of all is in the frontier,
    how often by chance: the sum of frontier size / nodes valued)."""
    n, hits, chance = 0, 0, 0.0
    for q, vals in values.items():
        r = records[q]
        front = {v for v, d in bfs(children_of(r), r["root"])[0].items() if d == k}
        if len(front) >= 2:
            n += 1
            hits += max(vals, key=vals.get) in front
            chance += len(front & set(vals)) / len(vals)
    return n, hits, chance


def print_values(rows, tops, hits):
    print("\n## Values of frontier nodes (paper Figures 7 and 9)\n")
    for k, (n, hit, chance) in hits.items():
        print(f"After thought {k}, the top-valued node is a frontier node (one of those {k} step{'s' * (k > 1)} from "
              f"the root) on {hit} of the {n} questions whose frontier has 2 nodes or more (chance: {chance:.0f}).")
    print()
    print("Mean value of the nodes k steps from the root after thought k, by whether they can still reach "
          "the target, and by height (shortest / longest distance to a leaf).\n")
    print("| thought | height | kind | reach the target: n, mean value | cannot: n, mean value |")
    print("|---|---|---|---|---|")
    for k in (1, 2):
        for kind in ("height_short", "height_long"):
            for h in sorted({r[kind] for r in rows if r["thought"] == k}):
                cells = []
                for correct in (True, False):
                    v = [r["value"] for r in rows
                         if r["thought"] == k and r[kind] == h and r["correct"] == correct]
                    cells.append(f"{len(v)}, {sum(v) / len(v):.3f}" if v else "0, -")
                print(f"| {k} | {h} | {kind.split('_')[1]}est | {cells[0]} | {cells[1]} |")
    print("\n## Parallelism (paper Figure 8)\n")
    print("Summed value of the top-1, top-2, top-3 frontier nodes, mean over questions with at least "
          "2 frontier nodes (all questions in brackets).\n")
    print("| thought | questions | top-1 | top-2 | top-3 |\n|---|---|---|---|---|")
    for k, per_question in tops.items():
        wide = [v for v in per_question.values() if len(v) >= 2]
        cells = [f"{mean_top(wide, n):.3f} ({mean_top(per_question.values(), n):.3f})" for n in (1, 2, 3)]
        print(f"| {k} | {len(wide)} ({len(per_question)}) | " + " | ".join(cells) + " |")


def mean_top(per_question, n):
    per_question = list(per_question)
    return sum(sum(v[:n]) for v in per_question) / max(1, len(per_question))


def worked_example(q, records, sweep_rows, value_rows):
    r = records[q]
    names = r["idx_to_symbol"]
    print(f"\n## A worked example: question {q} (paper Figures 6 and 7)\n")
    print(r["question"] + "\n")
    children = children_of(r)
    print("Graph: " + "; ".join(f"{names[u]} -> {', '.join(names[v] for v in children[u])}"
                                for u in range(len(names)) if children[u]))
    print(f"Root {names[r['root']]}, target {names[r['target']]}, other option {names[r['neg_target']]}; "
          f"gold steps: {' '.join(r['steps'])}\n")
    for k in (1, 2):
        shown = [x for x in value_rows if x["index"] == q and x["thought"] == k]
        if shown:
            print(f"after thought {k}: " + ", ".join(
                f"{x['node']} {x['value']:.2f}{'' if x['correct'] else ' (dead end)'}"
                for x in sorted(shown, key=lambda x: -x["value"])))
    for x in sweep_rows:
        if x["index"] == q:
            print(f"{x['run']:>8}: {x['category']:15s} {x['output']!r}")


# -----------------------------------------------------------------------------
# Figures

def figures(table, value_rows, tops, out):
    import matplotlib
    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt
    colors = ["#2a9d8f", "#8ab17d", "#e76f51", "#f4a261", "#457b9d", "#a8dadc"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, bottom = list(table), [0] * len(table)
    for category, color in zip(CATEGORIES, colors):
        heights_ = [table[label][category] for label in labels]
        ax.bar(labels, heights_, bottom=bottom, label=category, color=color)
        bottom = [b + h for b, h in zip(bottom, heights_)]
    ax.set_ylabel("questions")
    ax.set_title("Outcomes with k thoughts (paper Figure 5)")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ksweep.png"), dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, k in zip(axes, (1, 2)):
        rows = [r for r in value_rows if r["thought"] == k]
        hs = sorted({r["height_long"] for r in rows})
        for shift, correct, color in ((-0.2, True, "#2a9d8f"), (0.2, False, "#e76f51")):
            means = [mean([r["value"] for r in rows if r["height_long"] == h and r["correct"] == correct])
                     for h in hs]
            ax.bar([h + shift for h in hs], means, width=0.4, color=color,
                   label="can reach the target" if correct else "cannot")
        ax.set_title(f"after thought {k}")
        ax.set_xlabel("height (longest distance to a leaf)")
        ax.set_xticks(hs)
    axes[0].set_ylabel("mean value of frontier nodes")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "values.png"), dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, k in zip(axes, (1, 2)):
        per_question = [v for v in tops[k].values() if len(v) >= 2]  # where several candidates exist
        for n in (1, 2, 3):
            cumulative = sorted(sum(v[:n]) for v in per_question)
            ax.plot([100 * i / max(1, len(cumulative) - 1) for i in range(len(cumulative))], cumulative,
                    label=f"top-{n}")
        ax.set_title(f"thought {k} ({len(per_question)} questions with 2+ frontier nodes)")
        ax.set_xlabel("percentile of questions")
    axes[0].set_ylabel("summed value of the top frontier nodes")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "parallelism.png"), dpi=120)
    plt.close("all")


def mean(values):
    return sum(values) / len(values) if values else 0.0


# -----------------------------------------------------------------------------
# The command

def references_of(run_path, given, device):
    """The runs to compare with: the given folders, else the CoT, No-CoT and recurrent ones beside it;
    [(label, run)], labelled by method (or by folder, should two share one)."""
    paths = given.split(",") if given else [
        r for r in runs_in(os.path.dirname(os.path.dirname(os.path.abspath(run_path))))
        if os.path.basename(r) in ("cot", "no-cot", "recurrent")]
    for i, p in enumerate(paths):
        if not p:
            raise InputError(f"--references {given}: an empty name")
        if os.path.abspath(p) in map(os.path.abspath, paths[:i]):
            raise InputError(f"--references {given}: {p} twice")
    references = [load_run(p, device, dataset="prosqa") for p in paths]
    methods = [r.curriculum.method for r in references]
    return [(m if methods.count(m) == 1 else p, r) for m, p, r in zip(methods, paths, references)]


def main(argv=None):
    p = ArgumentParser(description="The paper's analyses of what continuous thoughts hold, on ProsQA.")
    model_flags(p, dataset=False)  # the graphs are ProsQA's
    p.add_argument("--out", type=nonempty,
                   help="where figures and jsonl files go (default: RUN/analysis-<folder>-<file>)")
    p.add_argument("--references", type=nonempty,
                   help="CoT / No-CoT runs to compare, comma-separated (default: the cot, no-cot "
                   "and recurrent runs beside RUN)")
    p.add_argument("--example", type=bounded(int, 0), help="the question of the worked example")
    p.add_argument("--batch-size", type=bounded(int, 1), default=100)
    args = p.parse_args(argv)
    with errors_in_one_line():
        run = open_run(args.run, args, dataset="prosqa")
        if not (run.curriculum.markers and run.curriculum.feedback):
            raise InputError(f"{run.path}: a {run.curriculum.method} model has no continuous thoughts "
                             f"to analyse: pass a Coconut run (its CoT and No-CoT runs are the references)")
        ks = args.n_thoughts or list(range(run.curriculum.max_latent_stage * run.curriculum.c + 1))
        questions = read_questions(run, args.file, ks, check=check_graph)
        path, records = questions["path"], questions["records"]
        references = references_of(run.path, args.references, pick_device(args.device))
        for _, ref in references:
            read_questions(ref, path)  # the same questions must fit each reference model
        if args.example is not None and args.example >= len(records):
            raise InputError(f"--example {args.example}: {path} has questions 0 to {len(records) - 1}")
        # each analysed file gets a folder of its own: analysing another never overwrites this one
        folder, file = os.path.split(os.path.abspath(path))
        name = f"analysis-{os.path.basename(folder)}-{os.path.splitext(file)[0]}"
        run_folder = run.path if os.path.isdir(run.path) else os.path.dirname(os.path.abspath(run.path))
        out = args.out or os.path.join(run_folder, name)
        check_output(out, "--out", new=False, folder=True)
    args.max_new_tokens = args.max_new_tokens or run.args.max_new_tokens
    t0 = time.time()
    table, sweep_rows = ksweep(run, questions, ks, references, args)
    value_rows, tops, hits = value_tables(run, questions, args)
    k_trained = stage_layout(run.curriculum, run.stage, 0)[1]  # the thoughts of its prompts
    ablated = ablations(run, questions, args.batch_size, k_trained)
    print(f"{run.path}: {run.curriculum.method}, stage {run.stage}; {path}: {len(records)} questions; "
          f"analysed in {time.time() - t0:.0f} s")
    print_ksweep(table, len(records))
    print_values(value_rows, tops, hits)
    print(f"\n## Do the thoughts carry the answer? The answer asked for at once after {k_trained} thoughts\n")
    print("| " + " | ".join(ablated) + " |\n|" + "---|" * len(ablated))
    print("| " + " | ".join(f"{100 * a:.1f}%" for a in ablated.values()) + " |")
    example = args.example if args.example is not None else max(
        tops[1], key=lambda q: (len(tops[1][q]), q in tops[2], -q), default=0)
    worked_example(example, records, sweep_rows, value_rows)
    with errors_in_one_line():
        write_outputs(out, table, sweep_rows, value_rows, tops, hits, ablated)


def write_outputs(out, table, sweep_rows, value_rows, tops, hits, ablated):
    """The analysis' files: the k-sweep's and the node values' rows, the summary, the figures."""
    write_jsonl(sweep_rows, os.path.join(out, "ksweep.jsonl"))
    by_question = {}
    for r in value_rows:
        by_question.setdefault((r["index"], r["thought"]), []).append(
            {k: r[k] for k in ("node", "value", "correct", "height_short", "height_long")})
    write_jsonl([dict(index=q, thought=k, frontier=nodes) for (q, k), nodes in sorted(by_question.items())],
                os.path.join(out, "values.jsonl"))
    summary = dict(accuracy={label: row["accuracy"] for label, row in table.items()}, ablations=ablated,
                   frontier={k: dict(zip(("questions", "hits", "chance"), h)) for k, h in hits.items()})
    write_atomic(os.path.join(out, "summary.json"), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    figures(table, value_rows, tops, out)
    print(f"\nwrote ksweep.png, values.png, parallelism.png, ksweep.jsonl, values.jsonl and summary.json to {out}")


def print_ksweep(table, n):
    print(f"\n## k-sweep: outcomes of {n} questions (paper Figure 5)\n")
    print("| | " + " | ".join(CATEGORIES) + " | accuracy |\n|" + "---|" * (len(CATEGORIES) + 2))
    for label, outcomes in table.items():
        cells = " | ".join(str(outcomes[c]) for c in CATEGORIES)
        print(f"| {label} | {cells} | {100 * outcomes['accuracy']:.1f}% |")


if __name__ == "__main__":
    main()
