"""
How fast does a small GPT learn to look a fact up? The skill every ProsQA step needs, alone.

A toy in model.py's GPT, trained from scratch: a sequence of facts `u v .` (distinct names from
--names, shuffled), then queries `? u`, each to be answered with u's `v`. Content-addressed
recall: the answer sits wherever `u` was written, which the model must find by matching it, and
then read the token after it (two attention layers composing). Prints the queries' accuracy on
held-out sequences as training goes. NOTES.md says what it found on 2 CPU cores.

    python scripts/recall_probe.py --steps 3000                  # the CPU preset's model
    python scripts/recall_probe.py --facts 6 --queries 4 --device cuda --steps 50000
"""

import os
import random
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import ArgumentParser, bounded, errors_in_one_line, pick_device  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def sequence(rng, names, facts, queries):
    """Facts u v . of a chain of distinct names, shuffled, then ? u v for some of them; the
    tokens are names 0..names-1, '.' = names, '?' = names + 1."""
    chain = rng.sample(range(names), facts + 1)
    pairs = list(zip(chain, chain[1:]))
    rng.shuffle(pairs)
    tokens = [t for u, v in pairs for t in (u, v, names)]
    for u, v in rng.sample(pairs, queries):
        tokens += [names + 1, u, v]
    return tokens


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", type=bounded(int, 2), default=40, help="distinct names (more than --facts)")
    p.add_argument("--facts", type=bounded(int, 1), default=12)
    p.add_argument("--queries", type=bounded(int, 1), default=1, help="facts asked for (at most --facts)")
    p.add_argument("--n-layer", type=bounded(int, 1), default=2)
    p.add_argument("--n-head", type=bounded(int, 1), default=4)
    p.add_argument("--n-embd", type=bounded(int, 1), default=128, help="a multiple of --n-head")
    p.add_argument("--learning-rate", type=bounded(float, 0), default=2e-3)
    p.add_argument("--batch-size", type=bounded(int, 1), default=16)
    p.add_argument("--steps", type=bounded(int, 1), default=3000)
    p.add_argument("--every", type=bounded(int, 1), default=500, help="steps between two accuracy readings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=bounded(int, 1), default=1)
    args = p.parse_args()
    if args.names <= args.facts:
        p.error(f"--names {args.names}: a chain of {args.facts} facts needs at least {args.facts + 1} names")
    if args.queries > args.facts:
        p.error(f"--queries {args.queries}: at most --facts ({args.facts})")
    if args.every > args.steps:
        p.error(f"--every {args.every}: more than --steps {args.steps}, so nothing would be measured")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd}: not a multiple of --n-head {args.n_head}")
    with errors_in_one_line():
        args.device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    n = 3 * args.facts + 3 * args.queries
    gpt = GPT(GPTConfig(block_size=n, vocab_size=args.names + 2, n_layer=args.n_layer, n_head=args.n_head,
                        n_embd=args.n_embd, dropout=0.0)).to(args.device)
    optimizer = gpt.configure_optimizers(0.01, args.learning_rate, device_type=args.device.split(":")[0])
    asked = torch.arange(3 * args.facts + 1, n, 3, device=args.device)  # where each queried u stands
    held_out = torch.tensor([sequence(random.Random(10 ** 6 + i), args.names, args.facts, args.queries)
                             for i in range(512)], device=args.device)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:  # warm-up, then constant, as train.py
            group["lr"] = args.learning_rate * min(1.0, step / 51)
        x = torch.tensor([sequence(rng, args.names, args.facts, args.queries) for _ in range(args.batch_size)],
                         device=args.device)
        logits = gpt(x[:, :-1])[0][:, asked]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, asked + 1].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0:
            with torch.no_grad():
                guess = gpt(held_out[:, :-1])[0][:, asked].argmax(-1)
            accuracy = (guess == held_out[:, asked + 1]).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {100 * accuracy:.1f}% "
                  f"(chance {100 / args.facts:.1f}%), {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
