"""
GPT-2 in one file, in the style of nanoGPT (karpathy/nanoGPT), with what Coconut needs from it.

Beyond nanoGPT's model, this one takes
- input embeddings instead of token ids (a continuous thought is a vector, not a token),
- explicit per-row position ids and a padding mask (Coconut's batches are left-padded),
- an incremental KV cache whose keys and values keep their gradients (Coconut trains through it),
and hands back the final hidden state after ln_f: that vector is the continuous thought.
It loads OpenAI's GPT-2 weights (124M to 1.5B) from the Hugging Face Hub or a local checkpoint.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length (number of learned positions)
    vocab_size: int = 50257  # GPT-2's BPE; Coconut grows it to 50260 (see grow_vocab)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in its Linears and LayerNorms
    stop_head: bool = False  # Coconut's classifier of when to stop thinking (coconut.Coconut.forward)


class KVCache:
    """Keys and values of the positions already processed, and which of them are padding.

    Tensors are kept as computed (never detached), so a loss on later positions back-propagates
    through the cached prefix: Coconut's training forward relies on it.
    """

    def __init__(self):
        self.layers = []  # one (k, v) per layer, each (B, n_head, T_past, head_size)
        self.key_mask = None  # (B, T_past) bool, False at padding

    def __len__(self):
        return 0 if self.key_mask is None else self.key_mask.size(1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one matrix (OpenAI's fused c_attn)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, attn_mask, past=None):
        """x: (B, T, C) new positions; attn_mask: None (plain causal) or (B, 1, T, T_past + T) bool;
        past: this layer's cached (k, v) or None. Returns the output and the (k, v) to cache."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU; the exact one drifts from its logits
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, past=None):
        a, kv = self.attn(self.ln_1(x), attn_mask, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


def attention_mask_for(key_mask, T):
    """Which keys each of the last T queries may see: earlier or same position, and not padding.

    key_mask: (B, S) bool over all S keys (cached ones first). Returns (B, 1, T, S) bool.
    Every query also sees itself, pad or not: a padded query with nothing to attend to would give
    NaN, and since no real token attends to a pad, what a pad computes never reaches real tokens.
    """
    B, S = key_mask.shape
    query_pos = torch.arange(S - T, S, device=key_mask.device).view(T, 1)
    key_pos = torch.arange(S, device=key_mask.device).view(1, S)
    causal = key_pos <= query_pos  # (T, S)
    allowed = (causal & key_mask[:, None, :]) | (key_pos == query_pos)
    return allowed[:, None, :, :]


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying, as in GPT-2: the output layer is the token embedding
        self.transformer.wte.weight = self.lm_head.weight
        if config.stop_head:
            self.add_stop_head()
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def add_stop_head(self):
        """Coconut's classifier of when to stop thinking, the paper's unshipped option (Section 3): a
        "go on?" logit from the hidden state that would become the next thought."""
        self.config.stop_head = True
        self.stop_head = nn.Linear(self.config.n_embd, 1, device=self.lm_head.weight.device)
        self._init_weights(self.stop_head)

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def hidden(self, idx=None, embeds=None, position_ids=None, attention_mask=None, cache=None):
        """The final hidden states, after ln_f, of the new positions: (B, T, n_embd).

        idx: (B, T) token ids, or embeds: (B, T, n_embd) input embeddings (exactly one of them).
        position_ids: (B, T), each below block_size; defaults to continuing after the cached
            positions. Given ones are not checked here: reading them would make the CPU wait for
            the GPU at every pass (Coconut's come from collate and generate, which keep them in range).
        attention_mask: (B, T) with 1 at real tokens and 0 at padding, for the new positions only
            (the cache remembers the mask of the positions it holds).
        cache: a KVCache that is read, then extended with the new positions.
        """
        x, attn_mask, key_mask = self.inputs(idx, embeds, position_ids, attention_mask, cache)
        past_len = 0 if cache is None else len(cache)
        new_layers = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, attn_mask, cache.layers[i] if past_len > 0 else None)
            new_layers.append(kv)
        if cache is not None:
            cache.layers, cache.key_mask = new_layers, key_mask
        return self.transformer.ln_f(x)

    def inputs(self, idx, embeds, position_ids, attention_mask, cache=None):
        """What the blocks take (hidden's arguments): the input embeddings plus positions, after
        dropout; the attention mask of the new positions over the cached and new ones (None: plainly
        causal); and the padding mask of all of them, for the cache."""
        assert (idx is None) != (embeds is None), "pass token ids or input embeddings, not both"
        x = self.transformer.wte(idx) if embeds is None else embeds
        B, T, _ = x.shape
        past_len = 0 if cache is None else len(cache)
        if position_ids is None:
            if past_len + T > self.config.block_size:
                raise ValueError(f"position {past_len + T - 1} is past the model's context of "
                                 f"{self.config.block_size} positions")
            position_ids = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
        x = self.transformer.drop(x + self.transformer.wpe(position_ids))
        # the causal fast path when there is nothing to mask but the future
        new_mask = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
        if attention_mask is None and past_len == 0:
            return x, None, new_mask
        key_mask = new_mask if past_len == 0 else torch.cat([cache.key_mask, new_mask], dim=1)
        return x, attention_mask_for(key_mask, T), key_mask

    def forward(self, idx=None, targets=None, embeds=None, position_ids=None, attention_mask=None,
                cache=None, return_hidden=False):
        """nanoGPT's interface: logits, loss = model(idx, targets), with logits at every position.

        targets are the next-token ids (already shifted), as in nanoGPT; -100 is ignored, as in
        Coconut's labels (and PyTorch's and Hugging Face's default; nanoGPT uses -1).
        With return_hidden=True the final hidden states (after ln_f) come third.
        """
        h = self.hidden(idx, embeds, position_ids, attention_mask, cache)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return (logits, loss, h) if return_hidden else (logits, loss)

    def grow_vocab(self, vocab_size, init_from_id):
        """Add rows to the (tied) embedding, each a copy of row init_from_id.

        Coconut adds <|start-latent|>, <|end-latent|> and <|latent|> (50257..50259) and, as the
        official code does, starts them from the embedding of the token "<<".
        """
        old = self.transformer.wte.weight
        if vocab_size < old.size(0):
            raise ValueError(f"cannot shrink the vocabulary from {old.size(0)} to {vocab_size}")
        if vocab_size == old.size(0):
            return
        wte = nn.Embedding(vocab_size, self.config.n_embd, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            wte.weight[: old.size(0)] = old
            wte.weight[old.size(0):] = old[init_from_id]
        self.transformer.wte = wte
        self.lm_head = nn.Linear(self.config.n_embd, vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = wte.weight  # still tied
        self.config.vocab_size = vocab_size

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """OpenAI's GPT-2 weights, in our module layout.

        name_or_path: "gpt2", "gpt2-medium", "gpt2-large" or "gpt2-xl" (fetched once from the Hugging
        Face Hub into its standard cache), or a local Hugging Face directory (config.json with
        model.safetensors or pytorch_model.bin), or a single weights file.
        override_args: e.g. dict(dropout=0.1).
        """
        raw, config_path = read_gpt2_weights(name_or_path)
        return cls.from_state_dict(raw, name_or_path, config_path, override_args)

    @classmethod
    def from_state_dict(cls, raw, where, config_path=None, override_args=None):
        """A GPT from tensors in the Hugging Face layout (see gpt2_tensors); where names them in errors."""
        state_dict, config_args = gpt2_tensors(raw, where, config_path)
        model = GPT(GPTConfig(**{**config_args, **(override_args or {})}))
        sd = model.state_dict()
        expected = set(k for k in sd if k != "lm_head.weight")  # tied to wte
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"{where}: not a GPT-2 checkpoint of this shape: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k in expected:
                # the OpenAI checkpoints use a "Conv1D" module, but we only want a vanilla Linear:
                # these four weights are stored transposed
                w = state_dict[k].t() if k.endswith(CONV1D) else state_dict[k]
                if w.shape != sd[k].shape:
                    raise ValueError(f"{where}: tensor {k} has shape {tuple(w.shape)}, expected {tuple(sd[k].shape)}")
                sd[k].copy_(w)
        return model

    def hf_state_dict(self):
        """Our weights under Hugging Face's GPT2LMHeadModel names, Conv1D weights transposed back,
        without lm_head.weight (tied to wte, as Hugging Face saves it): from_state_dict's inverse."""
        return {k: (v.t() if k.endswith(CONV1D) else v).contiguous()
                for k, v in self.state_dict().items() if k != "lm_head.weight"}

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.999), device_type="cpu"):
        """AdamW, with weight decay on matrices and embeddings only (not on biases and LayerNorms)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by max_new_tokens, with a KV cache; temperature 0 is greedy."""
        cache = KVCache()
        logits = self(idx, cache=cache)[0][:, -1, :]
        for _ in range(max_new_tokens):
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            if len(cache) >= self.config.block_size:
                break
            logits = self(idx_next, cache=cache)[0][:, -1, :]
        return idx


