"""
Speed of coconut.py, measured side by side in one run (ratios, since a shared machine is noisy).

1. Training step: Coconut with 6 continuous thoughts (7 passes, sharing one KV cache) against
   the same model's plain forward + backward over the same tokens (one pass, thoughts not fed back).
2. Generation on 64 ProsQA prompts with 6 thoughts: our batched, KV-cached generate against the
   official algorithm (one question at a time, every new token recomputing the whole sequence).
   The baseline is slow, so it runs on the first --baseline-prompts prompts and its time is scaled
   to 64; both must give the same tokens there.

Run: python bench.py            (GPT-2 small size, random weights, on whatever device is present)
     python bench.py --size tiny (a quick look)
"""

import argparse
import statistics
import time

import torch

import data
from coconut import Coconut, Curriculum, build_example, collate
from model import GPT, GPTConfig
from tests.reference import official_generate

SIZES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "tiny": dict(n_layer=2, n_head=4, n_embd=128)}


def timed(fn):
    """Seconds fn takes (waiting for the GPU, which runs asynchronously, to finish)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_training(gpt, tokens, batch_size, repeats):
    batch = collate([build_example(t, Curriculum(), stage=6) for t in tokens[:batch_size]],
                    device=gpt.lm_head.weight.device)
    n_thoughts = int((batch["input_ids"][0] == data.LATENT).sum())
    coconut, plain = Coconut(gpt), Coconut(gpt, feedback=False)

    def step(model):
        gpt.zero_grad(set_to_none=True)
        model(**batch).backward()

    step(coconut), step(plain)  # warm-up
    t_plain, t_coconut = [], []
    for _ in range(repeats):  # interleaved, so that both see the same machine load
        t_plain.append(timed(lambda: step(plain)))
        t_coconut.append(timed(lambda: step(coconut)))
    t_plain, t_coconut = statistics.median(t_plain), statistics.median(t_coconut)
    B, T = batch["input_ids"].shape
    print(f"training step, batch {B} x {T} tokens, {n_thoughts} thoughts per row:")
    print(f"  plain forward+backward   {t_plain * 1000:8.0f} ms")
    print(f"  Coconut forward+backward {t_coconut * 1000:8.0f} ms   ratio {t_coconut / t_plain:.2f}x")


def bench_generation(gpt, tokens, n_prompts, baseline_prompts, max_new_tokens):
    prompts = [build_example(t, Curriculum(), stage=6, prompt_only=True)["input_ids"] for t in tokens[:n_prompts]]
    batch = collate([{"input_ids": p} for p in prompts], for_generation=True, device=gpt.lm_head.weight.device)
    model = Coconut(gpt)
    ours, baseline = [], []
    t_ours = timed(lambda: ours.extend(model.generate(**batch, max_new_tokens=max_new_tokens)))
    t_base = timed(lambda: baseline.extend(official_generate(gpt, p, max_new_tokens)
                                           for p in prompts[:baseline_prompts]))
    t_base = t_base / baseline_prompts * len(prompts)
    same = sum(a == b for a, b in zip(ours, baseline))
    print(f"generation, {len(prompts)} ProsQA prompts with 6 thoughts, up to {max_new_tokens} new tokens:")
    print(f"  official one-by-one, no cache {t_base:8.1f} s  (timed on {baseline_prompts} prompts, scaled)")
    print(f"  batched with KV cache         {t_ours:8.1f} s   speed-up {t_base / t_ours:.1f}x")
    print(f"  same tokens on {same}/{len(baseline)} compared prompts")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="gpt2", help="model size (random weights)")
    parser.add_argument("--only", choices=["train", "generate"], help="run one of the two benchmarks")
    parser.add_argument("--batch-size", type=int, default=4, help="rows in the training batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per variant")
    parser.add_argument("--baseline-prompts", type=int, default=8, help="prompts the slow baseline runs on")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice); on a busy "
                        "machine 1 thread is steadier, as Coconut's many small passes wait on stalled threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=data.N_VOCAB, **SIZES[args.size])).to(args.device)
    # ProsQA at the paper's size; random weights never say eos, so every prompt decodes all its tokens
    tokens = [data.tokenize_record(r) for r in data.generate_prosqa(64, seed=0)]
    print(f"device {args.device}, {torch.get_num_threads()} threads, model {args.size} "
          f"({gpt.get_num_params() / 1e6:.0f}M parameters)")
    if args.only in (None, "train"):
        gpt.train()
        bench_training(gpt, tokens, args.batch_size, args.repeats)
    if args.only in (None, "generate"):
        gpt.eval()
        bench_generation(gpt, tokens, 64, args.baseline_prompts, args.max_new_tokens)


if __name__ == "__main__":
    main()
