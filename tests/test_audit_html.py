"""``clarify report --html``: the self-contained audit page (tables, plot, conversations side by side, flags, filters).

The page is checked structurally with ``html.parser``: which elements exist, in which question, with which classes
and text — never by comparing markup strings, so styling can change freely.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from clarify_lit.data.records import ConversationRecord, write_records
from clarify_lit.evaluate.audit_html import markdown_to_html
from clarify_lit.evaluate.report import main, run_report
from clarify_lit.simulate.parsing import parse_answer_letter

CHOICES = ["oxygen", "nitrogen", "helium", "argon"]
SYSTEM = "You are a curious student. Do your thinking inside <thinking></thinking> tags."
HEDGE = "The answer is A, B, C, D."
SCRIPT = "<script>alert(1)</script>"


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny evaluation folders (metrics.json + rollouts.jsonl), as clarify evaluate writes them
# ---------------------------------------------------------------------------------------------------------------
def question(task: str) -> str:
    options = "\n".join(f"{letter}) {c}" for letter, c in zip("ABCD", CHOICES, strict=True))
    return f"Question: what about {task}?\n{options}\n\nAsk me ONE specific question."


def record(method: str, seed: int, task: str, final: str, **meta) -> ConversationRecord:
    """A two-turn clarifying conversation with ``final`` as the last assistant turn (gold: A)."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question(task)},
        {"role": "assistant", "content": "<thinking>oxygen?</thinking> Is oxygen a gas?"},
        {"role": "user", "content": "Oxygen is a gas. What is your final answer?"},
        {"role": "assistant", "content": final},
    ]
    return ConversationRecord(
        id=f"{method}-{seed}-{task}",
        task_id=task,
        messages=messages,
        gold="A",
        reward=float(parse_answer_letter(final, CHOICES) == "A"),
        prediction=parse_answer_letter(final, CHOICES),
        meta=dict(meta),
    )