# -----------------------------------------------------------------------------
# Reading GPT-2 checkpoints in the Hugging Face layout

HUB_MODELS = {  # the four OpenAI GPT-2 sizes, under the Hub's openai-community organisation
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M params
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M params
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsUnavailable(OSError):
    """OpenAI's weights could not be had (offline with an empty cache, or no such model)."""


def fetch_from_hub(name):
    """The local folder of openai-community/<name>, downloading it into the Hugging Face cache once."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download
    repo = f"openai-community/{name}"
    try:  # the cache first: no network needed once the weights are there
        return os.path.dirname(hf_hub_download(repo, "model.safetensors", local_files_only=True))
    except Exception:
        pass
    how = ("Pass a local checkpoint instead (a folder with config.json and model.safetensors or "
           "pytorch_model.bin), or train from scratch (--init scratch).")
    host = urlparse(constants.ENDPOINT).hostname
    try:  # offline, the Hub client would retry for half a minute before saying so
        socket.getaddrinfo(host, 443)
    except OSError:
        raise WeightsUnavailable(f"could not get the {name} weights ({repo}): they are not in the Hugging "
                                 f"Face cache, and {host} cannot be reached (offline?). {how}") from None
    try:
        path = hf_hub_download(repo, "model.safetensors")
        hf_hub_download(repo, "config.json")
    except Exception as e:  # no such model, proxy, ...: one message that says what to do
        raise WeightsUnavailable(
            f"could not get the {name} weights from the Hugging Face Hub ({repo}) "
            f"or its cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {how}") from None
    return os.path.dirname(path)


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_gpt2_weights(name_or_path):
    """(tensors, path of the config.json beside them or None) of a Hub name, a Hugging Face
    folder or a weights file (safetensors, or torch.load without running code)."""
    if name_or_path in HUB_MODELS and not os.path.exists(name_or_path):
        name_or_path = fetch_from_hub(name_or_path)
    if os.path.isdir(name_or_path):
        files = [os.path.join(name_or_path, f) for f in WEIGHT_FILES if os.path.exists(os.path.join(name_or_path, f))]
        if not files:
            raise FileNotFoundError(f"{name_or_path}: no {' or '.join(WEIGHT_FILES)} in this folder")
        weights = files[0]
    elif os.path.isfile(name_or_path):
        weights = name_or_path
    else:
        raise FileNotFoundError(f"{name_or_path}: no such file or folder, and not one of {', '.join(HUB_MODELS)}")
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        raw = load_file(weights)
    else:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    config_path = os.path.join(os.path.dirname(weights), "config.json")
    return raw, config_path if os.path.exists(config_path) else None


def gpt2_tensors(raw, where, config_path=None):
    """(state_dict in our names, GPTConfig kwargs) from GPT-2 tensors in the Hugging Face layout:
    keys as GPT2LMHeadModel ("transformer.h.0.attn.c_attn.weight", ...) or GPT2Model ("h.0...")
    names them. Attention-mask buffers and the tied lm_head.weight are dropped, Conv1D weights
    left transposed. Sizes come from config.json when there is one, else from the tensors (the
    head count from GPT-2's own sizes)."""
    state_dict = {}
    for k, v in raw.items():
        # GPT2LMHeadModel prefixes "transformer.", GPT2Model (the Hub's openai-community files) does not
        k = "transformer." + k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight")):
            continue  # causal-mask buffers are not weights, and lm_head is tied to wte
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}: {k} is a {type(v).__name__}, not a tensor")
        state_dict[k] = v.float()  # bf16 checkpoints too
    if "transformer.wte.weight" not in state_dict or "transformer.wpe.weight" not in state_dict:
        raise ValueError(f"{where}: no wte.weight and wpe.weight tensors, so not a GPT-2 checkpoint")
    vocab_size, n_embd = state_dict["transformer.wte.weight"].shape
    layers = [int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h.")]
    config_args = dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=1 + max(layers, default=-1),
                       block_size=state_dict["transformer.wpe.weight"].shape[0], bias=True)
    if config_path is not None:  # a vocabulary already grown to 50260 loads as is
        with open(config_path) as f:
            hf = json.load(f)
        config_args.update(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           block_size=hf["n_positions"], vocab_size=hf["vocab_size"])
    else:
        known = [v for v in HUB_MODELS.values() if v["n_embd"] == n_embd]
        if not known:
            raise ValueError(f"{where}: no config.json beside it, and its width {n_embd} is not a "
                             f"GPT-2 size, so the number of heads is unknown")
        config_args["n_head"] = known[0]["n_head"]
    return state_dict, config_args
