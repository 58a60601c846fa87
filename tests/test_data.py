"""
Tests of data.py's datasets: the ProsQA and ProntoQA generators, the GSM8k reader, the token
layout, grading, and the handling of bad input. Every check compares against a reference built
here (a BFS, a tiny forward-chaining reasoner, hand-computed token ids, the statistics of the
official release, measured on its test file), never against the code's own output.

Run: python -m pytest -q tests/test_data.py   (about 15 s on two cores, no network)
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import deque

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prosqa():
    return data.generate_prosqa(2000, seed=1)


# -----------------------------------------------------------------------------
# ProsQA

def sentences(text):
    return re.split(r"(?<=[.?]) ", text)


def bfs_dist(n, edges, source):
    children = [[] for _ in range(n)]
    for u, v in edges:
        children[u].append(v)
    dist, queue = {source: 0}, deque([source])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def check_prosqa_record(r, min_steps=3, max_steps=6, max_nodes=28, names="paper"):
    person_names, concept_names = data.NAMES[names]
    names, edges = r["idx_to_symbol"], [tuple(e) for e in r["edges"]]
    n = len(names)
    assert n <= max_nodes and len(set(names)) == n, "names must be distinct"
    assert len(set(edges)) == len(edges) and all(0 <= u < v < n for u, v in edges)
    touched = {u for u, _ in edges} | {v for _, v in edges}
    assert touched == set(range(n)), "no isolated nodes"
    has_parent = {v for _, v in edges}
    persons = [i for i in range(n) if i not in has_parent]
    assert all(names[i] in person_names for i in persons)
    assert all(names[i] in concept_names for i in range(n) if i in has_parent)
    root, target, neg = r["root"], r["target"], r["neg_target"]
    assert root in persons
    dist = bfs_dist(n, edges, root)
    assert target in dist and neg not in dist
    assert min_steps <= dist[target] <= max_steps

    def sentence(u, v):
        return f"{names[u]} is a {names[v]}." if u in persons else f"Every {names[u]} is a {names[v]}."

    # sentences match edges one to one, then the question
    tail = re.fullmatch(r"(.*) Is (\w+) a (\w+) or (\w+)\?", r["question"])
    assert tail and tail.group(2) == names[root]
    assert {tail.group(3), tail.group(4)} == {names[target], names[neg]}
    assert sorted(sentences(tail.group(1))) == sorted(sentence(u, v) for u, v in edges)
    # steps: a path of existing edges from the root to the target, as short as BFS says
    assert len(r["steps"]) == dist[target]
    node = root
    by_sentence = {sentence(u, v): (u, v) for u, v in edges}
    for s in r["steps"]:
        u, v = by_sentence[s]
        assert u == node
        node = v
    assert node == target
    assert r["answer"] == f"{names[root]} is a {names[target]}."
    return len(persons)


def test_prosqa_invariants(prosqa):
    for r in prosqa:
        check_prosqa_record(r)


def test_prosqa_target_first_about_half_the_time(prosqa):
    first = sum(r["question"].endswith(f"a {r['idx_to_symbol'][r['target']]} or "
                                       f"{r['idx_to_symbol'][r['neg_target']]}?") for r in prosqa)
    assert 0.45 < first / len(prosqa) < 0.55


def test_prosqa_size_knob():
    records = data.generate_prosqa(300, seed=0, max_nodes=12, min_steps=2, max_steps=4)
    for r in records:
        check_prosqa_record(r, min_steps=2, max_steps=4, max_nodes=12)
    assert {len(r["steps"]) for r in records} == {2, 3, 4}  # the whole range is reached
    with pytest.raises(ValueError):
        data.generate_prosqa(1, seed=0, min_steps=4, max_steps=3)


def test_prosqa_facts_are_shuffled(prosqa):
    """The facts of a question come in random order, not in the order the graph was grown (edges
    by child, parents in order): an order that follows the graph would be a shortcut to the path."""
    grown = 0
    for r in prosqa:
        names, persons = r["idx_to_symbol"], {u for u, _ in r["edges"]} - {v for _, v in r["edges"]}
        facts = [f"{names[u]} is a {names[v]}." if u in persons else f"Every {names[u]} is a {names[v]}."
                 for u, v in r["edges"]]  # the order the generator grew them in
        grown += r["question"].startswith(" ".join(facts[:3]))
    assert grown / len(prosqa) < 0.01


def branching_at(r, k):
    """Whether the nodes k steps from the root are two or more."""
    return sum(1 for d in bfs_dist(len(r["idx_to_symbol"]), r["edges"], r["root"]).values() if d == k) >= 2


def test_prosqa_settings_beyond_the_paper():
    """--names short, --other-option same-depth, --min-root-children: each does what it says, and
    the records stay valid ProsQA records."""
    settings = dict(max_nodes=14, min_steps=3, max_steps=3, names="short", other_option="same-depth",
                    min_root_children=2)
    records = data.generate_prosqa(300, seed=0, **settings)
    for r in records:
        check_prosqa_record(r, min_steps=3, max_steps=3, max_nodes=14, names="short")
        assert all(len(data.encode(" " + name)) == 1 for name in r["idx_to_symbol"])  # one token per name
        n, edges = len(r["idx_to_symbol"]), r["edges"]
        assert sum(u == r["root"] for u, _ in edges) >= 2
        # both options are as many facts from the nearest person
        persons = {u for u, _ in edges} - {v for _, v in edges}
        nearest = lambda node: min(bfs_dist(n, edges, p).get(node, 99) for p in persons)  # noqa: E731
        assert nearest(r["neg_target"]) == nearest(r["target"]) == len(r["steps"])
    assert data.generate_prosqa(300, seed=0, **settings) == records  # deterministic


def test_statistics_of_the_settings_beyond_the_paper():
    """On small graphs (7 nodes, 2-3 steps) the paper's rule draws the other option one fact from
    another person in most questions (one lookup then tells the options apart, no search);
    --other-option same-depth never does; --min-root-children 2 makes every root branch; and on
    14-node graphs of 3 steps at least 100 of 500 questions branch at their second step too."""
    small = dict(max_nodes=7, min_steps=2, max_steps=3)
    one_fact = lambda r: any(v == r["neg_target"] and not any(w == u for _, w in r["edges"])  # noqa: E731
                             for u, v in r["edges"])  # a fact "<person> is a <other option>."
    paper = data.generate_prosqa(500, seed=0, **small)
    assert sum(map(one_fact, paper)) > 350
    deep = data.generate_prosqa(500, seed=0, **small, other_option="same-depth", names="short")
    assert sum(map(one_fact, deep)) == 0
    branching = data.generate_prosqa(500, seed=0, **small, min_root_children=2)
    assert all(branching_at(r, 1) for r in branching) and sum(branching_at(r, 1) for r in paper) < 350
    big = data.generate_prosqa(500, seed=0, max_nodes=14, min_steps=3, max_steps=3, other_option="same-depth",
                               min_root_children=2, names="short")
    assert sum(branching_at(r, 2) for r in big) >= 100
    tokens = lambda records: sum(len(data.encode(r["question"])) for r in records) / len(records)  # noqa: E731
    assert tokens(data.generate_prosqa(200, seed=0, **small, names="short")) < 0.75 * tokens(paper[:200])


def test_fresh_records_are_new_and_held_out(tmp_path):
    """--fresh-data: an epoch's questions come from the folder's own generator settings, differ
    from epoch to epoch, repeat for the same epoch, and are never a validation or test question."""
    paths = data.make_splits("prosqa", str(tmp_path), seed=3, sizes=dict(train=40, valid=10, test=10),
                             max_nodes=8, min_steps=2, max_steps=3, names="short")
    held = {r["question"] for s in ("valid", "test") for r in data.load_records(paths[s])}
    one, two = data.fresh_records(str(tmp_path), 1, held), data.fresh_records(str(tmp_path), 2, held)
    assert len(one) == len(two) == 40 and one == data.fresh_records(str(tmp_path), 1, held)
    assert {r["question"] for r in one}.isdisjoint({r["question"] for r in two} | held)
    for r in one + two:
        check_prosqa_record(r, min_steps=2, max_steps=3, max_nodes=8, names="short")
    exclude = {r["question"] for r in one[:5]}  # held-out questions are left out
    assert {r["question"] for r in data.fresh_records(str(tmp_path), 1, exclude)}.isdisjoint(exclude)


def test_prosqa_statistics_near_the_release():
    """Our generator against the official release's test file (500 records): nodes 22.8, edges
    35.8, steps 3.78 (3 / 4 / 5 / 6 steps: 40 / 43 / 14 / 2.4%), question 357 tokens. Judged over
    six seeds, so that no one draw of the random stream decides: each release figure must lie
    within 4 standard errors of the difference between a 500-record file and our records (the
    spread per record measured on ours). Persons are a known gap (2.6 in the release, 2.8 here:
    NOTES.md), held to within 0.3."""
    records = [r for seed in range(6) for r in data.generate_prosqa(500, seed)]

    def near(values, release):
        mean, variance = statistics.fmean(values), statistics.pvariance(values)
        assert abs(mean - release) < 4 * math.sqrt(variance / 500 + variance / len(values)), (mean, release)
    near([len(r["idx_to_symbol"]) for r in records], 22.8)
    near([len(r["edges"]) for r in records], 35.8)
    steps = [len(r["steps"]) for r in records]
    near(steps, 3.78)
    for k, share in {3: 0.40, 4: 0.43, 5: 0.14, 6: 0.024}.items():
        near([n == k for n in steps], share)
    near([len(data.encode(r["question"])) for r in records[::5]], 357)
    persons = [len({u for u, _ in r["edges"]} - {v for _, v in r["edges"]}) for r in records]
    assert abs(statistics.fmean(persons) - 2.6) < 0.3


# -----------------------------------------------------------------------------
# ProntoQA

CONCEPT = r"[a-z]+pus"


def parse_rule(sentence):
    """(subject concept, object, negated) of a universal rule, in any of its surface forms."""
    m = re.fullmatch(rf"(?:Every|Each) ({CONCEPT}) is (not )?(?:an? )?(\w+)\.", sentence)
    if m:
        return m.group(1), m.group(3), bool(m.group(2))
    m = re.fullmatch(r"([A-Z][a-z]*pus)es are (not )?(\w+)\.", sentence)
    assert m, sentence
    obj = m.group(3)[:-2] if m.group(3).endswith("puses") else m.group(3)
    return m.group(1).lower(), obj, bool(m.group(2))


def reason(question):
    """A tiny forward-chaining reasoner: the context's answer to the query, from scratch."""
    *context, query = sentences(question)
    entity_facts = [s for s in context if s.split()[0] in data.ENTITIES]
    rules = [parse_rule(s) for s in context if s.split()[0] not in data.ENTITIES]
    assert len(context) == 25 and len(entity_facts) == 2 and context[-2:] == entity_facts
    is_a = {}
    props = {}
    for subj, obj, neg in rules:
        if obj.endswith("pus"):
            assert not neg
            is_a.setdefault(subj, []).append(obj)
        else:
            props.setdefault(subj, []).append((obj, not neg))
    classes = {re.fullmatch(rf"\w+ is an? ({CONCEPT})\.", s).group(1) for s in entity_facts}
    frontier = list(classes)
    while frontier:
        for parent in is_a.get(frontier.pop(), []):
            if parent not in classes:
                classes.add(parent)
                frontier.append(parent)
    known = {p for c in classes for p in props.get(c, [])}
    assert not any((adj, not value) in known for adj, value in known), "a contradiction"
    m = re.fullmatch(r"True or false: (\w+) is (not )?(\w+)\.", query)
    assert m
    return "True" if (m.group(3), not m.group(2)) in known else "False"


