"""
Train a grid of settings over several seeds, a few runs at a time with one thread each, and print
a table of their test accuracies (mean and range over the seeds) and minutes.

    python scripts/sweep.py --out out/sweep --seeds 0,1,2 \\
        --setting "preset: --preset cpu --method coconut,cot,no-cot" \\
        --setting "lr 5e-3: --preset cpu --method coconut,cot,no-cot --learning-rate 5e-3"

Each setting is a label and the flags of train.py; every method of a setting trains in a process
of its own (--method a,b,c is split; Coconut alone when no --method is given), into
<out>/<label>/s<seed>/<method>. A run already finished is read, not trained again, so a sweep that
was stopped continues where it was. With --analyze, each Coconut run is also analysed (analyze.py)
and its ablations and frontier figures reported. Paths are read from the folder the sweep runs in,
as train.py reads them; every setting is checked by train.py's parser before any run starts.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import ArgumentParser, InputError, bounded, check_output, counts, errors_in_one_line  # noqa: E402
from config import get_args  # noqa: E402


# train.py's flags that the sweep gives each run itself
SET_BY_SWEEP = {"--seed", "--out-dir", "--name", "--threads", "--jobs", "--resume"}


def last_line(path):
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])


def train(job):
    """Train one (setting, seed, method) unless it is finished; its final log line."""
    label, flags, seed, method, out = job
    run_dir = os.path.join(out, label.replace(" ", "_"), f"s{seed}")
    log = os.path.join(run_dir, method, "log.jsonl")
    if not (os.path.exists(log) and last_line(log).get("test")):
        args = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--method", method, "--seed", str(seed),
                "--out-dir", run_dir, "--threads", "1", "--jobs", "1"]
        if os.path.exists(os.path.join(run_dir, method, "ckpt.pt")):
            args.append("--resume")
        os.makedirs(os.path.join(run_dir, method), exist_ok=True)
        train_log = os.path.join(run_dir, method, "train.log")
        with open(train_log, "a") as f:
            failed = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT).returncode
        if failed:
            with open(train_log) as f:
                last = f.read().strip().splitlines()[-1:] or [""]
            raise InputError(f"setting {label!r}, seed {seed}, {method}: train.py failed ({last[0]}); see {train_log}")
    return job, last_line(log)


def analyse(run_dir):
    """analyze.py's summary of a Coconut run on its test split (read if there already)."""
    summary = os.path.join(run_dir, "analysis", "summary.json")
    if not os.path.exists(summary):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "analyze.py"), run_dir, "--device", "cpu",
                            "--out", os.path.join(run_dir, "analysis")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if r.returncode:
            raise InputError(f"{run_dir}: analyze.py failed ({(r.stderr.strip().splitlines() or [''])[-1]})")
    with open(summary) as f:
        return json.load(f)


def jobs_of(p, setting, args):
    """The (label, flags, seed, method, out) of a --setting "label: train.py flags", one for each
    seed and method; its flags checked now by train.py's own parser, before any run starts."""
    label, colon, flags = setting.partition(":")
    label = label.strip()
    if not colon or not label:
        p.error(f'--setting {setting!r}: expected "label: train.py flags"')
    flags = [part for f in shlex.split(flags) for part in (f.split("=", 1) if f.startswith("--") else [f])]
    for f in sorted(set(flags) & SET_BY_SWEEP):
        p.error(f"--setting {label!r}: {f} is the sweep's to set (--seeds, --out)")
    if flags.count("--method") > 1 or flags[-1:] == ["--method"]:
        p.error(f"--setting {label!r}: --method once, with a value (a,b,c for several)")
    methods = flags[flags.index("--method") + 1].split(",") if "--method" in flags else ["coconut"]
    flags = [f for i, f in enumerate(flags) if f != "--method" and (i == 0 or flags[i - 1] != "--method")]
    if len(set(methods)) < len(methods):
        p.error(f"--setting {label!r}: --method {','.join(methods)} names a method twice")
    out = os.path.join(args.out, label.replace(" ", "_"))
    for method in methods:
        try:
            get_args([*flags, "--method", method, "--seed", str(args.seeds[0]), "--out-dir", out])
        except SystemExit as e:
            raise InputError(f"setting {label!r}: {str(e.code).removeprefix('error: ')}") from None
    return [(label, flags, seed, m, args.out) for seed in args.seeds for m in methods]


def cell(values):
    """mean [min-max] of percentages."""
    values = [100 * v for v in values]
    return f"{statistics.mean(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the folder of the sweep's runs")
    p.add_argument("--seeds", type=counts, default=[0, 1, 2])
    p.add_argument("--setting", action="append", required=True, help='"label: train.py flags"')
    p.add_argument("--jobs", type=bounded(int, 1), default=2, help="runs at a time")
    p.add_argument("--analyze", action="store_true", help="also analyse each Coconut run")
    args = p.parse_args()
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds {','.join(map(str, args.seeds))}: a seed twice")
    check_output(args.out, "--out", new=False, folder=True)
    jobs = [job for setting in args.setting for job in jobs_of(p, setting, args)]
    if len({job[0].replace(" ", "_") for job in jobs}) < len(args.setting):  # a label twice, or two alike
        p.error("--setting: two labels name one folder (spaces become _): each label once")
    t0, results = time.time(), {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for (label, _, seed, method, _), final in pool.map(train, jobs):
            results.setdefault((label, method), {})[seed] = final
            print(f"{label} / {method} / seed {seed}: test {100 * final['test_acc']:.1f}%, "
                  f"{final['train_minutes']:.1f} min ({(time.time() - t0) / 60:.0f} min so far)", flush=True)
    print("\n| setting | method | seeds | test accuracy, mean [range] | minutes | per seed |")
    print("|---|---|---|---|---|---|")
    for (label, method), finals in results.items():
        accs = [finals[s]["test_acc"] for s in sorted(finals)]
        minutes = statistics.mean(finals[s]["train_minutes"] for s in finals)
        print(f"| {label} | {method} | {len(finals)} | {cell(accs)} | {minutes:.1f} | "
              f"{' / '.join(f'{100 * a:.1f}' for a in accs)} |")
    if args.analyze:
        print("\n| setting | seed | " + " | ".join(["(a)", "(b)", "(c)", "(d)"]) + " | frontier 1: hits/n (chance) "
              "| frontier 2 |\n|---|---|---|---|---|---|---|---|")
        for (label, method), finals in results.items():
            if method != "coconut":
                continue
            for s in sorted(finals):
                summary = analyse(os.path.join(args.out, label.replace(" ", "_"), f"s{s}", "coconut"))
                front = [summary["frontier"][k] for k in ("1", "2")]
                print(f"| {label} | {s} | " + " | ".join(f"{100 * a:.1f}" for a in summary["ablations"].values())
                      + " | " + " | ".join(f"{f['hits']}/{f['questions']} ({f['chance']:.0f})" for f in front) + " |")


if __name__ == "__main__":
    with errors_in_one_line():
        main()