def write_eval(folder: Path, method: str, seed: int, finals: dict[str, str | tuple[str, dict]] | None) -> Path:
    """``metrics.json`` and (unless ``finals`` is None) ``rollouts.jsonl`` with one record per question."""
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict = {"method": method, "seed": seed}
    n = len(finals or {}) or 3
    if finals is not None:
        recs = []
        for task, f in finals.items():
            final, rec_meta = f if isinstance(f, tuple) else (f, {})
            recs.append(record(method, seed, task, final, **rec_meta))
        write_records(folder / "rollouts.jsonl", recs)
        meta["rollouts"] = "rollouts.jsonl"
    acc = 0.5 + 0.1 * seed
    metrics = {"n": n, "accuracy": acc, "accuracy_se": 0.05, "reward": acc, "reward_se": 0.05}
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "meta": meta}))
    return folder / "metrics.json"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Base, Refit (two seed files), Swift (no rollout for q2).

    q0: everyone answers A (Swift's record has a legacy truncation count); q1: Base says B, Refit seed file 2
    hedges — the conversations disagree; q2: Base's second turn was cut and its text holds a ``<script>``.
    """
    r = tmp_path / "runs"
    ok = "Answer is A <thinking>oxygen is what plants release</thinking>"
    write_eval(
        r / "base",
        "Base",
        0,
        {"q0": ok, "q1": "The answer is B", "q2": (f"{SCRIPT} The answer is A", {"truncated_turns": [2]})},
    )
    write_eval(r / "refit-s0", "Refit", 0, {"q0": ok, "q1": ok, "q2": ok})
    write_eval(r / "refit-s1", "Refit", 1, {"q0": ok, "q1": HEDGE, "q2": ok})
    write_eval(r / "swift", "Swift", 0, {"q0": (ok, {"truncated_turns": 1}), "q1": ok})
    return r


# ---------------------------------------------------------------------------------------------------------------
# A minimal DOM from html.parser
# ---------------------------------------------------------------------------------------------------------------
VOID = {"meta", "img", "input", "br", "hr", "link"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        found = []
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and (cls is None or cls in c.classes()):
                    found.append(c)
                found.extend(c.all(tag, cls))
        return found


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        while len(self.stack) > 1:  # close up to the matching element (tolerates unclosed ones)
            if self.stack.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(path: Path) -> Node:
    builder = TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    return builder.root


def columns(section: Node) -> dict[str, Node]:
    """A question's conversation columns by their header label."""
    return {c.all(cls="colhead")[0].text(): c for c in section.all("div", "conv")}


def sections(doc: Node) -> dict[str, Node]:
    """Question sections by task id (the ``qid`` text is ``"<n>. <task_id>"``)."""
    return {s.all(cls="qid")[0].text().split(". ", 1)[1]: s for s in doc.all("section", "q")}


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
def test_page_structure_flags_and_escaping(runs, tmp_path):
    page = tmp_path / "out" / "audit.html"
    text = run_report([str(runs)], out=tmp_path / "out" / "report.md", html=page)
    doc = parse(page)
    qs = sections(doc)
    assert list(qs) == ["q0", "q1", "q2"]  # union over methods, first-seen order

    # every method and seed file has a column in every question; Swift has no rollout of q2
    labels = ["Base", "Refit (seed file 1)", "Refit (seed file 2)", "Swift"]
    for task, s in qs.items():
        assert list(columns(s)) == labels, task
    swift_q2 = columns(qs["q2"])["Swift"]
    assert "missing" in swift_q2.classes() and "no rollout" in swift_q2.text()
    assert not swift_q2.all(cls="msg")

    # the disagreement flag and the filter: only q1 (Base wrong with B, Refit seed 2 hedged) disagrees
    assert {t: s.attrs["data-disagree"] for t, s in qs.items()} == {"q0": "0", "q1": "1", "q2": "0"}
    box = next(i for i in doc.all("input") if i.attrs.get("id") == "only-disagree")
    assert box.attrs["type"] == "checkbox" and box.attrs["data-filter"] == "disagree"
    counts = " ".join(doc.all("div", "counts")[0].text().split())
    assert "3 questions" in counts and "1 where the conversations disagree" in counts

    # hedge: the obvious "A, B, C, D" reply is flagged, in its column and on the question
    hedged = columns(qs["q1"])["Refit (seed file 2)"]
    assert hedged.all("span", "hedge") and "hedge" in hedged.all(cls="verdict")[0].text()
    assert qs["q1"].attrs["data-hedged"] == "1"
    assert "✗" in hedged.all(cls="verdict")[0].text()  # a hedge names no letter: wrong

    # truncation: turn 2 of Base on q2 is marked cut, turn 1 is not; a legacy count flags without marking turns
    base_q2 = columns(qs["q2"])["Base"]
    turns = base_q2.all("div", "assistant")
    assert ["cut" in t.classes() for t in turns] == [False, True]
    assert "cut at token limit" in turns[1].text() and "cut at token limit" not in turns[0].text()
    assert base_q2.all("span", "trunc")
    swift_q0 = columns(qs["q0"])["Swift"]
    assert swift_q0.all("span", "trunc") and not swift_q0.all(cls="cut")
    assert {t: s.attrs["data-truncated"] for t, s in qs.items()} == {"q0": "1", "q1": "0", "q2": "1"}

    # model text is escaped: the <script> stays text; the only script element is the page's own filter code
    raw = page.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert SCRIPT in turns[1].text()
    scripts = doc.all("script")
    assert len(scripts) == 1 and "src" not in scripts[0].attrs and "alert(1)" not in scripts[0].text()
    assert any("<thinking>" in t.text() for t in columns(qs["q0"])["Base"].all("span", "think"))

    # self-contained: no external references, the plot is an embedded PNG
    refs = [v for n in doc.all() for k, v in n.attrs.items() if k in ("src", "href") and v]
    assert refs and all(v.startswith(("data:", "#")) for v in refs)
    assert "http://" not in raw and "https://" not in raw
    assert not doc.all("link")
    (img,) = doc.all("img")
    assert img.attrs["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(img.attrs["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

    # the summary table carries the Markdown table's numbers
    md_rows = [
        [c.strip().strip("*") for c in line.strip("|").split("|")]
        for line in text.split("## Final-answer letters")[0].splitlines()
        if line.startswith("| ") and " vs " not in line
    ]
    table = doc.all("table", "results")[0]
    html_rows = [[c.text() for c in tr.all() if c.tag in ("th", "td")] for tr in table.all("tr")]
    assert html_rows == md_rows


def test_cli_html_and_method_without_rollouts(runs, tmp_path, capsys):
    write_eval(runs / "star", "STaR-GATE", 0, None)  # metrics only: its column says why it is empty
    page = tmp_path / "audit.html"
    main([str(runs), "--out", str(tmp_path / "r.md"), "--html", str(page), "--no_paired", "true"])
    assert "| STaR-GATE |" in capsys.readouterr().out
    doc = parse(page)
    qs = sections(doc)
    assert len(qs) == 3
    for s in qs.values():
        star = columns(s)["STaR-GATE"]
        assert "no rollout" in star.text() and "missing" in star.classes()
    assert doc.all("details")[0].attrs is not None  # the page is well-formed enough to parse to the end
    assert doc.all("script")  # the JS made it to the end of the page


def test_stored_prediction_shown_when_the_parser_changed(tmp_path):
    """✓/✗ follow the current parse, as the metrics do; an outdated stored prediction is shown beside it."""
    folder = tmp_path / "old"
    write_eval(folder, "Old", 0, {"q0": "The answer is A"})
    rec = record("Old", 0, "q0", "The answer is A")
    rec.prediction = "C"  # as an older parser might have stored it
    write_records(folder / "rollouts.jsonl", [rec])
    page = tmp_path / "a.html"
    run_report([str(folder)], out=tmp_path / "r.md", html=page)
    verdict = " ".join(columns(sections(parse(page))["q0"])["Old"].all(cls="verdict")[0].text().split())
    assert "answer A" in verdict and "✓ correct" in verdict and "rollout parsed C" in verdict


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([2], (1, [2])),
        ([1, 3], (2, [1, 3])),
        ([], (0, [])),
        (2, (2, None)),
        (0, (0, [])),
        (None, (0, [])),
    ],
)
def test_truncation_meta_forms(value, expected):
    """The one reader of meta.truncated_turns (records.py) that the page, the metrics and the views share."""
    rec = ConversationRecord(
        id="r",
        task_id="t",
        messages=[{"role": "assistant", "content": "x"}],
        reward=0.0,
        meta={} if value is None else {"truncated_turns": value},
    )
    assert rec.truncated_turns() == expected