def test_prontoqa_structure_and_answers():
    records = data.generate_prontoqa(300, seed=0)
    for r in records:
        assert len(r["steps"]) == 6 and r["answer"] in ("True", "False")
        assert reason(r["question"]) == r["answer"]
        proof = [s + "." for step in r["steps"] for s in step[:-1].split(". ")]
        assert len(proof) == 11
        entity = proof[0].split()[0]
        context = sentences(r["question"])[:-1]
        for rule in proof[1:10:2]:  # the rules the proof uses, worded exactly as in the context
            assert rule in context
        assert all(s.startswith(entity + " is ") for s in proof[0::2])
        # the conclusion is the query, or its negation when the answer is False
        query = r["question"].split("True or false: ")[1]
        negation = query.replace(" is not ", " is ") if " is not " in query else query.replace(" is ", " is not ")
        assert (proof[10] == query) == (r["answer"] == "True")
        assert (proof[10] == negation) == (r["answer"] == "False")
    share = sum(r["answer"] == "True" for r in records) / len(records)
    assert 0.4 < share < 0.6


def test_prontoqa_distractor_rule_contradicts_the_conclusion():
    """The unused concept carries the conclusion's property with the opposite polarity: a model
    that matches the property word alone, ignoring the chain, is misled half the time."""
    for r in data.generate_prontoqa(200, seed=4):
        *context, _ = sentences(r["question"])
        rules = [parse_rule(s) for s in context if s.split()[0] not in data.ENTITIES]
        conclusion = r["steps"][-1]  # "Stella is (not) floral."
        adjective, negated = conclusion.split()[-1][:-1], " not " in conclusion
        owners = {subj for subj, _, _ in rules} | {obj for _, obj, _ in rules if obj.endswith("pus")}
        mentions = {c: sum(c in (subj, obj) for subj, obj, _ in rules) for c in owners}
        about = [(subj, neg) for subj, obj, neg in rules if obj == adjective]
        assert len(about) == 2  # the proof's rule and the distractor
        distractor = [(subj, neg) for subj, neg in about if mentions[subj] == 1]
        assert len(distractor) == 1 and distractor[0][1] != negated


