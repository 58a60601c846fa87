"""
Naive references that tests compare the repository's code against (bench.py times the second).

The method's own definition, coconut.naive_think (for every thought, run the whole prefix again and
copy its last hidden state into the next input embedding), is the reference of Coconut.think; here
is what the tests build on it: the official code's generation, one question at a time with no KV
cache.
"""

import torch

from coconut import naive_think
from data import EOS, LATENT


@torch.no_grad()
def official_generate(gpt, prompt, max_new_tokens, eos_id=EOS, latent_id=LATENT):
    """The official Coconut.generate: one question, thoughts by rerunning the prefix, no KV cache."""
    embeds = naive_think(gpt, prompt, latent_id=latent_id)
    new = []
    for _ in range(max_new_tokens):
        token = gpt(embeds=embeds)[0][0, -1].argmax()
        if int(token) == eos_id:
            break
        new.append(int(token))
        embeds = torch.cat([embeds, gpt.transformer.wte(token.view(1, 1))], dim=1)
    return new
