"""
Chain of Continuous Thought (Coconut; Hao et al., 2024, arXiv 2412.06769), on top of model.py.

Flow of the repository: data -> model -> coconut -> config -> checkpoint -> evaluate -> train
-> analyze -> sample.

The method in three parts, in the order a reader needs them:
1. the curriculum: at stage k the first k reasoning steps of an example are replaced by k*c
   <|latent|> slots between <|start-latent|> and <|end-latent|>, and the loss ignores question,
   markers and slots (Curriculum, stage_layout, build_example, collate);
2. the forward: each <|latent|> slot takes as its input embedding the last hidden state (after
   ln_f) of the position just before it, a "continuous thought"; since that state only exists once
   the prefix has been run, n thoughts take n+1 passes, each reusing the KV cache of the prefix,
   and the loss back-propagates through every thought (Coconut.think, Coconut.forward);
3. batched greedy generation: run the thoughts, then decode with the KV cache (Coconut.generate).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from data import END_LATENT, EOS, LATENT, START_LATENT, Vocab
from model import KVCache

# The variants of the paper's Table 1, which differ only in the layout of their examples
# (stage_layout), except "pause", whose <|latent|> is a learned token, fed nothing back.
METHODS = ("coconut", "cot", "no-cot", "no-thoughts", "pause", "no-curriculum")


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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")

    @property
    def markers(self):
        # the official code writes <|start-latent|> / <|end-latent|> only where thoughts may follow
        return self.method in ("coconut", "pause", "no-curriculum")

    @property
    def feedback(self):
        return self.method != "pause"

    @property
    def stages(self):
        """The stages this method trains at: CoT and No-CoT have one layout (stage 0 by name),
        no-curriculum only the last stage, the others 0 (CoT) to max_latent_stage + 1 (every step gone)."""
        last = self.max_latent_stage + 1
        return {"cot": [0], "no-cot": [0], "no-curriculum": [last]}.get(self.method, list(range(last + 1)))

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
    it); past max_latent_stage every step is gone. The variants change one thing each."""
    cur = curriculum
    if cur.method == "cot":  # stage 0 for ever: the whole chain of thought in language
        return 0, 0
    if cur.method == "no-cot":  # question straight to answer
        return n_steps, 0
    if cur.method == "no-curriculum":  # straight to the last stage
        stage = cur.max_latent_stage + 1
    n_removed = n_steps if stage > cur.max_latent_stage else min(stage, n_steps)
    c = 0 if cur.method == "no-thoughts" else cur.c  # "w/o thought": the curriculum, no thoughts
    return n_removed, min(stage, cur.max_latent_stage) * c


