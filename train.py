"""
Train and evaluate Coconut and its baselines, in the style of nanoGPT's train.py.

Flow of the repository: data -> model -> coconut -> train -> sample.

    python train.py --dataset prosqa --stage all          # the paper's recipe: GPT-2 124M, 50 epochs
    torchrun --standalone --nproc_per_node=4 train.py --dataset prosqa --stage all
    python train.py --preset cpu                          # from scratch on a laptop: Coconut vs CoT vs No-CoT
    python train.py --eval out/prosqa/coconut --n-thoughts 0,1,2,3,4,5,6   # the paper's k-sweep

Each method gets a run folder <out-dir>/<method> holding ckpt.pt (the last epoch: model, optimizer,
RNG states, history), best.pt (the best validation accuracy at the latest stage) and log.jsonl
(one line of metrics per epoch, then the test result). `--resume` continues from ckpt.pt.
"""

import argparse
import json
import os
import pickle
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
from tqdm import tqdm

from coconut import METHODS, Coconut, Curriculum, build_example, collate
from data import (END_LATENT, EOS, LATENT, N_VOCAB, PAPER_SIZES, START_LATENT, decode, encode, grade,
                  load_records, make_splits, read_gsm8k, tokenize_record)
from model import GPT, HUB_MODELS, GPTConfig, WeightsUnavailable, fetch_from_hub

# The paper's per-dataset recipe (Section 4.1 and the official configs); flags override it.
DATASET_DEFAULTS = {
    "prosqa": dict(c=1, max_latent_stage=6, epochs_per_stage=5, epochs=50, max_new_tokens=128),
    "prontoqa": dict(c=1, max_latent_stage=6, epochs_per_stage=5, epochs=50, max_new_tokens=128),
    "gsm8k": dict(c=2, max_latent_stage=3, epochs_per_stage=3, epochs=25, max_new_tokens=64),
}
# Presets replace the defaults of many flags at once; any flag given explicitly still wins.
PRESETS = {
    # A tiny GPT from scratch on small generated ProsQA graphs (at most 7 nodes, answers 2-3 steps
    # away): the three methods of Table 1 in one command, trained side by side, one process and
    # one thread each, so that two cores serve three runs (README, "I only have a CPU"). Every
    # stage gets one epoch of 12,000 questions: many distinct questions teach these models more
    # than many passes over few, which they memorize (README).
    "cpu": dict(dataset="prosqa", name="cpu-small", data_dir="data/prosqa-small", method="coconut,cot,no-cot",
                jobs=3, threads=1, init="scratch", vocab="data", n_layer=2, n_head=4, n_embd=128, block_size=256,
                dropout=0.0, n_train=12000, n_valid=200, n_test=500, max_nodes=7, min_steps=2, max_steps=3,
                c=1, max_latent_stage=3, epochs_per_stage=1, epochs=5, batch_size=16, micro_batch_size=16,
                learning_rate=2e-3, warmup_iters=50, grad_clip=1.0, max_new_tokens=48, eval_batch_size=100),
}
GSM8K_HELP = """GSM8k is not generated: download the Internalize-CoT files (as the official code does) and convert them once:
  mkdir -p data/gsm8k
  wget -P data/gsm8k https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/e06a32ee5e4cd117171daeb4755d2a97ece62761/data/gsm8k/train.txt
  wget -P data/gsm8k https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/e06a32ee5e4cd117171daeb4755d2a97ece62761/data/gsm8k/valid.txt
  wget -P data/gsm8k https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/e06a32ee5e4cd117171daeb4755d2a97ece62761/data/gsm8k/test.txt
  for s in train valid test; do python data.py --dataset gsm8k --from data/gsm8k/$s.txt --out data/gsm8k; done"""
# flags that may change when a run is resumed; any other must match the interrupted run
RUNTIME_FLAGS = {"resume", "device", "dtype", "compile", "threads", "jobs", "max_epochs_this_run", "eval_batch_size", "eval"}


