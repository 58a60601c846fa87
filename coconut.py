"""
Chain of Continuous Thought (Coconut; Hao et al., 2024, arXiv 2412.06769), on top of model.py.

Flow of the repository: data -> model -> coconut -> checkpoint -> train -> sample -> analyze.

The method in three parts, in the order a reader needs them:
1. the curriculum: which stage each epoch trains (Curriculum.schedule); at stage k the first k
   reasoning steps of an example are replaced by k*c <|latent|> slots between <|start-latent|>
   and <|end-latent|>, and the loss ignores question, markers and slots (stage_layout,
   build_example, collate; Vocab maps GPT-2 ids to a smaller model vocabulary);
2. the forward: each <|latent|> slot takes as its input embedding the last hidden state (after
   ln_f) of the position just before it, a "continuous thought"; since that state only exists once
   the prefix has been run, n thoughts take n+1 passes, each reusing the KV cache of the prefix,
   and the loss back-propagates through every thought (Coconut.forward);
3. batched greedy generation: run the thoughts, then decode with the KV cache (Coconut.generate),
   and the probability of a given continuation (Coconut.score, how analyze.py reads a thought).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from data import END_LATENT, EOS, LATENT, N_VOCAB, START_LATENT
from model import KVCache

# The variants of the paper's Table 1. All share one code path; they differ in the layout of the
# examples (stage_layout) and, for "pause", in whether thoughts are fed back (Curriculum.feedback).
METHODS = ("coconut", "cot", "no-cot", "no-thoughts", "pause", "no-curriculum")


@dataclass
class Curriculum:
    """Everything that depends on the stage: which stage each epoch trains (schedule), and the
    layout of an example at a stage (stage_layout, build_example)."""
    method: str = "coconut"
    c: int = 1  # thoughts per replaced reasoning step ("c" in the paper)
    max_latent_stage: int = 6  # past this stage every step is gone and the thoughts stop growing
    epochs_per_stage: int = 5
    uniform_prob: float = 0.0  # chance that a training example gets a random stage (the paper's analysis model)
    pad_latent_to_max: bool = True  # past it, always max_latent_stage*c thoughts (the official default)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")

    @property
    def markers(self):
        # the official code writes <|start-latent|> / <|end-latent|> only where thoughts may follow
        return self.method in ("coconut", "pause", "no-curriculum")

    @property
    def feedback(self):
        # "pause as thought": <|latent|> stays an ordinary learned token, nothing is fed back
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
                raise ValueError(f"--stage {stage}: {self.method} trains at stage{'s' * (len(self.stages) > 1)} {have}")
            return [stage] * self.epochs_per_stage
        return [self.stages[min(e // self.epochs_per_stage, len(self.stages) - 1)] for e in range(epochs)]


def stage_layout(curriculum, stage, n_steps):
    """(steps removed, thoughts) for an example with n_steps reasoning steps at a stage.

    The one place the layout of a stage is decided, for training and evaluation alike.
    """
    cur = curriculum
    if cur.method == "cot":  # stage 0 for ever: the whole chain of thought in language
        return 0, 0
    if cur.method == "no-cot":  # question straight to answer
        return n_steps, 0
    if cur.method == "no-curriculum":  # straight to the last stage
        stage = cur.max_latent_stage + 1
    if stage > cur.max_latent_stage:
        n_removed = n_steps
        k = cur.max_latent_stage if cur.pad_latent_to_max else min(n_steps, cur.max_latent_stage)
    else:
        # an example with fewer than `stage` steps loses them all; with pad_latent_to_max it still
        # gets stage*c thoughts (as the official code trains it), without it one per removed step
        # (the official code does that only at evaluation: we use one rule for both)
        n_removed = min(stage, n_steps)
        k = stage if cur.pad_latent_to_max else n_removed
    c = 0 if cur.method == "no-thoughts" else cur.c  # "w/o thought": the curriculum, no thoughts
    return n_removed, k * c


def build_example(tokens, curriculum, stage, rng=None, prompt_only=False, n_thoughts=None):
    """input_ids and labels of one example, from data.tokenize_record's output.

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


