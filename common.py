"""
What every command of the repository shares: refusing bad input in one line, argument types,
atomic file writes, and the device (with torchrun's processes, when there are several).

torch is imported inside the device functions only, so that data.py, which uses the rest, stays
free of it.
"""

import argparse
import json
import os
import sys
from contextlib import contextmanager, nullcontext

# -----------------------------------------------------------------------------
# Bad input: one line on stderr and exit status 1. Anything else is a bug and keeps its traceback.

class InputError(ValueError):
    """A problem with what the user gave (a flag, a file, a record). Its message names the culprit;
    the command line prints it as one line. The project's other errors subclass it."""


@contextmanager
def errors_in_one_line():
    try:
        yield
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, refusing bad flags as every other bad input is refused: one line on stderr, exit
    status 1. Flags must be spelled out (no abbreviations), so that the flags a user gave can be
    told from the defaults (given_flags)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        sys.exit(f"error: {message}")


def given_flags(argv):
    """The flags written on the command line, as argparse names them: {"n_train", ...}; a
    --no-x of a yes/no flag is x."""
    return {a[2:].split("=")[0].removeprefix("no-").replace("-", "_") for a in argv if a.startswith("--")}


def flag(name):
    """How a user writes a setting: n_train -> --n-train."""
    return "--" + name.replace("_", "-")


def counts(text):
    """An argparse type: numbers of at least 0 separated by commas, e.g. 0,1,2."""
    if not all(k.isdigit() for k in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 0,1,2, not {text}")
    return [int(k) for k in text.split(",")]


def bounded(kind, low, high=None):
    """An argparse type: a number of the given kind, at least low (and at most high)."""
    def parse(text):
        x = kind(text)
        if x < low or (high is not None and x > high):
            limits = f"at least {low}" + (f" and at most {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {limits}, not {text}")
        return x
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def nonempty(value):
    """An argparse type: a string that is not empty (a path, a question)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


# -----------------------------------------------------------------------------
# Files

def check_output(path, name, new=True, folder=False):
    """Refuse an output path now, before any work, rather than after it: one that exists (if it
    must be new), a file where a folder is to be (folder=True), one in no folder we may write in,
    or an existing folder we may not write in."""
    if new and os.path.exists(path):
        raise InputError(f"{name} {path}: exists already; name a new one")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{name} {path}: a file, not a folder")
    folders = [os.path.abspath(path)] if os.path.isdir(path) else []
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):  # folders still to be made go into the nearest existing one
        above = os.path.dirname(above)
    for folder in [above, *folders]:
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"{name} {path}: {folder} is not a folder that can be written in")


def write_atomic(path, write):
    """Write a file under a temporary name in its folder, then rename it: a kill never leaves a
    half-written file under the real name. write(f) writes into the binary file f. The one writer
    of every file the repository makes (data splits, checkpoints, logs)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputError(f"{folder}: cannot be made ({e.strerror or e})") from None
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")  # same disk: atomic
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # no permission, no space left: the user's to fix
            raise InputError(f"{path}: cannot be written ({e.strerror or e})") from None
        raise


def write_jsonl(rows, path):
    """One JSON line per row (a run's log, an analysis' data), written atomically."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# -----------------------------------------------------------------------------
# Device, and the processes of torchrun

ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0  # the process that writes files and prints


def barrier():
    if ddp:
        import torch
        torch.distributed.barrier()


def pick_device(name):
    """--device as torch names it: auto is cuda, then mps, then cpu; others must exist here."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if (device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
            or device.type == "mps" and not torch.backends.mps.is_available()):
        raise InputError(f"--device {name}: not available on this machine")
    return name


def to_device(batch, device, special):
    """A collated batch (coconut.collate) on the device. A GPU's attention kernels are planned per
    shape, so there each batch is padded to multiples of 64 columns (pad_columns): a run then sees
    a handful of shapes instead of one a batch; elsewhere padding only costs."""
    import torch
    if torch.device(device).type == "cuda":
        batch = pad_columns(batch, 64, special)
    return {k: v.to(device) for k, v in batch.items()}


def pad_columns(batch, multiple, special):
    """More pads (eos, attention 0, label -100) on both sides of a collated batch, up to multiples
    of `multiple` columns: on the left until its first thought's column (a prompt batch: its
    length) is one, then on the right. special: the ids of eos and <|latent|> (data.SpecialIds)."""
    from torch.nn.functional import pad
    ids = batch["input_ids"]
    thought_cols = (ids == special.latent).any(dim=0).nonzero().flatten().tolist()
    first = ids.size(1) if "labels" not in batch else (thought_cols or [0])[0]
    left = -first % multiple
    right = -(left + ids.size(1)) % multiple
    fill = {"input_ids": special.eos, "labels": -100, "attention_mask": 0, "position_ids": 0}
    return {k: pad(v, (left, right), value=fill[k]) for k, v in batch.items()}


def setup_device(name="auto", dtype="auto", threads=None):
    """(device, autocast context) for --device, --dtype and --threads; under torchrun each process
    takes its own GPU. bf16 autocast: asked for, or by default on a GPU that has it."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    if ddp:
        if not torch.distributed.is_initialized():  # a chain of runs sets up once
            torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    else:
        device = pick_device(name)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # attention by the flash and memory-efficient kernels only: cuDNN's plans a kernel for every
        # new sequence length (measured on an H200: 170 ms for a new length, 45 ms for a known one),
        # and every batch and thought pass here has a length of its own; the math one is slow
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported())
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
    return device, ctx
