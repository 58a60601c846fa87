"""
Tests of the offline GPT-2 tokenizer in data.py.

Run: python -m pytest -q tests/test_tokenizer.py
The reference is tiktoken's own get_encoding("gpt2"), made to run offline by putting the same two
BPE files in a fresh tiktoken cache under the names tiktoken gives them.
"""

import hashlib
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

SAMPLES = [
    "hello world",
    "Every lempus is a yerpus. Tom is a boompus. Is Tom a gorpus or zhorpus?",
    "  leading spaces, trailing spaces   \n\n\ttabs\t and newlines\n",
    "<<16-3-4=9>> <<9*2=18>> #### 18",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "It's, I'm, we'll, they've, you're, don't: contractions; ünïcödé, 東京, emoji 🙂, 1234567 3.14",
    "### Tom is a wumpus.",
]


def test_known_ids():
    assert data.encode("hello world") == [31373, 995]
    assert data.encode("\n") == [198]
    assert data.encode("<<") == [16791]  # the row new latent embeddings start from
    assert data.decode([31373, 995]) == "hello world"


def test_special_ids():
    assert (data.EOS, data.START_LATENT, data.END_LATENT, data.LATENT) == (50256, 50257, 50258, 50259)
    enc = data.get_tokenizer()
    assert enc.n_vocab == data.N_VOCAB == 50260
    for text, i in [("<|endoftext|>", 50256), ("<|start-latent|>", 50257), ("<|end-latent|>", 50258),
                    ("<|latent|>", 50259)]:
        assert enc.encode(text, allowed_special="all") == [i]
        assert data.decode([i]) == text
    # markers inside plain text are never turned into special ids
    assert 50259 not in data.encode("a <|latent|> b")


def test_equals_tiktoken_gpt2_encoding_and_works_offline(tmp_path):
    """In a fresh process with sockets disabled and an empty tiktoken cache, our tokenizer loads and
    agrees with tiktoken.get_encoding('gpt2') (fed the same files through its own cache)."""
    folder = data.bpe_dir()
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    # tiktoken names cached files by the SHA-1 of the URL it would download them from
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        with open(os.path.join(folder, name), "rb") as src, open(cache / key, "wb") as dst:
            dst.write(src.read())
    script = textwrap.dedent(f"""
        import socket, sys
        def no_network(*a, **k):
            raise OSError("network disabled in this test")
        socket.socket.connect = no_network
        socket.create_connection = no_network
        sys.path.insert(0, {ROOT!r})
        import data, tiktoken
        ours = [data.encode(s) for s in {SAMPLES!r}]
        import os
        os.environ["TIKTOKEN_CACHE_DIR"] = {str(cache)!r}
        ref = tiktoken.get_encoding("gpt2")
        for s, ids in zip({SAMPLES!r}, ours):
            assert ids == ref.encode_ordinary(s), s
            assert data.decode(ids) == s
        print("ok")
    """)
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_corrupted_bpe_file_is_refused(tmp_path, monkeypatch):
    for name in ("encoder.json", "vocab.bpe"):
        with open(os.path.join(data.bpe_dir(), name), "rb") as f:
            content = f.read()
        (tmp_path / name).write_bytes(content if name == "encoder.json" else content + b"\n")
    monkeypatch.setenv("COCONUT_BPE_DIR", str(tmp_path))
    data.get_tokenizer.cache_clear()
    try:
        import pytest
        with pytest.raises(RuntimeError, match="vocab.bpe: SHA-256"):
            data.get_tokenizer()
    finally:
        monkeypatch.delenv("COCONUT_BPE_DIR")
        data.get_tokenizer.cache_clear()