def test_prontoqa_example_form():
    # the layout of the release's first test record, checked sentence by sentence on a generated one
    r = data.generate_prontoqa(1, seed=5)[0]
    e = r["question"].split("True or false: ")[1].split()[0]
    for step in r["steps"][:5]:  # "Stella is a zumpus. Zumpuses are gorpuses." and so on
        fact, rule = sentences(step)
        assert re.fullmatch(rf"{e} is an? {CONCEPT}\.", fact)
        assert parse_rule(rule)[0] == fact.split()[-1][:-1]
    assert parse_rule(sentences(r["steps"][4])[1])[1][-3:] != "pus"  # c1's property rule
    assert re.fullmatch(rf"{e} is (not )?[a-z]+\.", r["steps"][5])
    assert re.fullmatch(rf".* True or false: {e} is (not )?[a-z]+\.", r["question"])
    assert len(data.encode(r["question"] + "\n")) in range(180, 232)  # the original generator: 188 to 223


# -----------------------------------------------------------------------------
# GSM8k

GSM_LINES = [
    "Tom has 3 bags of 2 apples and eats 1. How many are left?||<<3*2=6>> <<6-1=5>> #### 5",
    "How old is Ann?|| #### 26",
    "A car costs  $2,000 and a radio $125. Total?||<<2000+125=2125>> #### 2,125",
    "Sam owes 8 and has 5. Balance?||<<5-8=-3>> #### -3",
]
GSM_RECORDS = [
    {"question": "Tom has 3 bags of 2 apples and eats 1. How many are left?",
     "steps": ["<<3*2=6>>", "<<6-1=5>>"], "answer": "5"},
    {"question": "How old is Ann?", "steps": [""], "answer": "26"},
    {"question": "A car costs  $2,000 and a radio $125. Total?", "steps": ["<<2000+125=2125>>"],
     "answer": "2,125"},
    {"question": "Sam owes 8 and has 5. Balance?", "steps": ["<<5-8=-3>>"], "answer": "-3"},
]


