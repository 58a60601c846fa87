"""Shared by the tests: small generated data, made the way a user's first run makes it."""

from data import make_splits


def small_prosqa(tmp_path_factory, name, seed, sizes, **knobs):
    """(root, data folder, output folder): ProsQA splits of the given sizes and graph knobs."""
    root = tmp_path_factory.mktemp(name)
    make_splits("prosqa", str(root / "data"), seed=seed, sizes=sizes, **knobs)
    return root, str(root / "data"), str(root / "out")