def collate(examples, for_generation=False, device="cpu"):
    """Pad a list of examples into tensors on a device: input_ids, labels, attention_mask, position_ids.

    Training (the official layout): left-pad each row so that every row's first <|latent|> sits in
    the same column, then right-pad to the longest row. Generation: left-pad every prompt to the
    same length, so that all rows continue from the last column.
    Position ids restart at 0 after the left pads; pads are eos with attention 0 and label -100
    (a generation batch has no labels, so that it can be passed as Coconut.generate(**batch)).
    """
    if for_generation:
        longest = max(len(e["input_ids"]) for e in examples)
        left = [longest - len(e["input_ids"]) for e in examples]
    else:
        firsts = [e["input_ids"].index(LATENT) if LATENT in e["input_ids"] else None for e in examples]
        align = max((f for f in firsts if f is not None), default=0)
        left = [0 if f is None else align - f for f in firsts]
    T = max(pad + len(e["input_ids"]) for pad, e in zip(left, examples))
    B = len(examples)
    batch = {"input_ids": torch.full((B, T), EOS, dtype=torch.long),
             "labels": torch.full((B, T), -100, dtype=torch.long),
             "attention_mask": torch.zeros((B, T), dtype=torch.long),
             "position_ids": torch.zeros((B, T), dtype=torch.long)}
    for i, (pad, e) in enumerate(zip(left, examples)):
        n = len(e["input_ids"])
        batch["input_ids"][i, pad:pad + n] = torch.tensor(e["input_ids"])
        if "labels" in e:  # prompts for generation may come without
            batch["labels"][i, pad:pad + n] = torch.tensor(e["labels"])
        batch["attention_mask"][i, pad:pad + n] = 1
        batch["position_ids"][i, pad:pad + n] = torch.arange(n)
    if for_generation:
        del batch["labels"]
    return {k: v.to(device) for k, v in batch.items()}


class Vocab:
    """The GPT-2 token ids a model knows: all of them, or, for a model trained from scratch with
    --vocab data, only those its data files use. On a CPU the output layer over GPT-2's 50k tokens
    costs more than a whole small transformer; a vocabulary of a few hundred tokens makes training
    about three times faster. Batches speak GPT-2 ids everywhere; Coconut maps them to its own
    ids on the way in (table) and its answers back on the way out (ids)."""

    def __init__(self, ids=None):
        self.ids = ids  # the GPT-2 id of each model id, or None: the identity over all N_VOCAB
        self.size = N_VOCAB if ids is None else len(ids)
        self.table = torch.arange(N_VOCAB) if ids is None else torch.full((N_VOCAB,), -1)
        if ids is not None:
            self.table[torch.tensor(ids)] = torch.arange(len(ids))

    @classmethod
    def of(cls, tokens):
        """The vocabulary of tokenized records (data.tokenize_record's output), markers included."""
        used = {x for t in tokens for x in t["question"] + sum(t["steps"], []) + t["answer"]}
        return cls(sorted(used | {EOS, START_LATENT, END_LATENT, LATENT}))

    def to_gpt2(self, ids):
        return list(ids) if self.ids is None else [self.ids[i] for i in ids]