def test_gsm8k_text_format(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("\n".join(GSM_LINES) + "\n", encoding="utf-8")
    assert data.read_gsm8k(str(path)) == GSM_RECORDS
    for i, r in enumerate(GSM_RECORDS):
        data.tokenize_record(r, i, str(path))  # the official layout holds, empty chain included
    assert data.grade("### 2125", "2,125") and data.grade("### -3", "-3")


def test_gsm8k_json_loads_unchanged(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps(GSM_RECORDS, indent=1), encoding="utf-8")
    assert data.read_gsm8k(str(path)) == GSM_RECORDS


def test_gsm8k_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text(GSM_LINES[0] + "\nno separator here #### 3\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"bad\.txt: line 2"):
        data.read_gsm8k(str(path))


def test_cli_converts_gsm8k(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("\n".join(GSM_LINES), encoding="utf-8")
    subprocess.run([sys.executable, "data.py", "--dataset", "gsm8k", "--from", str(src),
                    "--out", str(tmp_path / "out")], cwd=REPO, check=True, capture_output=True)
    with open(tmp_path / "out" / "train.json", encoding="utf-8") as f:
        assert json.load(f) == GSM_RECORDS


# -----------------------------------------------------------------------------
# Token layout and grading

def test_tokenize_record_hand_computed_ids():
    # GPT-2 ids: "hello" 31373, " world" 995, "\n" 198, "###" 21017, " 5" 642, eos 50256
    r = {"question": "hello world", "steps": ["hello world", ""], "answer": "5"}
    t = data.tokenize_record(r)
    assert t["question"] == [31373, 995, 198]
    assert t["steps"] == [[31373, 995, 198], [198]]
    assert t["answer"] == [21017, 642, 50256]


def test_tokenize_record_checks_every_record():
    # "a\n" + "\n" ends in "\n\n", one token (628) alone but two (198, 198) before more text
    good = {"question": "hello world", "steps": ["hi"], "answer": "5"}
    bad = {"question": "a\n", "steps": ["b"], "answer": "5"}
    data.tokenize_record(good, 0, "x.json")
    with pytest.raises(data.DataError, match=r"x\.json: record 7"):
        data.tokenize_record(bad, 7, "x.json")


def test_grade():
    assert data.grade("Every x is a y.\n### Tom is a y.", "Tom is a y.")
    assert data.grade("# 1 ### 2,125 ", "2125")
    assert not data.grade("### Tom is a z.", "Tom is a y.")
    assert not data.grade("### 5 # 6", "5")  # the text after the LAST '#' counts
    assert not data.grade("no marker at all 5", "5")


# -----------------------------------------------------------------------------
# Bad input, files, determinism

GOOD = {"question": "q", "steps": ["s"], "answer": "a"}


@pytest.mark.parametrize("record, words", [
    ({"steps": ["s"], "answer": "a"}, "question"),
    ({"question": "q", "answer": "a"}, "steps"),
    ({"question": "q", "steps": ["s"]}, "answer"),
    ({"question": "q", "steps": ["s", 3], "answer": "a"}, "steps"),
    ({"question": "q", "steps": "s", "answer": "a"}, "steps"),
    ({"question": 1, "steps": ["s"], "answer": "a"}, "question"),
    ({"question": "q", "steps": ["s"], "answer": 5}, "answer"),
    ({"question": "q", "steps": ["s"], "answer": "#5"}, "#"),
    ("just a string", "object"),
])
def test_load_records_bad_record(tmp_path, record, words):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, GOOD, record]), encoding="utf-8")
    with pytest.raises(data.DataError, match=rf"d\.json: record 2: .*{re.escape(words)}"):
        data.load_records(str(path))