def test_markdown_tables_escape_and_bold():
    out = markdown_to_html("## T <x>\n\n| Method | Acc |\n|---|---|\n| <b>A</b> | **0.5 ± 0.1** |\n\n- note")
    assert "<h2>T &lt;x&gt;</h2>" in out
    assert "<td>&lt;b&gt;A&lt;/b&gt;</td>" in out and "<strong>0.5 ± 0.1</strong>" in out
    assert out.count("<tr>") == 2 and "---" not in out


def test_size_for_seven_methods_two_seeds_hundred_questions(tmp_path):
    """The real use: 7 methods × 2 seeds × 100 questions stays a few MB (system prompts printed once)."""
    long_final = "Answer is A <thinking>" + "Plants release oxygen during photosynthesis. " * 8 + "</thinking>"
    for i, method in enumerate(["Base", "Refit", "Swift", "STaR-GATE", "DPO", "SFT", "Other"]):
        for seed in (0, 1):
            finals = {f"q{j}": long_final if (i + j + seed) % 3 else "The answer is B" for j in range(100)}
            write_eval(tmp_path / f"{method}-{seed}", method, seed, finals)
    page = tmp_path / "audit.html"
    run_report([str(tmp_path / "*")], out=tmp_path / "r" / "r.md", html=page, paired=False)
    assert len(sections(parse(page))) == 100
    size = page.stat().st_size
    assert size < 3_000_000, size


def test_letters_table_shows_a_collapse_onto_one_letter_and_the_constant_answer_baseline(tmp_path):
    """A policy that always answers A scores exactly the share of questions whose gold is A; the report's letter
    table shows its collapse (A 1.00) and the constant-answer accuracies next to it, so its accuracy cannot pass
    for learning. A hedge or a question counts as "none"."""
    from clarify_lit.evaluate.report import constant_answer_accuracy, letter_shares

    golds = {"q0": "A", "q1": "B", "q2": "B", "q3": "C"}

    def recs(method: str, finals: dict[str, str]) -> list[ConversationRecord]:
        out = []
        for task, final in finals.items():
            r = record(method, 0, task, final)
            r.gold = golds[task]
            out.append(r)
        return out

    always_a = recs("Const", {t: "The answer is A." for t in golds})
    mixed = recs("Mixed", {"q0": "Answer is B", "q1": HEDGE, "q2": "Is it C?", "q3": "C"})
    assert letter_shares(always_a) == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0, "none": 0.0}
    assert letter_shares(mixed) == {"A": 0.0, "B": 0.25, "C": 0.25, "D": 0.0, "none": 0.5}
    assert constant_answer_accuracy(always_a + mixed) == {"A": 0.25, "B": 0.5, "C": 0.25, "D": 0.0}
    for name, rs in (("const", always_a), ("mixed", mixed)):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        write_records(folder / "rollouts.jsonl", rs)
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "metrics": {"n": 4, "accuracy": 0.25},
                    "meta": {"method": rs[0].id.split("-")[0], "rollouts": "rollouts.jsonl"},
                }
            )
        )
    text = run_report([str(tmp_path / "runs")], out=tmp_path / "r.md", baseline="Const")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.split("## Final-answer letters")[1].splitlines()
        if line.startswith("| ")
    }
    assert rows["Const"] == ["1.00", "0.00", "0.00", "0.00", "0.00", "A (1.00)"]
    assert rows["*accuracy of always answering X*"] == ["0.25", "0.50", "0.25", "0.00", "", "B (0.50)"]