def build_example(tokens, curriculum, stage, rng=None, prompt_only=False, n_thoughts=None):
    """input_ids and labels of one example, from data.tokenize_record's output, in GPT-2 ids.

    Layout: question [<|start-latent|> <|latent|>*n <|end-latent|>] remaining steps "### answer" eos.
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
        prompt += [START_LATENT] + [LATENT] * n_latent + [END_LATENT]
    if prompt_only:
        return {"input_ids": prompt, "labels": [-100] * len(prompt)}
    target = [t for step in tokens["steps"][n_removed:] for t in step] + list(tokens["answer"])
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def collate(examples, for_generation=False, device="cpu", vocab=None, pad_to=None):
    """Pad a list of examples into tensors of the model's token ids (vocab maps them from GPT-2's):
    input_ids, labels, attention_mask, position_ids.

    Training (the official layout): left-pad each row so that every row's first <|latent|> sits in
    the same column, then right-pad to the longest row. Generation: left-pad every prompt to the
    same length, so that all rows continue from the last column.
    Position ids restart at 0 after the left pads; pads are eos with attention 0 and label -100
    (a generation batch has no labels, so that it can be passed as Coconut.generate(**batch)).
    pad_to: round the first <|latent|> column (or the prompt length) and the length up to a multiple
    of it; by default 64 on a GPU, whose attention kernels are planned per shape, so that a run sees
    a handful of shapes instead of one per batch; 1 elsewhere, where padding only costs.
    """
    vocab = vocab or Vocab()
    pad_to = pad_to or (64 if torch.device(device).type == "cuda" else 1)
    if for_generation:
        longest = max(len(e["input_ids"]) for e in examples)
        longest += -longest % pad_to
        left = [longest - len(e["input_ids"]) for e in examples]
    else:
        firsts = [e["input_ids"].index(LATENT) if LATENT in e["input_ids"] else None for e in examples]
        align = max((f for f in firsts if f is not None), default=0)
        left = [(-align % pad_to) + (0 if f is None else align - f) for f in firsts]
    T = max(pad + len(e["input_ids"]) for pad, e in zip(left, examples))
    T += -T % pad_to
    B = len(examples)
    batch = {"input_ids": torch.full((B, T), vocab.to_model([EOS])[0], dtype=torch.long),
             "labels": torch.full((B, T), -100, dtype=torch.long),
             "attention_mask": torch.zeros((B, T), dtype=torch.long),
             "position_ids": torch.zeros((B, T), dtype=torch.long)}
    for i, (pad, e) in enumerate(zip(left, examples)):
        n = len(e["input_ids"])
        batch["input_ids"][i, pad:pad + n] = torch.tensor(vocab.to_model(e["input_ids"]))
        if "labels" in e:  # prompts for generation may come without
            batch["labels"][i, pad:pad + n] = torch.tensor([t if t < 0 else vocab.to_model([t])[0]
                                                            for t in e["labels"]])
        batch["attention_mask"][i, pad:pad + n] = 1
        batch["position_ids"][i, pad:pad + n] = torch.arange(n)
    if for_generation:
        del batch["labels"]
    return {k: v.to(device) for k, v in batch.items()}


def forward_passes(n_thoughts, n_answer_tokens, feedback=True):
    """The forward passes one question takes at batch size 1, as the paper counts them: the prompt,
    one more per thought fed back (each needs the hidden state of the pass before), then one per
    answer token, whose pass gives the next token (the last gives the end of text)."""
    return 1 + n_thoughts * feedback + n_answer_tokens


class Coconut(nn.Module):
    """A GPT from model.py that thinks in continuous thoughts at its <|latent|> positions.
    latent_id and eos_id: the ids of <|latent|> and <|endoftext|> in the GPT's vocabulary.
    feedback=False keeps <|latent|> an ordinary learned token: the paper's "pause as thought"."""

    def __init__(self, gpt, latent_id=LATENT, eos_id=EOS, feedback=True):
        super().__init__()
        self.gpt, self.latent_id, self.eos_id, self.feedback = gpt, latent_id, eos_id, feedback

    def think(self, input_ids, attention_mask, position_ids, cache=None, intervene=None):
        """Final hidden states (B, T, C) of every position, each <|latent|> position fed the
        hidden state of the position before it. intervene(k, thoughts), if given, returns the (B, C)
        vectors written in instead of the k-th column of thoughts (analyze.py's ablations).

        The columns are cut into segments that each start at a column where some row has a
        <|latent|>; so when a segment runs, the thought it needs (the last hidden state of the
        previous segment) exists. With the official layout (every row's thoughts in the same
        columns) that is exactly its schedule: the prefix, then one pass per thought, then the rest.
        """
        cache = KVCache() if cache is None else cache
        T = input_ids.size(1)
        is_latent = (input_ids == self.latent_id) & self.feedback
        latent_cols = is_latent.any(dim=0).nonzero().flatten().tolist()
        if latent_cols and latent_cols[0] == 0:
            raise ValueError("a <|latent|> in the first column has no hidden state to take")
        bounds = [0] + latent_cols + [T]
        # embed once: one lookup per segment would give the (vocab x C) embedding one dense gradient each
        token_embeds = self.gpt.transformer.wte(input_ids)
        hidden = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:  # a <|latent|> in the last column: its segment is empty
                continue
            x = token_embeds[:, a:b]
            if hidden:  # write the thought in, for the rows that think in column a
                thought = hidden[-1][:, -1]
                if intervene is not None:
                    thought = intervene(len(hidden) - 1, thought)
                first = torch.where(is_latent[:, a, None], thought, x[:, 0])
                x = torch.cat([first[:, None], x[:, 1:]], dim=1)
            hidden.append(self.gpt.hidden(embeds=x, position_ids=position_ids[:, a:b],
                                          attention_mask=attention_mask[:, a:b], cache=cache))
        return torch.cat(hidden, dim=1)

    def forward(self, input_ids, labels, attention_mask, position_ids):
        """Mean cross-entropy over the labels that are not -100 (labels aligned with input_ids and
        shifted here, as the official code does)."""
        hidden = self.think(input_ids, attention_mask, position_ids)
        targets = labels[:, 1:]
        supervised = targets != -100
        # the output layer only where there is a label: on a CPU, most of the time saved
        logits = self.gpt.lm_head(hidden[:, :-1][supervised])
        return F.cross_entropy(logits.float(), targets[supervised])

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, position_ids, max_new_tokens, intervene=None):
        """Greedy answers to a left-padded batch of prompts (question, then any markers and
        <|latent|> slots): runs the thoughts, then decodes with the KV cache, each row stopping at
        its own eos. Returns per row the list of new token ids (prompt and eos excluded)."""
        B = input_ids.size(0)
        cache = KVCache()
        hidden = self.think(input_ids, attention_mask, position_ids, cache, intervene)
        next_position = position_ids[:, -1] + 1
        # decode until every row has its eos, or the longest row fills the context; on a GPU, asking
        # whether all rows are done makes the CPU wait, so it asks every 8 tokens (rows that are done
        # only add eos, cut below)
        n_steps = min(max_new_tokens, self.gpt.config.block_size - int(next_position.max()) + 1)
        check_every = 8 if input_ids.is_cuda else 1
        logits = self.gpt.lm_head(hidden[:, -1])
        new_tokens = []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(n_steps):
            token = torch.where(done, self.eos_id, logits.argmax(dim=-1))
            new_tokens.append(token)
            done |= token == self.eos_id
            if step == n_steps - 1 or (step + 1) % check_every == 0 and done.all():
                break
            h = self.gpt.hidden(token[:, None], position_ids=next_position[:, None], cache=cache)
            logits = self.gpt.lm_head(h[:, -1])
            next_position = next_position + 1
        rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(B)]
        return [row[:row.index(self.eos_id)] if self.eos_id in row else row for row in rows]
