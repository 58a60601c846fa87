"""Shared by the tests: small generated data, made the way a user's first run makes it, and the
scripts of the repository run as a user runs them."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from data import make_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_prosqa(tmp_path_factory, name, seed, sizes, **knobs):
    """(root, data folder, output folder): ProsQA splits of the given sizes and graph knobs."""
    root = tmp_path_factory.mktemp(name)
    make_splits("prosqa", str(root / "data"), seed=seed, sizes=sizes, **knobs)
    return root, str(root / "data"), str(root / "out")


def run_script(*args, cwd=ROOT, env=None, timeout=300):
    """python ARGS (a script of the repository and its arguments, or -c CODE), run as a user runs
    it, from the repository's folder unless cwd says otherwise; the CompletedProcess, as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def run_all(commands, envs=None):
    """Each command (run_script's arguments) in a process of its own, two at a time; their
    CompletedProcess, in order. The refusal tests start many processes, each of which spends most
    of its time importing torch."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda command, env: run_script(*command, env=env), commands,
                             envs or [None] * len(commands)))
