"""
Speed of the training loop and of generation, measured side by side in one run (ratios, since a
shared machine is noisy), and the time the paper's ProsQA schedule would take here.

1. Training. At each stage, train.py's own loop (train_epoch: varying-length batches, the device's
   micro-batch and bf16 autocast on a GPU) in tokens/s; at the last stage also one fixed batch:
   Coconut's step (its thoughts fed back: 7 passes at stage 6 and beyond) against a plain step
   over the same tokens (one pass, thoughts not fed back), whose ratio is what thoughts cost.
2. Generation of 64 ProsQA answers with 6 thoughts: our batched, KV-cached generate against the
   official algorithm (one question at a time, every new token recomputing the whole sequence,
   tests/reference.py), timed on --baseline-prompts prompts and scaled; both give the same tokens.
3. The paper's ProsQA schedule (17,886 questions, 5 epochs at each of stages 0-6, then stage 7
   until epoch 50): the loop's time from the tokens/s of each stage, and saving a checkpoint
   (model, optimizer) once per epoch. Validation and test are not included.

Run: python bench.py                 (on a GPU: GPT-2 124M's size, random weights, batch 128;
                                      on a CPU: the CPU preset's model and batch)
     python bench.py --size gpt2 --batch-size 128 --only train
"""

import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import torch

import data
from checkpoint import save_checkpoint
from coconut import Coconut, Curriculum, build_example
from common import ArgumentParser, bounded, counts, errors_in_one_line, flag, given_flags, setup_device
from config import PAPER_RECIPE, default_micro_batch
from model import GPT, GPTConfig
from tests.reference import official_generate
from evaluate import Run
from train import Progress, train_epoch

SIZES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2 124M, OpenAI's vocabulary
         "tiny": dict(n_layer=2, n_head=4, n_embd=128)}  # the CPU preset's model, the data's vocabulary
STAGES = Curriculum().stages  # the paper's ProsQA curriculum: stages 0 to 7
SCHEDULE = Curriculum().schedule("all", PAPER_RECIPE["prosqa"]["epochs"])  # the stage of each epoch
N_QUESTIONS = data.PAPER_SIZES["prosqa"]["train"]


def timed(fn):
    """Seconds fn takes (waiting for the GPU, which runs asynchronously, to finish)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_loop(run, tokens, stage, args, ctx):
    """tokens/s of train.py's loop at a stage, over args.steps batches of varying length (after
    one step of warm-up)."""
    examples = [build_example(t, run.curriculum, stage, special=run.vocab.special) for t in tokens]
    optimizer = run.model.gpt.configure_optimizers(0.01, 1e-4, device_type=args.device.split(":")[0])
    loop_args = SimpleNamespace(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                                learning_rate=1e-4, warmup_iters=0, grad_clip=0.0)
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):  # no progress lines
        train_epoch(run, run.model, optimizer, examples[:args.batch_size], Progress(), loop_args, ctx, "")
        part = examples[args.batch_size:args.batch_size * (args.steps + 1)]
        _, n_tokens, seconds, _ = train_epoch(run, run.model, optimizer, part, Progress(), loop_args, ctx, "")
    return n_tokens / seconds


def bench_step(run, tokens, ctx, args):
    """Seconds of one optimizer-free training step on one fixed micro-batch at the last stage:
    Coconut's, and a plain one over the same tokens (the thoughts not fed back: one pass)."""
    batch = run.batch([run.example(t) for t in tokens[:args.micro_batch_size]])
    plain = Coconut(run.model.gpt, run.vocab.special, feedback=False)

    def step(model):
        run.model.gpt.zero_grad(set_to_none=True)
        with ctx:
            loss = model(**batch)
        loss.backward()

    step(run.model), step(plain)  # warm-up
    t_plain, t_coconut = [], []
    for _ in range(args.repeats):  # interleaved, so that both see the same machine load
        t_plain.append(timed(lambda: step(plain)))
        t_coconut.append(timed(lambda: step(run.model)))
    return statistics.median(t_coconut), statistics.median(t_plain), int(batch["attention_mask"].sum())


def bench_generation(run, tokens, args, ctx):
    prompts = [run.example(t, prompt_only=True)["input_ids"] for t in tokens[:64]]
    batch = run.batch([{"input_ids": p} for p in prompts], for_generation=True)
    run.model.eval()
    ours, baseline = [], []
    with ctx:
        run.model.generate(**batch, max_new_tokens=2)  # warm-up
        t_ours = timed(lambda: ours.extend(run.model.generate(**batch, max_new_tokens=args.max_new_tokens)))
    eos, latent = run.vocab.special.eos, run.vocab.special.latent
    t_base = timed(lambda: baseline.extend(official_generate(run.model.gpt, p, args.max_new_tokens, eos, latent)
                                           for p in prompts[:args.baseline_prompts]))
    t_base = t_base / args.baseline_prompts * len(prompts)
    same = sum(a == b for a, b in zip(ours, baseline))
    print(f"\ngeneration, {len(prompts)} ProsQA prompts with 6 thoughts, up to {args.max_new_tokens} new tokens:")
    print(f"  official one-by-one, no cache {t_base:8.2f} s  (timed on {args.baseline_prompts} prompts, scaled)")
    print(f"  batched with KV cache         {t_ours:8.2f} s   speed-up {t_base / t_ours:.1f}x")
    print(f"  same tokens on {same}/{len(baseline)} compared prompts")


