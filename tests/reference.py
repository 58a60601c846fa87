"""
Naive references that tests compare the repository's code against (bench.py times the second).

The method as the paper states it, one example at a time, with no padding and no KV cache: for
every thought, run the whole prefix again and copy its last hidden state into the next input
embedding. The official code's generate works this way.
"""

import torch

from data import EOS, LATENT


def naive_thoughts(gpt, ids, detach=False, latent_id=LATENT):
    """Input embeddings (1, T, C) of one unpadded example with its thoughts filled in as the paper
    defines them: for each <|latent|>, run the whole prefix again and take its last hidden state.
    detach=True cuts the gradient through the thoughts."""
    embeds = gpt.transformer.wte(torch.tensor([ids], device=gpt.lm_head.weight.device))
    for j, token in enumerate(ids):
        if token == latent_id:
            hidden = gpt(embeds=embeds[:, :j], return_hidden=True)[2]
            hidden = hidden.detach() if detach else hidden
            embeds = torch.cat([embeds[:, :j], hidden[:, -1:], embeds[:, j + 1:]], dim=1)
    return embeds


@torch.no_grad()
def official_generate(gpt, prompt, max_new_tokens, eos_id=EOS, latent_id=LATENT):
    """The official Coconut.generate: one question, thoughts by rerunning the prefix, no KV cache."""
    embeds = naive_thoughts(gpt, prompt, latent_id=latent_id)
    new = []
    for _ in range(max_new_tokens):
        token = gpt(embeds=embeds)[0][0, -1].argmax()
        if int(token) == eos_id:
            break
        new.append(int(token))
        embeds = torch.cat([embeds, gpt.transformer.wte(token.view(1, 1))], dim=1)
    return new