@pytest.mark.parametrize("text", [None, "[{\"question\": ", "{\"question\": \"q\"}"])
def test_load_records_bad_file(tmp_path, text):
    path = tmp_path / "d.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(data.DataError, match=r"d\.json"):
        data.load_records(str(path))


def test_load_records_keeps_extra_keys(tmp_path):
    path = tmp_path / "d.json"
    records = [dict(GOOD, edges=[[0, 1]], root=0)]
    path.write_text(json.dumps(records), encoding="utf-8")
    assert data.load_records(str(path)) == records


def test_save_records_refuses_overwrite_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "d.json")
    data.save_records([GOOD], path)
    with pytest.raises(FileExistsError, match="overwrite"):
        data.save_records([GOOD, GOOD], path)
    # a write that fails halfway leaves the old file intact and no temporary file behind
    with pytest.raises(TypeError):
        data.save_records([GOOD, {"question": {1, 2}}], path, overwrite=True)
    assert os.listdir(tmp_path) == ["d.json"]
    assert data.load_records(path) == [GOOD]
    data.save_records([GOOD, GOOD], path, overwrite=True)
    assert data.load_records(path) == [GOOD, GOOD] and os.listdir(tmp_path) == ["d.json"]


def run_cli(*args):
    return subprocess.run([sys.executable, "data.py", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "prosqa", "--out", "{tmp}/o", "--n-train", "-3"], "--n-train: must be at least 1"),
    (["--dataset", "prosqa", "--out", "{tmp}/o", "--n-test", "0"], "--n-test: must be at least 1"),
    (["--dataset", "prosqa", "--out", "{tmp}/afile"], "afile: a file, not a folder"),
    (["--dataset", "prontoqa", "--out", "{tmp}/o", "--max-nodes", "9"], "--max-nodes does not apply"),
    (["--dataset", "gsm8k", "--from", "{tmp}/binary.txt", "--out", "{tmp}/o"], "binary.txt: not a text file"),
    (["--dataset", "gsm8k", "--from", "{tmp}/empty.txt", "--out", "{tmp}/o"], "empty.txt: holds no records"),
    (["--dataset", "gsm8k", "--from", "{tmp}/no-answer.txt", "--out", "{tmp}/o"], "no-answer.txt: line 1: empty answer"),
    (["--stats", "{tmp}/empty.json"], "empty.json: holds no records"),
    (["--stats", "{tmp}/no-names.json"], "no-names.json: record 0: no 'idx_to_symbol'"),
    (["--stats", "{tmp}/unreachable.json"], "unreachable.json: record 0: the target cannot be reached"),
    (["--stats", "{tmp}"], "a folder, not a data file"),
    (["--stats", "{tmp}/empty.json", "--seed", "3"], "--seed does not apply to --stats"),
])
def test_cli_refuses_bad_input_before_writing(tmp_path, args, expected):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)))
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "no-answer.txt").write_text("How many?|| #### \n")
    (tmp_path / "empty.json").write_text("[]")
    graph = dict(GOOD, edges=[[0, 1]], root=0, target=1, neg_target=0)
    (tmp_path / "no-names.json").write_text(json.dumps([graph]))
    (tmp_path / "unreachable.json").write_text(json.dumps([dict(graph, idx_to_symbol=["Tom", "a", "b"], target=2)]))
    before = sorted(os.listdir(tmp_path))
    p = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert p.returncode == 1 and expected in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_steps_the_wrong_way_round_are_refused_by_the_cli_and_the_library(tmp_path):
    p = run_cli("--dataset", "prosqa", "--out", str(tmp_path / "o"), "--min-steps", "4", "--max-steps", "3")
    assert p.returncode == 1 and p.stderr == "error: --min-steps 4 is more than --max-steps 3\n"
    with pytest.raises(data.DataError, match="--min-steps 4 is more than --max-steps 3"):
        data.generate_prosqa(1, 0, min_steps=4, max_steps=3)
    assert not os.path.exists(tmp_path / "o")


