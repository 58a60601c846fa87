"""
Chain of Continuous Thought (Coconut; Hao et al., 2024, arXiv 2412.06769): the method, on model.py's GPT.

A continuous thought is the last hidden state (after ln_f) of a position, fed back as the input
embedding of the next one, a <|latent|> slot. naive_think says it in ten lines; the rest makes it
trainable and fast: the curriculum (at stage k the first k steps of an example become k*c slots
between <|start-latent|> and <|end-latent|>, the loss ignoring question, markers and slots:
Curriculum, stage_layout, build_example), the official padding (collate), Coconut.think (naive_think
for a padded batch, with one KV cache), Coconut.forward (the loss, back-propagated through every
thought) and Coconut.generate. Token ids are the model's own (GPT-2's, or a smaller vocabulary's:
data.Vocab); `special` holds the ids of eos and the three markers among them (data.SpecialIds).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from data import GPT2_SPECIAL_IDS
from model import KVCache


def naive_think(gpt, ids, latent_id=GPT2_SPECIAL_IDS.latent):
    """The method's definition: the input embeddings (1, T, C) of one unpadded example, each
    <|latent|> slot holding its continuous thought. For each slot in turn, run the whole prefix
    before it through the GPT and write the last hidden state into the slot: a thought is computed
    from the thoughts before it. The loss and the answers then come from gpt(embeds=...)."""
    embeds = gpt.transformer.wte(torch.tensor([ids], device=gpt.lm_head.weight.device))
    for j, token in enumerate(ids):
        if token == latent_id:
            thought = gpt.hidden(embeds=embeds[:, :j])[:, -1:]
            embeds = torch.cat([embeds[:, :j], thought, embeds[:, j + 1:]], dim=1)
    return embeds


# The variants of the paper's Table 1, which differ only in the layout of their examples
# (stage_layout), except "pause", whose <|latent|> is a learned token, fed nothing back; and the
# recurrent-depth model (recurrent.py), which thinks in depth in No-CoT's layout.
METHODS = ("coconut", "cot", "no-cot", "no-thoughts", "pause", "no-curriculum", "recurrent")


@dataclass
class Curriculum:
    """Everything that depends on the stage: which stage each epoch trains (schedule), and the
    layout of an example at a stage (stage_layout, build_example). The defaults are the paper's
    for ProsQA."""
    method: str = "coconut"
    c: int = 1  # thoughts per replaced reasoning step ("c" in the paper)
    max_latent_stage: int = 6  # past this stage every step is gone and the thoughts stop growing
    epochs_per_stage: int = 5
    uniform_prob: float = 0.0  # chance that a training example gets a random stage (the paper's analysis model)
    pad_latent_to_max: bool = True  # False: an example gets thoughts for its own steps only (as official)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")

    @property
    def markers(self):
        # the official code writes <|start-latent|> / <|end-latent|> only where thoughts may follow
        return self.method in ("coconut", "pause", "no-curriculum")

    @property
    def feedback(self):  # thoughts fed back: all but "pause as thought"
        return self.method != "pause"

    @property
    def stages(self):
        """The stages this method trains at: CoT and No-CoT have one layout (stage 0 by name),
        no-curriculum only the last stage, the others 0 (CoT) to max_latent_stage + 1 (every step gone)."""
        last = self.max_latent_stage + 1
        return {"cot": [0], "no-cot": [0], "recurrent": [0], "no-curriculum": [last]}.get(self.method,
                                                                                           list(range(last + 1)))

    def schedule(self, stage="all", epochs=None):
        """The stage of each epoch. "all" walks the stages, epochs_per_stage epochs each, and stays in
        the last one until `epochs` are spent; a single stage is trained for epochs_per_stage epochs."""
        if stage != "all":
            if stage not in self.stages:
                have = ", ".join(map(str, self.stages))
                raise ValueError(f"{self.method} trains at stage{'s' * (len(self.stages) > 1)} {have}")
            return [stage] * self.epochs_per_stage
        return [self.stages[min(e // self.epochs_per_stage, len(self.stages) - 1)] for e in range(epochs)]


def stage_layout(curriculum, stage, n_steps):
    """(steps removed, thoughts) for an example with n_steps reasoning steps at a stage: the one
    place the layout of a stage is decided, for training and evaluation alike.

    Coconut removes min(stage, n_steps) steps and writes min(stage, max_latent_stage) * c thoughts
    (an example with fewer steps than its stage still gets them all, as the official code trains
    it, unless pad_latent_to_max is off); past max_latent_stage every step is gone. The variants
    change one thing each."""
    cur = curriculum
    if cur.method == "cot":  # stage 0 for ever: the whole chain of thought in language
        return 0, 0
    if cur.method in ("no-cot", "recurrent"):  # question straight to answer
        return n_steps, 0
    if cur.method == "no-curriculum":  # straight to the last stage
        stage = cur.max_latent_stage + 1
    n_removed = n_steps if stage > cur.max_latent_stage else min(stage, n_steps)
    c = 0 if cur.method == "no-thoughts" else cur.c  # "w/o thought": the curriculum, no thoughts
    return n_removed, min(stage, cur.max_latent_stage, n_steps if not cur.pad_latent_to_max else stage) * c


def build_example(tokens, curriculum, stage, *, special=GPT2_SPECIAL_IDS, rng=None, prompt_only=False,
                  n_thoughts=None):
    """input_ids and labels of one example, from a tokenized record (data.tokenize_record's
    layout, in the model's ids): question [<|start-latent|> <|latent|>*n <|end-latent|>] remaining
    steps "### answer" eos.
    Labels are -100 on the question, the markers and the thoughts (aligned with input_ids; the
    shift happens in the loss). prompt_only stops after the thoughts (for generation);
    n_thoughts overrides the count (the paper's sweep of k at inference).
    rng: a random.Random, for uniform_prob (a random stage per example, training only).
    """
    n_steps = len(tokens["steps"])
    if rng is not None and curriculum.uniform_prob > 0 and rng.random() < curriculum.uniform_prob:
        stage = rng.randint(0, n_steps)
    n_removed, n_latent = stage_layout(curriculum, stage, n_steps)
    if n_thoughts is not None:
        n_latent = n_thoughts
    prompt = list(tokens["question"])
    if curriculum.markers:
        prompt += [special.start_latent] + [special.latent] * n_latent + [special.end_latent]
    if prompt_only:
        return {"input_ids": prompt, "labels": [-100] * len(prompt)}
    target = [t for step in tokens["steps"][n_removed:] for t in step] + list(tokens["answer"])
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def collate(examples, for_generation=False, special=GPT2_SPECIAL_IDS):
    """Pad a list of examples into tensors: input_ids, labels, attention_mask, position_ids.
    Training (the official layout): left-pad each row so that every row's first <|latent|> sits in
    the same column, then right-pad to the longest row. Generation: left-pad every prompt to the
    same length, so that all rows continue from the last column.
    Position ids restart at 0 after the left pads; pads are eos with attention 0 and label -100
    (a generation batch has no labels, so that it can be passed as Coconut.generate(**batch)).
    """
    ids = [e["input_ids"] for e in examples]
    if for_generation:
        left = [max(map(len, ids)) - len(x) for x in ids]
    else:
        firsts = [x.index(special.latent) if special.latent in x else None for x in ids]
        align = max((f for f in firsts if f is not None), default=0)
        left = [0 if f is None else align - f for f in firsts]
    B, T = len(examples), max(pad + len(x) for pad, x in zip(left, ids))
    batch = {"input_ids": torch.full((B, T), special.eos), "labels": torch.full((B, T), -100),
             "attention_mask": torch.zeros(B, T, dtype=torch.long), "position_ids": torch.zeros(B, T, dtype=torch.long)}
    for i, (pad, e) in enumerate(zip(left, examples)):
        n = len(e["input_ids"])
        batch["input_ids"][i, pad:pad + n] = torch.tensor(e["input_ids"])
        if "labels" in e:  # prompts for generation may come without
            batch["labels"][i, pad:pad + n] = torch.tensor(e["labels"])
        batch["attention_mask"][i, pad:pad + n] = 1
        batch["position_ids"][i, pad:pad + n] = torch.arange(n)
    return {k: v for k, v in batch.items() if k != "labels" or not for_generation}


class Coconut(nn.Module):
    """A GPT from model.py that thinks in continuous thoughts at its <|latent|> positions.
    feedback=False keeps <|latent|> an ordinary learned token: the paper's "pause as thought"."""

    def __init__(self, gpt, special=GPT2_SPECIAL_IDS, feedback=True):
        super().__init__()
        self.gpt, self.special, self.feedback = gpt, special, feedback

    def think(self, input_ids, attention_mask, position_ids, cache=None, intervene=None):
        """naive_think for a padded batch: the final hidden states (B, T, C) of every position, each
        <|latent|> slot fed the hidden state of the position before it. intervene(k, thoughts), if
        given, returns the (B, C) vectors written in instead of the k-th column of thoughts
        (analyze.py's ablations).

        Instead of running the prefix again for each thought, the columns are cut into segments
        that each start at a column where some row has a slot, and run one after the other through
        one KV cache: when a segment runs, the thought it needs (the last hidden state of the
        segment before) exists. With the official layout (every row's thoughts in the same columns)
        that is its schedule: the prefix, then one pass per thought, then the rest.
        """
        cache = KVCache() if cache is None else cache
        # the slots that take a thought; with "pause" none do, and <|latent|> is a plain token
        fed = (input_ids == self.special.latent) & self.feedback
        fed_cols = fed.any(dim=0).nonzero().flatten().tolist()
        if fed_cols and fed_cols[0] == 0:
            raise ValueError("a <|latent|> in the first column has no hidden state to take")
        bounds = [0] + fed_cols + [input_ids.size(1)]
        # embed once: one lookup per segment would give the (vocab x C) embedding one dense gradient each
        token_embeds = self.gpt.transformer.wte(input_ids)
        hidden = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            x = token_embeds[:, a:b]
            if hidden:  # write the thought in, for the rows that think in column a
                thought = hidden[-1][:, -1]
                if intervene is not None:
                    thought = intervene(len(hidden) - 1, thought)
                first = torch.where(fed[:, a, None], thought, x[:, 0])
                x = torch.cat([first[:, None], x[:, 1:]], dim=1)
            hidden.append(self.gpt.hidden(embeds=x, position_ids=position_ids[:, a:b],
                                          attention_mask=attention_mask[:, a:b], cache=cache))
        return torch.cat(hidden, dim=1)

    def forward(self, input_ids, labels, attention_mask, position_ids, per_row=False):
        """Mean cross-entropy over the labels that are not -100 (labels aligned with input_ids and
        shifted here, as the official code does); per_row: each row's summed cross-entropy. With a
        stop head (model.GPT's), plus its own loss at each position whose hidden state becomes a
        thought or ends them: 1 before a <|latent|>, 0 before <|end-latent|>."""
        hidden = self.think(input_ids, attention_mask, position_ids)
        targets = labels[:, 1:]
        supervised = targets != -100
        # the output layer only where there is a label: on a CPU, most of the time saved
        logits = self.gpt.lm_head(hidden[:, :-1][supervised]).float()
        if not per_row:
            loss = F.cross_entropy(logits, targets[supervised])
            if self.gpt.config.stop_head:
                go_on, ends = input_ids[:, 1:] == self.special.latent, input_ids[:, 1:] == self.special.end_latent
                logit = self.gpt.stop_head(hidden[:, :-1][go_on | ends]).float()[:, 0]
                loss = loss + F.binary_cross_entropy_with_logits(logit, go_on[go_on | ends].float())
            return loss
        losses = F.cross_entropy(logits, targets[supervised], reduction="none")
        return torch.zeros(len(targets), device=losses.device).index_add_(0, supervised.nonzero()[:, 0], losses)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, position_ids, max_new_tokens, intervene=None):
        """Greedy answers to a left-padded batch of prompts (question, then any markers and
        <|latent|> slots): runs the thoughts, then decodes with the KV cache, each row stopping at
        its own eos. Returns per row the list of new token ids (prompt and eos excluded)."""
        B, eos, cache = input_ids.size(0), self.special.eos, KVCache()
        hidden = self.think(input_ids, attention_mask, position_ids, cache, intervene)
        next_position = position_ids[:, -1] + 1
        # decode until every row has its eos, or the longest row fills the context; on a GPU, asking
        # whether all rows are done makes the CPU wait, so it asks every 8 tokens (rows that are done
        # only add eos, cut below)
        n_steps = min(max_new_tokens, self.gpt.config.block_size - int(next_position.max()) + 1)
        check_every = 8 if input_ids.is_cuda else 1
        logits, new_tokens = self.gpt.lm_head(hidden[:, -1]), []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(n_steps):
            token = torch.where(done, eos, logits.argmax(dim=-1))
            new_tokens.append(token)
            done |= token == eos
            if step == n_steps - 1 or (step + 1) % check_every == 0 and done.all():
                break
            h = self.gpt.hidden(token[:, None], position_ids=next_position[:, None], cache=cache)
            logits = self.gpt.lm_head(h[:, -1])
            next_position = next_position + 1
        rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(B)]
        return [row[:row.index(eos)] if eos in row else row for row in rows]