class TrainError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train Coconut (or a baseline) and evaluate it.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults, e.g. cpu")
    p.add_argument("--dataset", default="prosqa", choices=sorted(DATASET_DEFAULTS), help="which task")
    p.add_argument("--method", default="coconut", help=f"one of {', '.join(METHODS)}, or several separated "
                   "by commas: each is trained in turn and a table compares them")
    p.add_argument("--stage", default="all", help="'all' walks the curriculum and stays in the last stage "
                   "until --epochs are spent; a number trains that stage alone for --epochs-per-stage epochs")
    p.add_argument("--init", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (OpenAI's weights), "
                   "scratch, or a path: our checkpoint (.pt or run folder) or a Hugging Face folder")
    g = p.add_argument_group("model size (with --init scratch)")
    g.add_argument("--n-layer", type=int), g.add_argument("--n-head", type=int), g.add_argument("--n-embd", type=int)
    g.add_argument("--block-size", type=int, help="context length (default 1024)")
    p.add_argument("--vocab", default="full", choices=["full", "data"], help="data: only the tokens the data "
                   "files use (--init scratch; about 3x faster on a CPU)")
    p.add_argument("--dropout", type=float, default=0.1, help="0.1 is what the official code trains with "
                   "(Hugging Face GPT-2's default); the CPU preset uses 0")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="where {train,valid,test}.json live or are generated (default data/<dataset>)")
    g.add_argument("--train-file"), g.add_argument("--valid-file"), g.add_argument("--test-file")
    g.add_argument("--n-train", type=int), g.add_argument("--n-valid", type=int), g.add_argument("--n-test", type=int)
    g.add_argument("--max-nodes", type=int, help="ProsQA generator: graph size (paper 28)")
    g.add_argument("--min-steps", type=int), g.add_argument("--max-steps", type=int)
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    g = p.add_argument_group("curriculum (default: the paper's for the dataset)")
    g.add_argument("--c", type=int, help="thoughts per reasoning step")
    g.add_argument("--max-latent-stage", type=int, help="number of latent stages")
    g.add_argument("--epochs-per-stage", type=int)
    g.add_argument("--epochs", type=int, help="total epochs of --stage all")
    g.add_argument("--uniform-prob", type=float, default=0.0, help="chance of a random stage per example "
                   "(the paper's analysis model uses 0.3)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=128, help="effective batch: micro-batch x accumulation x processes")
    g.add_argument("--micro-batch-size", type=int, default=16)
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-iters", type=int, default=0, help="linear warm-up after every optimizer reset")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off, as the paper)")
    g.add_argument("--reset-optimizer", choices=["stage", "epoch"], default="stage",
                   help="when to start AdamW afresh: the paper says at each stage, the official code every epoch")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--max-new-tokens", type=int, help="greedy decoding budget (paper: 128, GSM8k 64)")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--eval", metavar="CKPT", help="evaluation only: a checkpoint (.pt) or run folder")
    g.add_argument("--eval-file", help="with --eval: an official-format JSON file (default: the run's test file)")
    g.add_argument("--n-thoughts", help="with --eval: thoughts per question, e.g. 0,1,2,3 (default: the run's)")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", help="runs go to <out-dir>/<method> (default out/<name or dataset>)")
    g.add_argument("--name", help="name of the run folder under out/")
    g.add_argument("--resume", action="store_true", help="continue the runs in --out-dir from their last checkpoint")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 autocast on GPUs that support it")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; the CPU preset "
                   "uses 1, which on a busy 2-core machine was 4x faster than 2 threads fighting for a core)")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    g.add_argument("--jobs", type=int, default=1, help="with several methods: how many train at once, each "
                   "in its own process (on a CPU with --threads 1: the number of cores)")
    g.add_argument("--max-epochs-this-run", type=int, help="stop after this many epochs, as if killed (tests resume)")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    for k, v in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out_dir = args.out_dir or os.path.join("out", args.name or args.dataset)
    args.methods = args.method.split(",")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    if args.stage != "all" and not args.stage.isdigit():
        p.error(f"--stage must be 'all' or a number, not {args.stage!r}")
    for flag in ("batch_size", "micro_batch_size", "epochs", "epochs_per_stage", "eval_batch_size", "jobs",
                 "max_new_tokens", "c", "max_latent_stage"):
        if getattr(args, flag) < (0 if flag in ("c", "max_latent_stage") else 1):
            p.error(f"--{flag.replace('_', '-')} must be at least {0 if flag in ('c', 'max_latent_stage') else 1}")
    return args


# -----------------------------------------------------------------------------
# Data

