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


def run_all(commands, envs=None):
    """Each command (a script of the repository and its arguments) in a process of its own, two at a
    time, from the repository's folder; their CompletedProcess, in order. The refusal tests start
    many processes, each of which spends most of its time importing torch."""
    def one(command, env):
        return subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, **(env or {})))
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, commands, envs or [None] * len(commands)))
