"""``clarify report --html PATH``: one static, self-contained page to audit an evaluation conversation by conversation.

The numbers in a results table are only as good as the conversations behind them; this page puts those
conversations next to the numbers so a reader can check them. It shows, top to bottom:

* the report's tables (the same Markdown the command prints, converted: summary ``mean ± SE`` with the best value in
  bold, and the paired per-question table when there is one) and the report's PNG plot, embedded as a data URI;
* counts (questions, questions where the conversations disagree, with a hedged or a truncated conversation) and
  filters (inline JS; without JS the filters are hidden and every question is listed);
* one collapsible section per test question (``task_id``, the union over all methods, first-seen order): a summary
  line with one chip per conversation (answer, ✓/✗, hedge, cut), and inside, the question with its gold letter and
  every conversation side by side — one column per method and seed file (``Refit (seed file 2)``), each message
  with its role, the parsed answer, correctness, reward and the flags. The answer and ✓/✗ are the current parser's
  reading of the final turn, as the metrics count them; the rollout's stored ``record.prediction`` is shown beside
  it when the two differ (the parser changed since the rollout). Flags:

  - **hedge**: the final assistant turn names several letters as its answer
    (``simulate.parsing.analyze_answer(...).hedged``, with the options from ``evaluate.metrics.known_choices``);
  - **cut**: assistant turns stopped by the token limit (``meta["truncated_turns"]``: 1-based turn numbers, or a
    count in older records, when the turns themselves are unknown).

  A method whose rollouts lack the question shows "no rollout". *Disagree* means the conversations of a question
  (any method, any seed file) differ in correctness or in parsed answer.

Everything taken from records is HTML-escaped (model output contains ``<thinking>`` tags and arbitrary text); nothing
is fetched from anywhere, so the file can be mailed or opened offline. To keep 7 methods × 2 seeds × 100 questions to
a few MB, each distinct system prompt is printed once at the top, and a conversation's first teacher message is
replaced by a pointer when it repeats the question shown above the columns.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clarify_lit.data.records import ConversationRecord, load_records
from clarify_lit.evaluate.metrics import final_answer_parse
from clarify_lit.evaluate.summary import MethodSummary
from clarify_lit.io import atomic_write_text

ROLE_NAMES = {"user": "teacher", "assistant": "assistant", "system": "system"}
SUMMARY_CHARS = 160  # the question line in a collapsed section


# ---------------------------------------------------------------------------------------------------------------
# Data: one column per (method, seed file, record of the question)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One metrics file's rollouts, indexed by question (``None``: no rollouts file next to the metrics)."""

    label: str
    path: str
    by_task: dict[str, list[ConversationRecord]] | None


@dataclass
class Verdict:
    """What the page says about one conversation."""

    answer: str | None  # the current parser's letter of the final turn: what the metrics (and ✓/✗) count
    stored: str | None  # the rollout's own parse (record.prediction); differs only if the parser changed since
    correct: bool | None  # None when the record has no gold letter
    hedged: bool
    cut_turns: set[int] = field(default_factory=set)  # 1-based assistant turns stopped by the token limit
    truncated: int = 0  # number of cut turns (known even when legacy records do not say which)


@dataclass
class Column:
    """One conversation of a question (``record`` None: the method has no rollout for it)."""

    label: str
    path: str
    record: ConversationRecord | None = None
    verdict: Verdict | None = None
    missing: str = "no rollout"


def load_sources(methods: Sequence[MethodSummary]) -> list[Source]:
    """Each method's files in table order; a method with several files gets one labelled source per seed file."""
    sources = []
    for s in methods:
        for i, f in enumerate(s.files, start=1):
            label = s.label if len(s.files) == 1 else f"{s.label} (seed file {i})"
            path = f.rollouts_path()
            by_task: dict[str, list[ConversationRecord]] | None = None
            if path is not None:
                by_task = {}
                for rec in load_records(path)[0]:
                    by_task.setdefault(str(rec.task_id), []).append(rec)
            sources.append(Source(label, str(f.path), by_task))
    return sources


def task_order(sources: Sequence[Source]) -> list[str]:
    """The union of the questions, in first-seen order (the rollouts keep the test part's order)."""
    return list(dict.fromkeys(t for s in sources if s.by_task for t in s.by_task))


