"""
Tests of model.py against an independent GPT-2 forward written here from the raw tensors.

Run: python -m pytest -q tests/test_model.py
Checkpoints are built by the tests themselves, in the Hugging Face GPT-2 layout (config.json +
model.safetensors or pytorch_model.bin, Conv1D weights stored as (in, out)). No network.
"""

import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, KVCache, WeightsUnavailable, attention_mask_for  # noqa: E402

TINY = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=101)


def hf_state_dict(n_layer, n_head, n_embd, n_positions, vocab_size, prefix="transformer.", seed=0):
    """Random weights named and shaped as Hugging Face's GPT2LMHeadModel stores them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    C = n_embd
    sd = {f"{prefix}wte.weight": r(vocab_size, C), f"{prefix}wpe.weight": r(n_positions, C),
          f"{prefix}ln_f.weight": 1 + r(C), f"{prefix}ln_f.bias": r(C)}
    for i in range(n_layer):
        p = f"{prefix}h.{i}."
        sd.update({
            p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
            p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),  # Conv1D: (in, out)
            p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
            p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
            p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
            p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
            # the causal-mask buffers old checkpoints carry
            p + "attn.bias": torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions),
            p + "attn.masked_bias": torch.tensor(-1e4),
        })
    return sd


def write_checkpoint(folder, sd, fmt, config):
    os.makedirs(folder, exist_ok=True)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(dict(config, model_type="gpt2", layer_norm_epsilon=1e-5), f)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    else:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    return folder


def reference_logits(sd, n_layer, n_head, idx, prefix="transformer."):
    """GPT-2's forward written out by hand from the Hugging Face tensors (no model.py code)."""
    W = lambda name: sd[prefix + name]  # noqa: E731

    def layer_norm(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    def gelu(x):  # the tanh approximation GPT-2 was trained with
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    T = idx.size(1)
    x = W("wte.weight")[idx] + W("wpe.weight")[torch.arange(T)]
    C = x.size(-1)
    hs = C // n_head
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"h.{i}."
        a = layer_norm(x, W(p + "ln_1.weight"), W(p + "ln_1.bias"))
        qkv = a @ W(p + "attn.c_attn.weight") + W(p + "attn.c_attn.bias")
        q, k, v = qkv.split(C, dim=-1)
        heads = []
        for h in range(n_head):
            s = slice(h * hs, (h + 1) * hs)
            att = (q[..., s] @ k[..., s].transpose(-1, -2)) / math.sqrt(hs)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append(att @ v[..., s])
        x = x + torch.cat(heads, -1) @ W(p + "attn.c_proj.weight") + W(p + "attn.c_proj.bias")
        m = layer_norm(x, W(p + "ln_2.weight"), W(p + "ln_2.bias"))
        m = gelu(m @ W(p + "mlp.c_fc.weight") + W(p + "mlp.c_fc.bias"))
        x = x + m @ W(p + "mlp.c_proj.weight") + W(p + "mlp.c_proj.bias")
    x = layer_norm(x, W("ln_f.weight"), W("ln_f.bias"))
    return x @ W("wte.weight").t()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("prefix", ["transformer.", ""])  # GPT2LMHeadModel vs GPT2Model key names
def test_hf_checkpoint_gives_reference_logits(tmp_path, fmt, prefix):
    sd = hf_state_dict(**TINY, prefix=prefix)
    folder = write_checkpoint(tmp_path / "ckpt", sd, fmt, TINY)
    model = GPT.from_pretrained(str(folder)).eval()
    assert model.config.vocab_size == TINY["vocab_size"] and model.config.block_size == TINY["n_positions"]
    idx = torch.randint(0, TINY["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
    ref = reference_logits(sd, TINY["n_layer"], TINY["n_head"], idx, prefix)
    assert logits.shape == (3, 20, TINY["vocab_size"])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_grown_vocabulary_loads_as_is(tmp_path):
    """A checkpoint saved after Coconut grew the vocabulary to 50260 loads with that vocabulary."""
    config = dict(TINY, vocab_size=50260)
    folder = write_checkpoint(tmp_path / "c", hf_state_dict(**config), "safetensors", config)
    assert GPT.from_pretrained(str(folder)).config.vocab_size == 50260


def test_single_weights_file_without_config(tmp_path):
    """Without config.json the sizes come from the tensors; the head count from GPT-2's own sizes."""
    config = dict(n_layer=1, n_head=12, n_embd=768, n_positions=16, vocab_size=50)
    sd = hf_state_dict(**config)
    path = tmp_path / "weights.bin"
    torch.save(sd, path)
    model = GPT.from_pretrained(str(path))
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (1, 12, 768)
    idx = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference_logits(sd, 1, 12, idx), atol=1e-4, rtol=1e-4)


def test_shape_mismatch_names_the_tensor(tmp_path):
    sd = hf_state_dict(**TINY)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"][:, :-1]
    folder = write_checkpoint(tmp_path / "bad", sd, "safetensors", TINY)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight"):
        GPT.from_pretrained(str(folder))


def test_missing_path_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        GPT.from_pretrained(str(tmp_path / "no-such-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path / "empty"))


def test_hub_weights_unavailable_offline(tmp_path, monkeypatch):
    """Offline with an empty cache: one clear error saying what to do, not a traceback wall."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsUnavailable) as e:
        GPT.from_pretrained("gpt2")
    message = str(e.value)
    assert "openai-community/gpt2" in message and "local checkpoint" in message and "--init scratch" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__


# -----------------------------------------------------------------------------
# What Coconut needs: embeddings as input, padding, positions, a KV cache, the hidden state

def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**dict(dict(block_size=64, vocab_size=101, n_layer=2, n_head=4, n_embd=32), **kw)))


def test_logits_at_every_position_and_nanogpt_loss():
    model = tiny_model()
    idx = torch.randint(0, 101, (2, 12))
    targets = torch.randint(0, 101, (2, 12))
    targets[0, :4] = -100  # ignored, as in Coconut's labels (nanoGPT uses -1)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, 101)
    keep = targets != -100
    manual = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss, manual)
    assert model(idx)[1] is None


def test_hidden_state_is_after_ln_f_and_feeds_the_logits():
    model = tiny_model()
    idx = torch.randint(0, 101, (2, 7))
    logits, _, h = model(idx, return_hidden=True)
    torch.testing.assert_close(logits, h @ model.transformer.wte.weight.t())
    # it is the output of ln_f: with ln_f's gain zeroed, every hidden state is ln_f's bias
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.arange(32.0))
    h = model(idx, return_hidden=True)[2]
    torch.testing.assert_close(h, torch.arange(32.0).expand(2, 7, 32))


def test_embeddings_input_equals_ids_input():
    model = tiny_model()
    idx = torch.randint(0, 101, (3, 10))
    a, _ = model(idx)
    b, _ = model(embeds=model.transformer.wte(idx))
    torch.testing.assert_close(a, b)


def test_kv_cache_matches_full_forward_logits_and_gradients():
    """Feeding the sequence in chunks through the cache gives the same logits and the same gradients
    (the gradient flows back through the cached keys and values)."""
    idx = torch.randint(0, 101, (2, 15), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 101, (2, 15), generator=torch.Generator().manual_seed(4))

    full = tiny_model()
    logits_full, loss_full = full(idx, targets)
    loss_full.backward()

    chunked = tiny_model()
    cache = KVCache()
    pieces = [chunked(idx[:, a:b], cache=cache)[0] for a, b in [(0, 6), (6, 7), (7, 8), (8, 15)]]
    logits_chunked = torch.cat(pieces, dim=1)
    loss_chunked = torch.nn.functional.cross_entropy(logits_chunked.reshape(-1, 101), targets.reshape(-1))
    loss_chunked.backward()

    assert len(cache) == 15
    torch.testing.assert_close(logits_chunked, logits_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_chunked, loss_full)
    for (name, p_full), p_chunked in zip(full.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(p_chunked.grad, p_full.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_left_padded_batch_equals_each_row_alone():
    """Rows of different lengths, left-padded, with positions restarting at 0 after the pads, give
    each row's own logits; also when continued through the KV cache."""
    model = tiny_model().eval()
    rows = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]
    T = max(len(r) for r in rows)
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cont = torch.randint(0, 101, (3, 3))  # three more tokens for every row, through the cache

    with torch.no_grad():
        cache = KVCache()
        batch_logits, _ = model(idx, position_ids=pos, attention_mask=mask, cache=cache)
        cont_logits, _ = model(cont, position_ids=pos[:, -1:] + 1 + torch.arange(3), cache=cache)
        assert not torch.isnan(batch_logits).any()  # padded queries must not produce NaN
        for i, r in enumerate(rows):
            alone, _ = model(torch.cat([r, cont[i]])[None])
            torch.testing.assert_close(batch_logits[i, T - len(r):], alone[0, :len(r)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cont_logits[i], alone[0, len(r):], atol=1e-5, rtol=1e-5)


def test_grow_vocab_copies_the_init_row_and_stays_tied():
    model = tiny_model()
    idx = torch.randint(0, 101, (1, 8))
    before, _ = model(idx)
    model.grow_vocab(104, init_from_id=7)
    assert model.config.vocab_size == 104
    assert model.lm_head.weight is model.transformer.wte.weight
    for new_id in (101, 102, 103):
        torch.testing.assert_close(model.transformer.wte.weight[new_id], model.transformer.wte.weight[7])
    after, _ = model(idx)
    torch.testing.assert_close(after[..., :101], before)  # old tokens unchanged
    assert after.shape[-1] == 104


def test_greedy_generate_equals_naive_loop():
    """generate() with its KV cache picks the same tokens as re-running the whole sequence."""
    model = tiny_model().eval()
    idx = torch.randint(0, 101, (2, 5))
    out = model.generate(idx, max_new_tokens=8, temperature=0)
    naive = idx
    with torch.no_grad():
        for _ in range(8):
            naive = torch.cat([naive, model(naive)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, naive)
    assert int(out.max()) < model.config.vocab_size


def test_position_past_context_is_a_clear_error():
    model = tiny_model(block_size=8)
    with pytest.raises(ValueError, match="context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_attention_mask_lets_every_query_see_a_key_and_real_tokens_only_theirs():
    """Every query row must see at least one key: a row that sees none gives NaN in some attention
    kernels (and zeros in others, which would hide the bug). A real token sees exactly the real
    tokens up to itself. Left-padded rows, a row of pads only, and a cached prefix."""
    g = torch.Generator().manual_seed(0)
    for S, T in [(6, 6), (9, 4), (9, 1), (12, 12)]:
        key_mask = torch.rand(5, S, generator=g) < 0.6
        key_mask[0, :] = False  # nothing but pads
        key_mask[1, :S - T + 1] = False  # left padding reaching into the new positions
        allowed = attention_mask_for(key_mask, T)[:, 0]  # (B, T, S)
        assert allowed.any(dim=-1).all(), (S, T)
        for b in range(5):
            for t in range(T):
                q = S - T + t
                if key_mask[b, q]:
                    expected = [bool(key_mask[b, k]) and k <= q for k in range(S)]
                    assert allowed[b, t].tolist() == expected, (S, T, b, t)


def test_bench_runs_and_reports_what_it_promises():
    """bench.py (issue: the GPU path) on a tiny setting: the loop at two stages, the thought ratio,
    the generation speed-up with the same tokens as the official algorithm."""
    import subprocess
    r = subprocess.run([sys.executable, "bench.py", "--size", "tiny", "--batch-size", "4", "--micro-batch-size", "4",
                        "--steps", "1", "--stages", "0,7", "--repeats", "1", "--baseline-prompts", "2",
                        "--max-new-tokens", "3", "--device", "cpu", "--threads", "1"],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for text in ("stage 0:", "stage 7:", "ratio", "speed-up", "same tokens on 2/2 compared prompts"):
        assert text in r.stdout, (text, r.stdout)