def test_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([GOOD, {"question": "q"}]), encoding="utf-8")
    for args in (["--stats", str(bad)], ["--stats", str(tmp_path / "missing.json")],
                 ["--dataset", "gsm8k", "--from", str(bad), "--out", str(tmp_path / "o.json")]):
        p = run_cli(*args)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    out = str(tmp_path / "splits")
    sizes = ["--n-train", "5", "--n-valid", "2", "--n-test", "2"]
    assert run_cli("--dataset", "prosqa", "--out", out, *sizes).returncode == 0
    with open(os.path.join(out, "generator.json")) as f:  # how train.py recognizes the folder
        assert json.load(f) == dict(dataset="prosqa", seed=0, sizes=dict(train=5, valid=2, test=2), max_nodes=28,
                                    min_steps=3, max_steps=6, names="paper", other_option="any", min_root_children=1,
                                    format="paper")
    p = run_cli("--dataset", "prosqa", "--out", out, *sizes)
    assert p.returncode == 1 and "--overwrite" in p.stderr and p.stderr.count("\n") == 1
    assert run_cli("--dataset", "prosqa", "--out", out, "--overwrite", *sizes).returncode == 0


def test_determinism():
    assert data.generate_prosqa(50, seed=3) == data.generate_prosqa(50, seed=3)
    assert data.generate_prosqa(50, seed=3) != data.generate_prosqa(50, seed=4)
    assert data.generate_prontoqa(50, seed=3) == data.generate_prontoqa(50, seed=3)
    assert data.generate_prontoqa(50, seed=3) != data.generate_prontoqa(50, seed=4)


def test_make_splits(tmp_path):
    sizes = dict(train=40, valid=10, test=10)
    paths = data.make_splits("prontoqa", str(tmp_path / "a"), seed=2, sizes=sizes)
    again = data.make_splits("prontoqa", str(tmp_path / "b"), seed=2, sizes=sizes)
    for split, n in sizes.items():
        with open(paths[split], "rb") as f, open(again[split], "rb") as g:
            assert f.read() == g.read()  # byte for byte
        assert len(data.load_records(paths[split])) == n
    with pytest.raises(FileExistsError):
        data.make_splits("prontoqa", str(tmp_path / "a"), seed=2, sizes=sizes)