def columns_for(task_id: str, sources: Sequence[Source]) -> list[Column]:
    """The question's conversations: one per source, or one per record when a file has several runs of it."""
    cols = []
    for s in sources:
        if s.by_task is None:
            cols.append(Column(s.label, s.path, missing="no rollout (no rollouts file next to its metrics.json)"))
            continue
        recs = s.by_task.get(task_id, [])
        if not recs:
            cols.append(Column(s.label, s.path))
        for r in recs:
            label = s.label if len(recs) == 1 else f"{s.label}, run {r.run}"
            cols.append(Column(label, s.path, r, judge(r)))
    return cols


def judge(record: ConversationRecord) -> Verdict:
    """Parsed answer, correctness (as the metrics count it), hedge and truncation of one conversation."""
    parsed = final_answer_parse(record)
    correct = None
    if record.gold is not None:
        correct = parsed.letter is not None and parsed.letter.strip().upper() == record.gold.strip().upper()
    n_cut, cut = record.truncated_turns()
    return Verdict(parsed.letter, record.prediction, correct, parsed.hedged, set(cut or ()), n_cut)


def disagree(cols: Sequence[Column]) -> bool:
    """Whether two conversations of the question differ in correctness or parsed answer (missing ones do not count)."""
    verdicts = [c.verdict for c in cols if c.verdict is not None]
    return len({v.correct for v in verdicts}) > 1 or len({v.answer for v in verdicts}) > 1


# ---------------------------------------------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------------------------------------------
def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


_THINK = re.compile(r"&lt;\s*thinking\s*&gt;.*?(?:&lt;\s*/\s*thinking\s*&gt;|$)", re.IGNORECASE | re.DOTALL)


def message_text(text: str) -> str:
    """Escaped message text with ``<thinking>…</thinking>`` (tags kept visible) dimmed, so the answer stands out.

    The pattern runs on the *escaped* text and only wraps it in a span, so no model text can become markup."""
    return _THINK.sub(lambda m: f'<span class="think">{m.group(0)}</span>', esc(text))


def _cell(text: str) -> str:
    # the results table marks the best value **bold**; escape first, then turn that one mark into <strong>
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(text.strip()))


