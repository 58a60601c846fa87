"""
Recurrent depth (Geiping, Goldstein et al., 2025, "Scaling up Test-Time Compute with Latent
Reasoning: A Recurrent Depth Approach", arXiv 2502.05171; the Huginn model): the other way to
reason without writing words. Where Coconut thinks in width (each thought a new position, fed the
last hidden state), this model thinks in depth: a block of layers is looped, each iteration
adding depth to every position, and it may stop when its output stops changing.

Built from model.py's GPT and Blocks, as Huginn's raven_modeling_minimal.py:
- a prelude of blocks embeds the input once, e = prelude(x);
- a recurrent core of blocks is applied r times to a state s, from a random start on the
  embeddings' scale: s <- core(adapter(cat(s, e))), e injected again at every iteration;
- a coda of blocks reads the last state out, then ln_f and the tied output layer.
Training draws r per step, r = Poisson(tau) + 1 with tau log-normal around mean_iterations
(sigma 0.5), and back-propagates through the last backprop_depth iterations only; the ones before
run without gradients (sample_iterations). Evaluation runs a fixed r, or stops each row at the
first iteration whose next-token distribution is within a KL threshold of the one before (the
KL exit, Huginn's default at 1e-3). At evaluation the start is zero, the mean of the training
draws, so that an answer depends neither on a draw nor on the other rows of its batch.

The question-then-answer layout is No-CoT's (coconut.stage_layout); Recurrent is a Coconut with
this GPT inside, generating without a KV cache: every new token reruns the whole sequence, each
position iterated again (the answers here are a few tokens long).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from coconut import Coconut
from model import GPT, GPTConfig


@dataclass
class RecurrentConfig(GPTConfig):
    n_prelude: int = 1
    n_core: int = 2  # the looped block of layers (Huginn: 4)
    n_coda: int = 1
    mean_iterations: int = 8  # r's mean in training, and r at evaluation (Huginn: 32)
    backprop_depth: int = 4  # training back-propagates through this many last iterations (Huginn: 8)

    def __post_init__(self):
        self.n_layer = self.n_prelude + self.n_core + self.n_coda  # the Blocks GPT builds: prelude, core, coda


class RecurrentGPT(GPT):
    """GPT's embeddings, Blocks, ln_f and output layer, its blocks split into prelude, core and
    coda, and an adapter that injects the prelude's output into the core at every iteration.

    hidden() is GPT.hidden with the loop inside; after each call, iterations_used holds how many
    iterations each row ran. Set iterations (default: mean_iterations) and exit_threshold (None: a
    fixed r) to evaluate otherwise."""

    def __init__(self, config):
        super().__init__(config)
        self.adapter = nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias)
        self._init_weights(self.adapter)
        self.iterations, self.exit_threshold, self.iterations_used = config.mean_iterations, None, None

    def blocks(self):
        """(prelude, core, coda): slices of GPT's blocks."""
        c, h = self.config, self.transformer.h
        return h[:c.n_prelude], h[c.n_prelude:c.n_prelude + c.n_core], h[c.n_prelude + c.n_core:]

    def hidden(self, idx=None, embeds=None, position_ids=None, attention_mask=None, cache=None):
        if cache is not None and len(cache):
            raise ValueError("the recurrent model reruns the whole sequence: it does not continue a KV cache")
        x, attn_mask, _ = self.inputs(idx, embeds, position_ids, attention_mask)
        prelude, core, coda = self.blocks()
        for block in prelude:
            x = block(x, attn_mask)[0]
        if self.training:  # Huginn's random start, on the scale of GPT-2's initial embeddings
            state = nn.init.trunc_normal_(torch.empty_like(x), std=0.02, a=-0.06, b=0.06)
            free, with_grad = self.sample_iterations()
        else:
            state, free, with_grad = torch.zeros_like(x), self.iterations, 0
        state, self.iterations_used = self.iterate(state, x, attn_mask, free)
        for _ in range(with_grad):
            state = self.core_step(state, x, attn_mask, core)
        return self.read_out(state, attn_mask, coda)

    def core_step(self, state, e, attn_mask, core):
        state = self.adapter(torch.cat([state, e], dim=-1))
        for block in core:
            state = block(state, attn_mask)[0]
        return state

    def read_out(self, state, attn_mask, coda):
        for block in coda:
            state = block(state, attn_mask)[0]
        return self.transformer.ln_f(state)

    def iterate(self, state, e, attn_mask, n):
        """n iterations without gradients, each row frozen from the first iteration whose next-token
        distribution at its last position is within exit_threshold (KL, from the one before) of the
        previous iteration's. Returns the state and each row's iterations."""
        _, core, coda = self.blocks()
        used = torch.full((state.size(0),), n, device=state.device)
        done = torch.zeros(state.size(0), dtype=torch.bool, device=state.device)
        previous = None
        with torch.no_grad():
            for i in range(n):
                state = torch.where(done[:, None, None], state, self.core_step(state, e, attn_mask, core))
                if self.exit_threshold is None or self.training:
                    continue
                logits = self.lm_head(self.read_out(state, attn_mask, coda)[:, -1])
                logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
                if previous is not None:  # KL(previous || now), as Huginn's KLExitEvaluator
                    stop = ~done & ((previous.exp() * (previous - logp)).sum(-1) < self.exit_threshold)
                    used, done = torch.where(stop, i + 1, used), done | stop
                    if done.all():
                        break
                previous = logp
        return state, used

    def sample_iterations(self):
        """(iterations without gradients, iterations with them) for a training step, Huginn's
        sampler: r = Poisson(tau) + 1, tau log-normal with mean mean_iterations and sigma 0.5;
        the last min(r, backprop_depth) iterations carry gradients."""
        sigma = 0.5
        tau = torch.empty(1).log_normal_(math.log(self.config.mean_iterations) - sigma ** 2 / 2, sigma)
        r = int(torch.poisson(tau)) + 1
        with_grad = min(r, self.config.backprop_depth)
        return r - with_grad, with_grad


class Recurrent(Coconut):
    """The recurrent GPT behind Coconut's interface (loss, per-row scores, greedy answers), in the
    question-then-answer layout: no thoughts, so think() is one pass of the loop."""

    def __init__(self, gpt, special):
        super().__init__(gpt, special, feedback=False)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, position_ids, max_new_tokens, intervene=None):
        """Greedy answers, as Coconut.generate gives them; each new token reruns the sequence.
        iterations_per_token: for each decoding step, each row's iterations (for its FLOPs)."""
        eos, B = self.special.eos, input_ids.size(0)
        n_steps = min(max_new_tokens, self.gpt.config.block_size - int(position_ids[:, -1].max()))
        new_tokens, done, self.iterations_per_token = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device), []
        for _ in range(n_steps):
            h = self.gpt.hidden(input_ids, position_ids=position_ids, attention_mask=attention_mask)
            self.iterations_per_token.append(torch.where(done, 0, self.gpt.iterations_used))
            token = torch.where(done, eos, self.gpt.lm_head(h[:, -1]).argmax(dim=-1))
            new_tokens.append(token)
            done |= token == eos
            if done.all():
                break
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)[:, None]], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
        rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(B)]
        return [row[:row.index(eos)] if eos in row else row for row in rows]