def bench_checkpoint(run):
    """Seconds to save the model and an AdamW state, as train.py does after every epoch."""
    device_type = run.model.gpt.lm_head.weight.device.type
    optimizer = run.model.gpt.configure_optimizers(0.01, 1e-4, device_type=device_type)
    for p in run.model.gpt.parameters():  # AdamW's moments exist after a first step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ckpt.pt")
        seconds = timed(lambda: save_checkpoint(dict(model=run.model.gpt.state_dict(),
                                                     optimizer=optimizer.state_dict()), path))
        return seconds, os.path.getsize(path)


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    count = bounded(int, 1)
    p.add_argument("--size", choices=SIZES, help="model size, random weights (default: gpt2 on a GPU, else tiny)")
    p.add_argument("--batch-size", type=count, help="rows per optimizer step (default: 128 on a GPU, else 16)")
    p.add_argument("--micro-batch-size", type=count, help="default: as train.py's on this device")
    p.add_argument("--steps", type=count, default=4, help="optimizer steps timed per stage")
    p.add_argument("--stages", type=counts, default=STAGES, help="the stages whose loop is timed, 0 to 7")
    p.add_argument("--only", choices=["train", "generate"], help="run one of the benchmarks")
    p.add_argument("--repeats", type=count, default=3, help="timed fixed steps per variant")
    p.add_argument("--baseline-prompts", type=bounded(int, 1, 64), default=8,
                   help="prompts (of 64) the slow baseline runs on")
    p.add_argument("--max-new-tokens", type=count, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=count, help="CPU threads (default: torch's choice)")
    args = p.parse_args()
    given = given_flags(sys.argv[1:])
    only_for = dict(train={"batch_size", "micro_batch_size", "steps", "stages", "repeats"},
                    generate={"baseline_prompts", "max_new_tokens"})
    unused = only_for["generate"] if args.only == "train" else only_for["train"] if args.only == "generate" else set()
    for name in sorted(given & unused):
        p.error(f"{flag(name)} changes nothing with --only {args.only}")
    if max(args.stages) > STAGES[-1]:
        p.error(f"--stages {','.join(map(str, args.stages))}: ProsQA's stages are 0 to 7")
    with errors_in_one_line():
        args.device, ctx = setup_device(args.device, "auto", args.threads)
    gpu = args.device.startswith("cuda")
    args.size = args.size or ("gpt2" if gpu else "tiny")
    args.batch_size = args.batch_size or (128 if gpu else 16)
    args.micro_batch_size = args.micro_batch_size or default_micro_batch(args.batch_size, gpu)
    if args.batch_size % args.micro_batch_size:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {args.micro_batch_size}")

    torch.manual_seed(0)
    # ProsQA at the paper's settings; random weights never say eos, so every prompt decodes all its tokens
    n = args.batch_size * (args.steps + 1)
    tokens = [data.tokenize_record(r) for r in data.generate_prosqa(max(n, 2000), seed=0)]
    vocab = data.Vocab.of(tokens) if args.size == "tiny" else data.Vocab()
    tokens = [vocab.map_tokens(t) for t in tokens]
    gpt = GPT(GPTConfig(vocab_size=vocab.size, dropout=0.1, **SIZES[args.size])).to(args.device)
    run = Run(Coconut(gpt, vocab.special), vocab, Curriculum(), stage=7)
    print(f"device {args.device}, {torch.get_num_threads()} CPU threads, model {args.size} "
          f"({gpt.get_num_params() / 1e6:.1f}M parameters), batch {args.batch_size} in micro-batches of "
          f"{args.micro_batch_size}, {'bf16 autocast' if gpu else 'float32'}")
    if args.only in (None, "train"):
        print(f"\ntraining loop (train_epoch), {args.steps} steps of varying length per stage:")
        speed = {}
        for s in args.stages:
            speed[s] = bench_loop(run, tokens, s, args, ctx)
            print(f"  stage {s}: {speed[s]:9.0f} tokens/s")
        t_coconut, t_plain, n_tokens = bench_step(run, tokens, ctx, args)
        print(f"\none fixed micro-batch of {args.micro_batch_size} at stage 7 ({n_tokens} tokens, 6 thoughts), "
              f"forward and backward:")
        print(f"  plain step (one pass)       {t_plain * 1000:8.1f} ms  {n_tokens / t_plain:9.0f} tokens/s")
        print(f"  Coconut step (7 passes)     {t_coconut * 1000:8.1f} ms  {n_tokens / t_coconut:9.0f} tokens/s"
              f"   ratio {t_coconut / t_plain:.2f}x")
        if 7 in speed:
            print(f"  train.py's loop at stage 7  {speed[7] / (n_tokens / t_plain):8.2f}x the plain step's tokens/s")
        if set(args.stages) == set(STAGES):
            epoch_tokens = {s: sum(len(build_example(t, run.curriculum, s, special=vocab.special)["input_ids"])
                                   for t in tokens)
                            / len(tokens) * N_QUESTIONS for s in STAGES}
            loop = sum(epoch_tokens[s] / speed[s] for s in SCHEDULE)
            save, size = bench_checkpoint(run)
            epochs = len(SCHEDULE)
            print(f"\nthe paper's ProsQA schedule ({epochs} epochs of {N_QUESTIONS} questions) at these speeds: "
                  f"{loop / 3600:.2f} hours of training loop, plus {epochs * save / 60:.1f} minutes saving a "
                  f"{size / 1e9:.2f} GB checkpoint after each epoch ({save:.1f} s each); validation not included")
    if args.only in (None, "generate"):
        bench_generation(run, tokens, args, ctx)


if __name__ == "__main__":
    main()