def load_data(args, master=True):
    """{split: (records, path)}: the given files, else data_dir's, generating ProsQA / ProntoQA once.

    A generated folder keeps its generator settings in generator.json: reusing it with other
    settings (sizes, graph knobs, seed) is refused, rather than silently training on other data."""
    paths = {s: getattr(args, f"{s}_file") or os.path.join(args.data_dir, f"{s}.json") for s in ("train", "valid", "test")}
    given = any(getattr(args, f"{s}_file") for s in paths)
    if args.dataset == "gsm8k" or given:
        missing = [p for p in paths.values() if not os.path.exists(p)]
        if missing:
            raise TrainError(f"{missing[0]}: no such file" + (f". {GSM8K_HELP}" if args.dataset == "gsm8k" else ""))
    elif master:  # one process generates; the others wait at the barrier below
        settings = dict(dataset=args.dataset, seed=args.data_seed,
                        sizes={**PAPER_SIZES[args.dataset], **{s: getattr(args, f"n_{s}") for s in paths
                                                               if getattr(args, f"n_{s}") is not None}},
                        **{k: getattr(args, k) for k in ("max_nodes", "min_steps", "max_steps")})
        settings_path = os.path.join(args.data_dir, "generator.json")
        missing = [p for p in paths.values() if not os.path.exists(p)]
        if len(missing) == len(paths):  # first use (ProsQA at the paper's size takes about 10 s)
            knobs = {k: v for k, v in settings.items() if k in ("max_nodes", "min_steps", "max_steps") and v is not None}
            print(f"generating {args.dataset} into {args.data_dir} (once; later runs reuse it)")
            make_splits(args.dataset, args.data_dir, seed=args.data_seed, sizes=settings["sizes"], progress=True, **knobs)
            write_atomic(json.dumps(settings, indent=1), settings_path)
        elif missing:
            raise TrainError(f"{missing[0]}: no such file (only a complete set of splits is generated, into an "
                             f"empty --data-dir)")
        elif os.path.exists(settings_path):
            with open(settings_path) as f:
                made = json.load(f)
            if made != settings:
                diff = ", ".join(f"{k} {made.get(k)} (now {v})" for k, v in settings.items() if made.get(k) != v)
                raise TrainError(f"{args.data_dir} was generated with other settings: {diff}; pass another "
                                 f"--data-dir, or delete that folder to generate it anew")
    barrier()
    data = {s: (read_records(args.dataset, p), p) for s, p in paths.items()}
    for records, path in data.values():
        if not records:
            raise TrainError(f"{path}: holds no records")
    return data


def read_records(dataset, path):
    """Official-format JSON records; GSM8k may also come in the Internalize-CoT text format."""
    return read_gsm8k(path) if dataset == "gsm8k" else load_records(path)


def check_tokens(tokens, path, curriculum, stages, block_size, vocab):
    """Every record must fit the context at every stage it will see, in tokens the model knows."""
    for i, t in enumerate(tokens):
        n = max(len(build_example(t, curriculum, s)["input_ids"]) for s in stages)
        if n > block_size:
            raise TrainError(f"{path}: record {i} is {n} tokens long, more than the model's context of "
                             f"{block_size} (use a model with a larger --block-size, or shorter examples)")
        unknown = [x for x in t["question"] + sum(t["steps"], []) + t["answer"] if vocab.table[x] < 0]
        if unknown:
            raise TrainError(f"{path}: record {i} has the token {decode(unknown[:1])!r}, which this model's "
                             f"vocabulary (--vocab data: the tokens of the files it was trained with) does not hold")


class Vocab:
    """The GPT-2 token ids a model knows: all of them, or, with --vocab data (models trained from
    scratch), only those its data files (train, valid, test) use. On a CPU the output layer over GPT-2's 50k tokens
    costs more than the whole of a small transformer; a vocabulary of a few hundred tokens makes
    training about three times faster. Batches are mapped to model ids on their way in, answers back."""

    def __init__(self, ids=None):
        self.ids = ids  # the GPT-2 id of each model id, or None: the identity over all N_VOCAB
        self.size = N_VOCAB if ids is None else len(ids)
        self.table = torch.arange(N_VOCAB) if ids is None else torch.full((N_VOCAB,), -1)
        if ids is not None:
            self.table[torch.tensor(ids)] = torch.arange(len(ids))

    @classmethod
    def of(cls, tokens):
        used = {x for t in tokens for x in t["question"] + sum(t["steps"], []) + t["answer"]}
        return cls(sorted(used | {EOS, START_LATENT, END_LATENT, LATENT}))

    def batch(self, batch, device):
        """A collated batch in model ids, on the device (labels keep their -100)."""
        out = {k: v.to(device) for k, v in batch.items()}
        out["input_ids"] = self.table[batch["input_ids"]].to(device)
        if "labels" in batch:
            out["labels"] = torch.where(batch["labels"] < 0, batch["labels"], self.table[batch["labels"].clamp(min=0)]).to(device)
        return out

    def to_gpt2(self, ids):
        return list(ids) if self.ids is None else [self.ids[i] for i in ids]