def markdown_to_html(md: str) -> str:
    """The report's Markdown (``##`` headings, pipe tables, ``-`` notes, plain lines) as HTML."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head = "".join(f"<th>{_cell(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            if not all(set(c.strip()) <= set("-:") for c in cells):  # skip the |---| separator row
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{_cell(line[3:])}</h2>")
        elif line.startswith("- "):
            out.append(f'<p class="note">• {_cell(line[2:])}</p>')
        elif line.strip():
            out.append(f'<p class="note">{_cell(line)}</p>')
    flush()
    return "\n".join(out)


def png_data_uri(path: str | os.PathLike | None) -> str | None:
    """The plot as a ``data:image/png;base64,…`` URI, so the page needs no file next to it."""
    if path is None or not Path(path).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def question_text(cols: Sequence[Column]) -> str:
    """The question as the teacher first put it (``meta["question"]`` when a record has one)."""
    recs = [c.record for c in cols if c.record is not None]
    for r in recs:
        if isinstance(r.meta.get("question"), str):
            return r.meta["question"]
    for r in recs:
        first = next((m["content"] for m in r.messages if m["role"] == "user"), None)
        if first is not None:
            return first
    return ""


def short_question(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^question:\s*", "", line, flags=re.IGNORECASE)
    return line if len(line) <= SUMMARY_CHARS else line[: SUMMARY_CHARS - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# Rendering: conversations and questions
# ---------------------------------------------------------------------------------------------------------------
def verdict_badges(v: Verdict) -> str:
    """Parsed answer, correctness and flags of one conversation as small coloured badges."""
    ok = {True: ("ok", "✓ correct"), False: ("bad", "✗ wrong"), None: ("", "no gold")}[v.correct]
    parts = [f'<span class="b ans">answer {esc(v.answer or "–")}</span>', f'<span class="b {ok[0]}">{ok[1]}</span>']
    if v.stored != v.answer:  # the parser changed since the rollout: say what the rollout's reward saw
        parts.append(
            f'<span class="b" title="record.prediction, parsed when the rollout was made">rollout parsed '
            f"{esc(v.stored or '–')}</span>"
        )
    if v.hedged:
        parts.append('<span class="b flag hedge" title="the final answer names several letters">hedge</span>')
    if v.truncated:
        parts.append(
            f'<span class="b flag trunc" title="assistant turns stopped by the token limit">'
            f"truncated ({v.truncated} turn{'s' if v.truncated != 1 else ''})</span>"
        )
    return " ".join(parts)


def render_messages(rec: ConversationRecord, v: Verdict, question: str, systems: dict[str, int]) -> str:
    out = []
    n_assistant = 0
    first_user = True
    for m in rec.messages:
        role, content = m["role"], m["content"]
        if role == "system":
            num = systems.setdefault(content, len(systems) + 1)
            out.append(
                f'<div class="msg system"><span class="role">system</span> <a href="#sys-{num}">prompt S{num}</a></div>'
            )
            continue
        if role == "user" and first_user:
            first_user = False
            if content == question:
                out.append(
                    '<div class="msg user"><span class="role">teacher</span> '
                    '<span class="same">(the question, as shown above)</span></div>'
                )
                continue
        name, cls, note = ROLE_NAMES.get(role, esc(role)), esc(role), ""
        if role == "assistant":
            n_assistant += 1
            name = f"assistant {n_assistant}"
            if n_assistant in v.cut_turns:
                cls += " cut"
                note = '<div class="cutnote">✂ cut at token limit</div>'
        out.append(f'<div class="msg {cls}"><span class="role">{name}</span>\n{message_text(content)}{note}</div>')
    return "\n".join(out)


def render_column(col: Column, question: str, systems: dict[str, int]) -> str:
    head = f'<div class="colhead" title="{esc(col.path)}">{esc(col.label)}</div>'
    if col.record is None or col.verdict is None:
        return f'<div class="conv missing">{head}<div class="none">{esc(col.missing)}</div></div>'
    rec, v = col.record, col.verdict
    state = {True: " ok", False: " bad", None: ""}[v.correct]
    reward = "reward missing" if rec.meta.get("reward_missing") else f"reward {rec.reward:.3g}"
    meta = f'{verdict_badges(v)} <span class="b">{reward}</span>'
    return (
        f'<div class="conv{state}">{head}<div class="verdict">{meta}</div>'
        f"{render_messages(rec, v, question, systems)}</div>"
    )


def chip(col: Column) -> str:
    """One conversation in the collapsed summary line: label, answer, ✓/✗, flags."""
    if col.verdict is None:
        return f'<span class="chip missing" title="{esc(col.label)}: {esc(col.missing)}">{esc(col.label)}: –</span>'
    v = col.verdict
    cls = {True: "ok", False: "bad", None: ""}[v.correct]
    mark = {True: "✓", False: "✗", None: "?"}[v.correct]
    flags = (" <b>H</b>" if v.hedged else "") + (" ✂" if v.truncated else "")
    label = esc(col.label)
    return f'<span class="chip {cls}" title="{label}">{label}: {esc(v.answer or "–")} {mark}{flags}</span>'


def render_question(
    num: int, task_id: str, cols: Sequence[Column], systems: dict[str, int]
) -> tuple[str, dict[str, bool]]:
    """One question's section and its flags (for the counts and the filters)."""
    question = question_text(cols)
    golds = {c.record.gold for c in cols if c.record is not None and c.record.gold is not None}
    flags = {
        "disagree": disagree(cols),
        "hedged": any(c.verdict is not None and c.verdict.hedged for c in cols),
        "truncated": any(c.verdict is not None and c.verdict.truncated for c in cols),
    }
    data = " ".join(f'data-{k}="{int(v)}"' for k, v in flags.items())
    marks = "".join(f' <span class="b flag {k[:5]}">{k}</span>' for k, v in flags.items() if v)
    summary = (
        f'<summary><span class="qid">{num}. {esc(task_id)}</span> gold <b>{esc("/".join(sorted(golds)) or "–")}'
        f'</b>{marks} <span class="qtext">{esc(short_question(question))}</span>'
        f'<div class="chips">{" ".join(chip(c) for c in cols)}</div></summary>'
    )
    body = (
        f'<div class="question"><div class="gold">gold: <b>{esc("/".join(sorted(golds)) or "–")}</b></div>'
        f'<div class="msg user">{message_text(question)}</div></div>'
        f'<div class="convs">{"".join(render_column(c, question, systems) for c in cols)}</div>'
    )
    opened = " open" if num == 1 else ""  # one example open, so the layout is visible at a glance
    return f'<section class="q" id="q-{num}" {data}><details{opened}>{summary}{body}</details></section>', flags


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:16px 0 6px}
table.results{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
table.results th,table.results td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
table.results th{background:#f0f0f0}table.results td:first-child,table.results th:first-child{text-align:left}
.note{margin:2px 0;color:#555;font-size:13px}
.top{display:flex;flex-wrap:wrap;gap:8px 24px;align-items:flex-start}
img.plot{max-width:min(100%,640px);border:1px solid #ddd;margin:6px 0}
.counts{margin:10px 0;font-size:14px}.controls{margin:6px 0 12px;display:flex;gap:16px;flex-wrap:wrap}
.controls label{cursor:pointer}button{font:inherit;padding:1px 8px}
section.q{border:1px solid #ddd;border-radius:4px;margin:6px 0}
section.q summary{padding:5px 8px;cursor:pointer;background:#fafafa}
.qid{font-weight:600}.qtext{color:#444}
.chips{margin:4px 0 0 18px;display:flex;flex-wrap:wrap;gap:4px}
.chip{font-size:12px;border:1px solid #ccc;border-radius:10px;padding:0 7px;background:#fff;white-space:nowrap}
.chip.ok{border-color:#5a5;background:#eef8ee}.chip.bad{border-color:#c66;background:#fbeeee}
.chip.missing{color:#999;border-style:dashed}
.question{padding:6px 8px}.gold{margin-bottom:4px}
.convs{display:grid;grid-auto-flow:column;grid-auto-columns:minmax(300px,1fr);gap:8px;overflow-x:auto;
  padding:0 8px 8px}
.conv{border:1px solid #ccc;border-radius:4px;padding:4px;min-width:0;background:#fff}
.conv.ok{border-top:4px solid #5a5}.conv.bad{border-top:4px solid #c55}.conv.missing{background:#f7f7f7}
.colhead{font-weight:600;margin-bottom:3px}.verdict{margin-bottom:4px}.none{color:#888;font-style:italic}
.b{display:inline-block;font-size:12px;border-radius:3px;padding:0 5px;background:#eee;margin:1px 0}
.b.ok{background:#dff0d8;color:#2d662d}.b.bad{background:#f6dada;color:#8a2727}.b.ans{background:#e4e9f7}
.b.flag{font-weight:700}.b.hedge{background:#ffe08a;color:#6b4e00}
.b.trunc{background:#f6c2a0;color:#7a3306}.b.disag{background:#d8d0f2;color:#3c2a80}
.msg{white-space:pre-wrap;overflow-wrap:anywhere;margin:3px 0;padding:3px 6px;border-left:3px solid #aaa;
  background:#f6f6f6;max-height:30em;overflow-y:auto;font-size:13px}
.msg.assistant{background:#eef3ff;border-left-color:#3b6fd8}
.msg.system{background:none;border-left-color:#ddd;color:#777;font-size:12px}
.msg.cut{border-left:3px dashed #d2691e;background:#fff3ea}
.role{font-weight:600;font-size:11px;text-transform:uppercase;color:#555}
.think{color:#777}.same{color:#888;font-style:italic}
.cutnote{color:#b3470d;font-weight:600;font-size:12px;margin-top:2px}
[hidden]{display:none!important}
pre.sys{white-space:pre-wrap;background:#f6f6f6;padding:4px 6px;font-size:12px}
"""

# Filters only run in a browser with JS; without JS the controls stay hidden and every question is listed.
JS = """
(function(){
  var controls=document.getElementById('controls');controls.hidden=false;
  var boxes=controls.querySelectorAll('input[data-filter]');
  var qs=document.querySelectorAll('section.q');
  function apply(){
    var on=[];boxes.forEach(function(b){if(b.checked)on.push(b.getAttribute('data-filter'));});
    var n=0;
    qs.forEach(function(q){
      var show=on.every(function(f){return q.getAttribute('data-'+f)==='1';});
      q.hidden=!show;if(show)n++;
    });
    document.getElementById('shown').textContent=n;
  }
  boxes.forEach(function(b){b.addEventListener('change',apply);});
  function openAll(v){qs.forEach(function(q){if(!q.hidden)q.querySelector('details').open=v;});}
  document.getElementById('expand').addEventListener('click',function(){openAll(true);});
  document.getElementById('collapse').addEventListener('click',function(){openAll(false);});
  apply();
})();
"""


def render_controls(n: int, counts: dict[str, int]) -> str:
    filters = [
        ("disagree", "only questions where methods disagree"),
        ("hedged", "only questions with a hedged answer"),
        ("truncated", "only questions with a truncated turn"),
    ]
    boxes = "".join(
        f'<label><input type="checkbox" id="only-{k}" data-filter="{k}"> {text} ({counts[k]})</label>'
        for k, text in filters
    )
    return (
        f'<div class="counts"><b>{n}</b> questions · <b>{counts["disagree"]}</b> where the conversations '
        f"disagree (correctness or parsed answer) · <b>{counts['hedged']}</b> with a hedged answer · "
        f'<b>{counts["truncated"]}</b> with a truncated turn · showing <b id="shown">{n}</b></div>'
        f'<div class="controls" id="controls" hidden>{boxes}'
        f'<button type="button" id="expand">expand all</button>'
        f'<button type="button" id="collapse">collapse all</button></div>'
    )


def render_systems(systems: dict[str, int]) -> str:
    if not systems:
        return ""
    items = "".join(f'<h3 id="sys-{n}">S{n}</h3><pre class="sys">{esc(t)}</pre>' for t, n in systems.items())
    return f"<details><summary>System prompts ({len(systems)} distinct)</summary>{items}</details>"


def render_page(
    methods: Sequence[MethodSummary],
    report_markdown: str,
    plot: str | os.PathLike | None,
    title: str = "Evaluation audit",
) -> str:
    """The whole page as a string (see the module docstring for what it shows)."""
    sources = load_sources(methods)
    systems: dict[str, int] = {}  # filled while rendering: each distinct system prompt printed once, at the top
    sections, counts = [], {"disagree": 0, "hedged": 0, "truncated": 0}
    tasks = task_order(sources)
    for num, task_id in enumerate(tasks, start=1):
        section, flags = render_question(num, task_id, columns_for(task_id, sources), systems)
        sections.append(section)
        for k, v in flags.items():
            counts[k] += int(v)
    uri = png_data_uri(plot)
    img = f'<img class="plot" alt="results plot: mean ± SE per method" src="{uri}">' if uri else ""
    legend = (
        '<p class="note">Each question: one column per method and seed file. Chips: parsed answer, ✓/✗ '
        "(as the metrics count it), <b>H</b> = hedge (several letters given as the answer), ✂ = a turn cut "
        "at the token limit. Teacher messages grey, assistant blue; &lt;thinking&gt; text dimmed.</p>"
    )
    no_rollouts = [s.label for s in sources if s.by_task is None]
    missing = f'<p class="note">No rollouts file for: {esc(", ".join(no_rollouts))}.</p>' if no_rollouts else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        f'<h1>{esc(title)}</h1>\n<div class="top"><div>{markdown_to_html(report_markdown)}</div>{img}</div>\n'
        f"<h2>Conversations</h2>{legend}{missing}{render_controls(len(tasks), counts)}\n{render_systems(systems)}\n"
        + "\n".join(sections)
        + f"\n<script>{JS}</script>\n</body></html>\n"
    )


def write_audit_html(
    path: str | os.PathLike,
    methods: Sequence[MethodSummary],
    report_markdown: str,
    plot: str | os.PathLike | None = None,
    title: str = "Evaluation audit",
) -> Path:
    """Write the audit page to ``path`` and return it."""
    return atomic_write_text(path, render_page(methods, report_markdown, plot, title))