class Coconut(nn.Module):
    """A GPT from model.py that thinks in continuous thoughts at its <|latent|> positions. It takes
    and returns GPT-2 token ids, whatever the GPT's own vocabulary (vocab)."""

    def __init__(self, gpt, vocab=None, feedback=True):
        super().__init__()
        self.gpt = gpt
        self.vocab = vocab or Vocab()
        device = gpt.lm_head.weight.device
        self.register_buffer("model_id", self.vocab.table.to(device), persistent=False)  # GPT-2 id -> model id
        # the markers <|start-latent|> / <|end-latent|> are ordinary tokens here: only the
        # curriculum places them, so only the slot and end-of-text ids matter to the model
        self.latent_id, self.eos_id = int(self.vocab.table[LATENT]), int(self.vocab.table[EOS])
        # feedback=False keeps <|latent|> as an ordinary learned token: the paper's "pause as thought"
        self.feedback = feedback

    def thought_slots(self, input_ids):
        """(B, T) True where a thought is fed back: the <|latent|> positions, none for "pause"."""
        return (input_ids == self.latent_id) & self.feedback

    def think(self, input_ids, attention_mask, position_ids, cache):
        """Final hidden states (B, T, C) of every position, each <|latent|> position fed the
        hidden state of the position before it; also the number of passes run.

        The columns are cut into segments that each start at a column where some row has a
        <|latent|>; so when a segment runs, the thought it needs (the last hidden state of the
        previous segment) exists. With the official layout (every row's thoughts in the same
        columns) that is exactly its schedule: the prefix, then one pass per thought, then the rest.
        """
        B, T = input_ids.shape
        is_latent = self.thought_slots(input_ids)
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
                first = torch.where(is_latent[:, a, None], thought, x[:, 0])
                x = torch.cat([first[:, None], x[:, 1:]], dim=1)
            hidden.append(self.gpt.hidden(embeds=x, position_ids=position_ids[:, a:b],
                                          attention_mask=attention_mask[:, a:b], cache=cache))
        return torch.cat(hidden, dim=1), len(hidden)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, return_logits=True):
        """(loss, logits): mean cross-entropy over the labels that are not -100, labels aligned with
        input_ids and shifted here (as the official code does); logits (B, T, vocab) at every
        position, or None with return_logits=False (training: the output layer then runs only
        where there is a label, which on a CPU is most of the time saved)."""
        hidden, logits, targets, _ = self.supervised_logits(input_ids, labels, attention_mask, position_ids)
        loss = F.cross_entropy(logits.float(), targets)
        return loss, (self.gpt.lm_head(hidden) if return_logits else None)

    @torch.no_grad()
    def score(self, input_ids, labels, attention_mask=None, position_ids=None):
        """Per row, the log-probability of its labelled tokens, each given all that comes before it
        (thoughts included): how likely the model finds a continuation."""
        _, logits, targets, rows = self.supervised_logits(input_ids, labels, attention_mask, position_ids)
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
        return torch.zeros(input_ids.size(0), device=logp.device).index_add_(0, rows, logp)

    def supervised_logits(self, input_ids, labels, attention_mask=None, position_ids=None):
        """The final hidden states (B, T, C), and the logits, targets and row of every position
        whose next token has a label: the part of the forward that the loss and score share."""
        B, T = input_ids.shape
        input_ids = self.model_id[input_ids]
        labels = torch.where(labels < 0, labels, self.model_id[labels.clamp(min=0)])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        hidden, _ = self.think(input_ids, attention_mask, position_ids, KVCache())
        targets = labels[:, 1:]
        supervised = targets != -100
        rows = supervised.nonzero()[:, 0]
        return hidden, self.gpt.lm_head(hidden[:, :-1][supervised]), targets[supervised], rows

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, position_ids=None, max_new_tokens=128,
                 return_thoughts=False):
        """Greedy answers to a left-padded batch of prompts (question, then any markers and
        <|latent|> slots): runs the thoughts, then decodes with the KV cache, each row stopping at
        its own eos. Returns per row the list of new token ids (prompt and eos excluded); with
        return_thoughts also, per row, its thoughts as a (n_thoughts, C) tensor, and the number
        of forward passes run (thought passes plus one per decoded token, as the paper counts)."""
        B, T = input_ids.shape
        input_ids = self.model_id[input_ids]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = KVCache()
        hidden, n_passes = self.think(input_ids, attention_mask, position_ids, cache)
        next_position = position_ids[:, -1] + 1
        logits = self.gpt.lm_head(hidden[:, -1])
        new_tokens = []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            token = torch.where(done, self.eos_id, logits.argmax(dim=-1))
            new_tokens.append(token)
            done |= token == self.eos_id
            if done.all() or int(next_position.max()) >= self.gpt.config.block_size:
                break
            h = self.gpt.hidden(token[:, None], position_ids=next_position[:, None], cache=cache)
            logits = self.gpt.lm_head(h[:, -1])
            next_position = next_position + 1
            n_passes += 1
        rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(B)]
        answers = [self.vocab.to_gpt2(row[:row.index(self.eos_id)] if self.eos_id in row else row)
                   for row in rows]
        if not return_thoughts:
            return answers
        # a thought is the hidden state of the position before its <|latent|> slot
        slots = self.thought_slots(input_ids)
        thoughts = [hidden[i, slots[i].nonzero().flatten() - 1] for i in range(B)]
        return answers, thoughts, n_passes