# -----------------------------------------------------------------------------
# Model and checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a kill never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_atomic(text, path):
    """The text file's twin of save_atomic."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_log(history, path):
    write_atomic("".join(json.dumps(h) + "\n" for h in history), path)


def read_checkpoint(path):
    if os.path.isdir(path):  # a run folder: its best model
        path = os.path.join(path, "best.pt")
    try:
        # weights_only: a checkpoint is data, and loading one must never run code it carries
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TrainError(f"{path}: holds Python objects besides tensors and plain values, which are not "
                         f"loaded (a checkpoint written by train.py holds none)") from None
    except Exception as e:
        raise TrainError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        raise TrainError(f"{path}: not a checkpoint written by train.py")
    return ckpt, path


def gpt_from_checkpoint(ckpt, path, dropout=0.0):
    """The GPT of a train.py checkpoint (its vocabulary is Vocab(ckpt["vocab"]))."""
    gpt = GPT(GPTConfig(**dict(ckpt["model_args"], dropout=dropout)))
    try:
        gpt.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise TrainError(f"{path}: weights do not match its model config ({str(e).splitlines()[1].strip()})") from None
    return gpt


def build_gpt(args, data_tokens):
    """The GPT to start from (OpenAI's weights, a Hugging Face folder, our checkpoint, or scratch),
    and its Vocab."""
    sizes = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
    if args.init == "scratch":
        vocab = Vocab.of(data_tokens) if args.vocab == "data" else Vocab()
        defaults = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # GPT-2 124M's shape
        config = GPTConfig(**{k: v if v is not None else defaults[k] for k, v in sizes.items()},
                           vocab_size=vocab.size, dropout=args.dropout)
        return GPT(config), vocab
    is_ours = args.init.endswith(".pt") or os.path.exists(os.path.join(args.init, "best.pt"))
    if args.vocab == "data" and not is_ours:
        raise TrainError(f"--vocab data is for --init scratch; --init {args.init} keeps its own vocabulary")
    if is_ours:
        ckpt, path = read_checkpoint(args.init)
        gpt, vocab = gpt_from_checkpoint(ckpt, path, dropout=args.dropout), Vocab(ckpt.get("vocab"))
    else:
        try:
            gpt = GPT.from_pretrained(args.init, override_args=dict(dropout=args.dropout))
        except (WeightsUnavailable, FileNotFoundError) as e:
            raise TrainError(str(e)) from None
        except Exception as e:  # tensors that are not GPT-2's, a corrupt file, a config.json without sizes
            raise TrainError(f"--init {args.init}: not a readable GPT-2 checkpoint ({type(e).__name__}: {e})") from None
    for k, v in sizes.items():  # a size flag that contradicts the weights is a mistake, not a wish
        if v is not None and v != getattr(gpt.config, k):
            raise TrainError(f"--init {args.init} has {k}={getattr(gpt.config, k)}, but --{k.replace('_', '-')} {v} "
                             f"was given (size flags apply to --init scratch only)")
    if is_ours:
        return gpt, vocab
    if gpt.config.vocab_size not in (50257, N_VOCAB):
        raise TrainError(f"--init {args.init} has a vocabulary of {gpt.config.vocab_size} tokens; Coconut needs "
                         f"GPT-2's 50257 (grown here to {N_VOCAB})")
    # the three Coconut tokens start as copies of "<<", as in the official code
    gpt.grow_vocab(N_VOCAB, init_from_id=encode("<<")[0])
    return gpt, Vocab()


def make_coconut(gpt, method, vocab):
    """Coconut around gpt, speaking in the model ids of vocab (model.vocab maps them)."""
    special = {k: int(vocab.table[t]) for k, t in
               dict(latent_id=LATENT, eos_id=EOS).items()}
    # "pause as thought": <|latent|> stays an ordinary learned token, nothing is fed back
    model = Coconut(gpt, feedback=method != "pause", **special)
    model.vocab = vocab
    return model


# -----------------------------------------------------------------------------
# Distributed, device

ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0


def barrier():
    if ddp:
        torch.distributed.barrier()


def setup_device(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    elif args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        device = args.device
        try:
            torch.device(device)
        except RuntimeError:
            raise TrainError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
        if (device.startswith("cuda") and not torch.cuda.is_available()) or (device == "mps" and not torch.backends.mps.is_available()):
            raise TrainError(f"--device {device}: not available on this machine")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported())
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
    return device, ctx


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, tokens, records, curriculum, stage, args, device, ctx, n_thoughts=None):
    """Greedy answers graded as the paper does: accuracy, mean generated tokens (thoughts included,
    as the paper counts them), forward passes (thought passes plus one per answer token) and
    seconds per question. Prompts are sorted by length so that batches carry little padding."""
    model.eval()
    prompts = [build_example(t, curriculum, stage, prompt_only=True, n_thoughts=n_thoughts) for t in tokens]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))[rank::world]
    sums = torch.zeros(4, dtype=torch.float64)  # correct, tokens, passes, questions
    t0 = time.time()
    for i in range(0, len(order), args.eval_batch_size):
        idx = order[i:i + args.eval_batch_size]
        batch = model.vocab.batch(collate([prompts[j] for j in idx], for_generation=True), device)
        with ctx:
            answers = model.generate(**batch, max_new_tokens=args.max_new_tokens)
        for j, ids in zip(idx, map(model.vocab.to_gpt2, answers)):
            n_latent = prompts[j]["input_ids"].count(LATENT)
            thought_passes = n_latent + 1 if model.feedback else 1
            sums += torch.tensor([grade(decode(ids), records[j]["answer"]), len(ids) + n_latent,
                                  thought_passes + len(ids), 1], dtype=torch.float64)
    if ddp:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    correct, n_tokens, n_passes, n = sums.tolist()
    return dict(acc=correct / n, tokens=n_tokens / n, passes=n_passes / n, s_per_q=(time.time() - t0) * world / n)


@torch.no_grad()
def validation_loss(model, examples, args, device, ctx):
    model.eval()
    total, count = 0.0, 0
    for i in range(rank * args.micro_batch_size, len(examples), args.micro_batch_size * world):
        chunk = examples[i:i + args.micro_batch_size]
        batch = model.vocab.batch(collate(chunk), device)
        with ctx:
            loss, _ = model(**batch, return_logits=False)
        total, count = total + loss.item() * len(chunk), count + len(chunk)
    if ddp:
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, count = sums.tolist()
    return total / max(count, 1)


# -----------------------------------------------------------------------------
# Training one method

def rng_state():
    """The generators a run draws from (dropout, data order, --uniform-prob), in types that
    torch.load(weights_only=True) reads back: tuples of ints and byte tensors."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def train_epoch(model, train_model, optimizer, examples, order, state, args, device, ctx, desc):
    """One epoch of optimizer steps over this rank's share of the examples, in the given order:
    warm-up, micro-batches with gradient accumulation, clipping. Returns the mean loss, the tokens
    seen (all ranks), the seconds taken and the last learning rate."""
    per_rank = args.batch_size // world
    n_steps = (len(order) + per_rank - 1) // per_rank
    model.train()
    t0, n_tokens, losses = time.time(), 0, []
    bar = tqdm(range(n_steps), desc=desc, disable=not master, dynamic_ncols=True)
    for step in bar:
        # linear warm-up after each optimizer reset, then the constant rate of the paper
        lr = args.learning_rate * min(1.0, (state["opt_steps"] + 1) / (args.warmup_iters + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_idx = order[step * per_rank:(step + 1) * per_rank]
        micro = [batch_idx[i:i + args.micro_batch_size] for i in range(0, len(batch_idx), args.micro_batch_size)]
        step_loss = 0.0
        for m, idx in enumerate(micro):
            batch = model.vocab.batch(collate([examples[i] for i in idx]), device)
            if ddp:  # only the last micro-step of a batch needs the gradient all-reduce
                train_model.require_backward_grad_sync = m == len(micro) - 1
            with ctx:
                loss, _ = train_model(**batch, return_logits=False)
            # weigh each micro-batch's mean loss by its share of the examples (the official code
            # averages micro-batch means too; a per-token mean over the whole batch would differ slightly)
            (loss * len(idx) / len(batch_idx)).backward()
            step_loss += loss.item() * len(idx) / len(batch_idx)
            n_tokens += int(batch["attention_mask"].sum())
        # the norm of the whole (all-reduced) gradient, so every rank stops at the same step;
        # max_norm=inf measures without clipping (the factor is exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.gpt.parameters(), args.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise TrainError(f"{desc}: the gradient became {grad_norm.item()} at step {step + 1}; stopped before "
                             f"updating the weights, and the last checkpoint is untouched. Try a lower "
                             f"--learning-rate, or --dtype float32 if bf16 was on (--resume continues from the "
                             f"checkpoint and may change --dtype)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["opt_steps"] += 1
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{n_tokens * world / (time.time() - t0):.0f}")
    return sum(losses) / len(losses), n_tokens * world, time.time() - t0, lr


def train_method(args, method, data, device, ctx):
    """Train one method in <out-dir>/<method>; returns its test result (and skips a finished run)."""
    run_dir = os.path.join(args.out_dir, method)
    ckpt_path, best_path, log_path = (os.path.join(run_dir, f) for f in ("ckpt.pt", "best.pt", "log.jsonl"))
    run_args = {k: v for k, v in vars(args).items() if k not in ("methods",)} | {"method": method}
    ckpt = None
    if os.path.exists(ckpt_path):
        if not args.resume:
            raise TrainError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out-dir")
        ckpt, _ = read_checkpoint(ckpt_path)
        changed = [k for k, v in run_args.items() if k not in RUNTIME_FLAGS and ckpt["args"].get(k) != v]
        if changed:
            raise TrainError(f"{ckpt_path} was trained with different settings: " + ", ".join(
                f"--{k.replace('_', '-')} {ckpt['args'].get(k)} (now {run_args[k]})" for k in changed))
        if ckpt.get("test"):
            print(f"{run_dir}: already finished")
            return ckpt["test"]

    curriculum = Curriculum(method=method, c=args.c, max_latent_stage=args.max_latent_stage, uniform_prob=args.uniform_prob)
    constant = method in ("cot", "no-cot", "no-curriculum")  # one layout for every epoch: a single stage
    last_stage = args.max_latent_stage + 1  # every step replaced, as many thoughts as the last latent stage
    if args.stage == "all":
        n_epochs = args.epochs
        stage_of = lambda e: 0 if constant else min(e // args.epochs_per_stage, last_stage)  # noqa: E731
    else:
        n_epochs = args.epochs_per_stage
        stage_of = lambda e: int(args.stage)  # noqa: E731

    toks = {s: [tokenize_record(r, i, path) for i, r in enumerate(recs)] for s, (recs, path) in data.items()}
    torch.manual_seed(args.seed + rank)
    if ckpt:
        gpt, vocab = gpt_from_checkpoint(ckpt, ckpt_path, args.dropout), Vocab(ckpt.get("vocab"))
    else:
        gpt, vocab = build_gpt(args, [t for split in toks.values() for t in split])
    stages = sorted({stage_of(e) for e in range(n_epochs)})
    for s, (_, path) in data.items():
        check_tokens(toks[s], path, curriculum, stages, gpt.config.block_size, vocab)
    gpt.to(device)
    if args.compile:
        for block in gpt.transformer.h:
            block.compile(dynamic=True)  # Coconut's passes have many lengths
    model = make_coconut(gpt, method, vocab)
    train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None) if ddp else model
    per_rank = args.batch_size // world
    if args.batch_size % (args.micro_batch_size * world):
        raise TrainError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} processes")
    optimizer = gpt.configure_optimizers(args.weight_decay, args.learning_rate, device_type=device.split(":")[0])

    state = dict(epoch=0, stage=None, opt_steps=0, history=[], best_acc=-1.0)
    if ckpt:
        state = {k: ckpt[k] for k in state}
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        print(f"{run_dir}: resuming after epoch {state['epoch']} (stage {state['stage']})")
    elif master:
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(json.dumps(run_args, indent=1), os.path.join(run_dir, "args.json"))
    if master:
        print(f"{method}: {gpt.get_num_params() / 1e6:.2f}M parameters, {len(toks['train'])} training examples, "
              f"{n_epochs} epochs, batch {args.batch_size} = {args.micro_batch_size} x "
              f"{per_rank // args.micro_batch_size} x {world}, on {device}")

    epochs_this_run = 0
    while state["epoch"] < n_epochs:
        epoch, stage = state["epoch"], stage_of(state["epoch"])
        if stage != state["stage"] or args.reset_optimizer == "epoch":
            if state["stage"] is not None:  # a fresh AdamW: the paper resets it at each stage
                optimizer = gpt.configure_optimizers(args.weight_decay, args.learning_rate, device_type=device.split(":")[0])
                state["opt_steps"] = 0
            if stage != state["stage"]:
                state["best_acc"] = -1.0  # "best" means best at the latest stage
            state["stage"] = stage
        # the data order of an epoch depends only on (seed, epoch): a resumed run sees the same batches
        example_rng = random.Random(args.seed * 100003 + epoch)
        examples = [build_example(t, curriculum, stage, rng=example_rng) for t in toks["train"]]
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        order = order[:len(order) // world * world][rank::world].tolist()  # as many steps on every rank
        t0, desc = time.time(), f"{method} epoch {epoch + 1}/{n_epochs} stage {stage}"
        train_loss, n_tokens, train_time, lr = train_epoch(model, train_model, optimizer, examples, order, state,
                                                           args, device, ctx, desc)

        val_examples = [build_example(t, curriculum, stage) for t in toks["valid"]]
        val_loss = validation_loss(model, val_examples, args, device, ctx)
        val = evaluate(model, toks["valid"], data["valid"][0], curriculum, stage, args, device, ctx)
        state["epoch"] = epoch + 1
        metrics = dict(epoch=epoch + 1, stage=stage, train_loss=round(train_loss, 5),
                       val_loss=round(val_loss, 5), val_acc=round(val["acc"], 5), val_tokens=round(val["tokens"], 3),
                       lr=lr, tokens_per_s=round(n_tokens / train_time), seconds=round(time.time() - t0, 1))
        state["history"].append(metrics)
        if master:
            print(json.dumps(metrics))
            ckpt = dict(model=gpt.state_dict(), model_args=asdict(gpt.config), vocab=vocab.ids, args=run_args, method=method,
                        optimizer=optimizer.state_dict(), rng=rng_state(), **state)
            # best first, then last, then the log: a kill between two writes is repaired by the resume
            if val["acc"] > state["best_acc"]:
                state["best_acc"] = ckpt["best_acc"] = val["acc"]
                save_atomic({k: v for k, v in ckpt.items() if k != "optimizer"}, best_path)
            save_atomic(ckpt, ckpt_path)
            write_log(state["history"], log_path)
        else:
            state["best_acc"] = max(state["best_acc"], val["acc"])
        barrier()
        epochs_this_run += 1
        if args.max_epochs_this_run and epochs_this_run >= args.max_epochs_this_run and state["epoch"] < n_epochs:
            print(f"stopping after {epochs_this_run} epochs (--max-epochs-this-run); continue with --resume")
            sys.exit(0)

    # the test split, once, with the best checkpoint of the last stage
    best, _ = read_checkpoint(best_path)
    gpt.load_state_dict(best["model"])
    test = evaluate(model, toks["test"], data["test"][0], curriculum, best["stage"], args, device, ctx)
    test = dict(test=True, method=method, stage=best["stage"], best_epoch=best["epoch"], val_acc=best["best_acc"],
                train_minutes=round(sum(h["seconds"] for h in state["history"]) / 60, 2),
                **{f"test_{k}": round(v, 5) for k, v in test.items()})
    if master:
        print(json.dumps(test))
        ckpt, _ = read_checkpoint(ckpt_path)
        save_atomic(dict(ckpt, test=test), ckpt_path)
        write_log(state["history"] + [test], log_path)
    return test


# -----------------------------------------------------------------------------
# Evaluation only, and the main program

def load_run(path, device="cpu"):
    """A trained run, ready to answer: (checkpoint, its path, the args it was trained with, its
    Coconut model, its Curriculum). path: a .pt file or a run folder (its best.pt)."""
    ckpt, path = read_checkpoint(path)
    run = argparse.Namespace(**ckpt["args"])
    gpt, vocab = gpt_from_checkpoint(ckpt, path), Vocab(ckpt.get("vocab"))
    model = make_coconut(gpt.to(device), run.method, vocab)
    curriculum = Curriculum(method=run.method, c=run.c, max_latent_stage=run.max_latent_stage)
    return ckpt, path, run, model, curriculum


def eval_only(args, device, ctx):
    """Accuracy, generated tokens, forward passes and time per question of a checkpoint on a file."""
    ckpt, path, run, model, curriculum = load_run(args.eval, device)
    eval_file = args.eval_file or run.test_file or os.path.join(run.data_dir, "test.json")
    records = read_records(run.dataset, eval_file)
    tokens = [tokenize_record(r, i, eval_file) for i, r in enumerate(records)]
    check_tokens(tokens, eval_file, curriculum, [ckpt["stage"]], model.gpt.config.block_size, model.vocab)
    ks = [None] if args.n_thoughts is None else [int(k) for k in args.n_thoughts.split(",")]
    if ks != [None] and not curriculum.markers:
        raise TrainError(f"--n-thoughts: a {run.method} model has no thoughts")
    run.eval_batch_size = args.eval_batch_size
    print(f"{path}: {run.method}, stage {ckpt['stage']}, epoch {ckpt['epoch']}; {eval_file}: {len(records)} questions")
    for k in ks:
        r = evaluate(model, tokens, records, curriculum, ckpt["stage"], run, device, ctx, n_thoughts=k)
        label = "" if k is None else f"k={k}  "
        print(f"{label}accuracy {100 * r['acc']:.1f}%  tokens {r['tokens']:.1f}  forward passes {r['passes']:.1f}  "
              f"{r['s_per_q'] * 1000:.1f} ms/question")


def die_with_parent(parent_pid):
    """For a child process: be killed when the parent dies, even by kill -9, so that a `--resume`
    after a kill never finds an orphan still training in the same run folder (Linux; elsewhere a
    no-op, and the README says to kill the children by hand)."""
    def setup():
        try:
            import ctypes
            import signal
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return setup


def train_in_parallel(args, argv):
    """Train each method in a process of its own, args.jobs at a time, each logging to
    <run>/train.log: on a CPU the methods of a comparison then share the cores instead of taking
    turns (with one thread each, two processes on two cores do twice the work of one)."""
    import subprocess
    rest, skip = [], False  # the command line without its --method and --jobs
    for a in argv:
        if skip or a.startswith(("--method=", "--jobs=")):
            skip = False
            continue
        skip = a in ("--method", "--jobs")
        if not skip:
            rest.append(a)
    waiting, running, results = list(args.methods), {}, {}
    while waiting or running:
        while waiting and len(running) < args.jobs:
            method = waiting.pop(0)
            run_dir = os.path.join(args.out_dir, method)
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "train.log"), "a")
            cmd = [sys.executable, os.path.abspath(__file__), *rest, "--method", method, "--jobs", "1"]
            running[method] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                preexec_fn=die_with_parent(os.getpid())), log)
            print(f"{method}: training in the background, progress in {log.name}")
        time.sleep(1)
        for method, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[method]
            if proc.returncode != 0:
                for p, _ in running.values():
                    p.kill()
                raise TrainError(f"{method} failed (exit status {proc.returncode}): see {log.name}")
            ckpt, path = read_checkpoint(os.path.join(args.out_dir, method, "ckpt.pt"))
            if "test" not in ckpt:
                raise TrainError(f"{method} stopped before its test evaluation: see {log.name}")
            results[method] = ckpt["test"]
            print(f"{method}: done, test accuracy {100 * results[method]['test_acc']:.1f}%")
    return [results[m] for m in args.methods]