def test_make_splits_no_duplicate_questions(tmp_path, monkeypatch):
    # a generator that repeats itself a lot: 30 distinct questions drawn at random
    def repetitive(rng, **settings):
        return {"question": f"q{rng.randrange(30)}", "steps": ["s"], "answer": "a"}
    monkeypatch.setattr(data, "prosqa_record", repetitive)
    sizes = dict(train=14, valid=5, test=5)
    paths = data.make_splits("prosqa", str(tmp_path), seed=0, sizes=sizes)
    questions = [r["question"] for p in paths.values() for r in data.load_records(p)]
    assert len(questions) == 24 and len(set(questions)) == 24
    with pytest.raises(ValueError, match="rejected or repeated"):  # 31 cannot be distinct
        data.make_splits("prosqa", str(tmp_path / "more"), seed=0, sizes=dict(train=21, valid=5, test=5))


# -----------------------------------------------------------------------------
# The compact format and the lookup task (--format compact / lookup)

RECORD = dict(question="Every fox is a owl. Tom is a fox. Tom is a cat. Every cat is a hen. Is Tom a owl or hen?",
              steps=["Tom is a fox.", "Every fox is a owl."], answer="Tom is a owl.", root=0)


def test_compact_writes_facts_as_pairs_on_a_hand_built_record():
    assert data.compact(RECORD) == dict(question="fox owl . Tom fox . Tom cat . cat hen . ? Tom owl hen",
                                        steps=[" Tom fox .", " fox owl ."], answer="Tom owl", root=0)
    lookup = data.compact(RECORD, lookup=True)
    assert lookup["steps"] == [] and lookup["question"] == "fox owl . Tom fox . Tom cat . cat hen . ? Tom owl hen"
    assert sorted(lookup["answer"].removesuffix(" .").split(" . ")) == ["Tom cat", "Tom fox", "cat hen", "fox owl"]


def test_compact_steps_spell_names_as_the_question_does():
    """A step starts a line: its names must still be the question's tokens, so that the name a
    thought stands for is one the model has read."""
    tokens = data.tokenize_record(data.compact(RECORD))
    for step in tokens["steps"]:
        assert set(step) - set(data.encode("\n")) <= set(tokens["question"]), [data.decode([t]) for t in step]


def test_compact_and_lookup_records_state_the_graph_of_the_same_seed():
    """Generated in either format, a seed gives the paper format's graphs: every fact an edge, the
    steps a shortest path, the answer root and target; the lookup answer restates every fact once.
    The compact question is under 60% of the paper's tokens (measured: 57%)."""
    settings = dict(max_nodes=7, min_steps=2, max_steps=3, names="short", other_option="same-depth")
    paper = data.generate_prosqa(200, 5, **settings)
    compact = data.generate_prosqa(200, 5, format="compact", **settings)
    lookup = data.generate_prosqa(200, 5, format="lookup", **settings)
    graph = lambda r: (r["idx_to_symbol"], r["edges"], r["root"], r["target"], r["neg_target"])  # noqa: E731
    for p, c, lk in zip(paper, compact, lookup):
        assert graph(p) == graph(c) == graph(lk) and c["question"] == lk["question"]
        names = p["idx_to_symbol"]
        facts = c["question"].split(" ? ")[0].split(" . ")
        edges = sorted(tuple(f.removesuffix(" .").split()) for f in facts)
        assert edges == sorted((names[u], names[v]) for u, v in p["edges"])
        assert c["question"].split(" ? ")[1] in (f"{names[p['root']]} {names[p['target']]} {names[p['neg_target']]}",
                                                 f"{names[p['root']]} {names[p['neg_target']]} {names[p['target']]}")
        path = [tuple(s.split()[:2]) for s in c["steps"]]
        assert len(path) == len(p["steps"]) and path[0][0] == names[p["root"]] and path[-1][1] == names[p["target"]]
        assert all(a[1] == b[0] for a, b in zip(path, path[1:])) and set(path) <= set(edges)
        assert c["answer"] == f"{names[p['root']]} {names[p['target']]}"
        assert sorted(lk["answer"].removesuffix(" .").split(" . ")) == [" ".join(e) for e in edges]
        data.tokenize_record(c), data.tokenize_record(lk)
    tokens = lambda records: sum(len(data.encode(r["question"])) for r in records)  # noqa: E731
    assert tokens(compact) < 0.6 * tokens(paper)