def main(argv=None):
    args = get_args(argv)
    try:
        device, ctx = setup_device(args)
        if args.eval:
            return eval_only(args, device, ctx)
        # refuse early, before minutes of data generation: an existing run, or weights we cannot get
        for method in args.methods:
            if os.path.exists(os.path.join(args.out_dir, method, "ckpt.pt")) and not args.resume:
                raise TrainError(f"{os.path.join(args.out_dir, method)} already holds a run: pass --resume to "
                                 f"continue it, or choose another --out-dir")
        if args.init in HUB_MODELS:
            fetch_from_hub(args.init)
        data = load_data(args, master)
        t0 = time.time()
        if args.jobs > 1 and len(args.methods) > 1 and not ddp:
            results = train_in_parallel(args, sys.argv[1:] if argv is None else argv)
        else:
            results = [train_method(args, method, data, device, ctx) for method in args.methods]
        if master and len(results) > 1:
            chance = " (chance: 50%)" if args.dataset in ("prosqa", "prontoqa") else ""
            print(f"\n{args.dataset} test accuracy{chance}, {time.time() - t0:.0f} s in all:")
            print("| method | test acc | val acc | tokens | passes | minutes |\n|---|---|---|---|---|---|")
            for r in results:
                print(f"| {r['method']} | {100 * r['test_acc']:.1f}% | {100 * r['val_acc']:.1f}% | "
                      f"{r['test_tokens']:.1f} | {r['test_passes']:.1f} | {r['train_minutes']:.1f} |")
    except (TrainError, ValueError, FileExistsError, WeightsUnavailable) as e:
        # DataError is a ValueError; the generator's and the model's refusals are ValueErrors too
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
