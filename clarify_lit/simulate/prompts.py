"""Every prompt the simulator uses, in one place (wording ours; structure and answer formats after the paper).

Conversation layout (``messages``): ``system`` (the assistant's system prompt), then ``n_turns`` pairs of a teacher
turn (role ``user``) and an assistant turn. Per-turn instructions for the assistant (word limits, format) are
appended to the teacher's ``user`` message after :data:`INSTRUCTION_MARK`, so they are conditioning only: training
masks every non-assistant token. :func:`split_instruction` takes them off again (the judges read the bare turns).

Turn plans (one *kind* per assistant turn, :func:`turn_kinds`):

* reasoning setting (teacher fully scripted): ``initial``, ``critique``, ``elaborate`` × (n − 3), ``final``.
  n = 2 drops ``critique``; n = 1 asks for the final answer right after the question.
* clarifying setting (thinking mode only): ``ask`` × max(1, n − 2), ``reason`` (if n ≥ 3), ``final``. Every teacher
  turn that follows an ``ask`` turn starts with the teacher's answer to that question (the only non-scripted text);
  the first and the last teacher turns are hard-coded. n ≥ 2.

Open mode (``mode="open"``, both settings; docs/simulate.md#open-mode): the student sees the question without its
options (:func:`format_question`) and gives its final answer in a few words, graded by the option text it names
(:mod:`.open_answer`). The clarifying plan is ``ask`` × (n − 1), ``final``: the student asks, the teacher answers
the question asked (:class:`~.teachers.OpenTeacher`), and the last turn asks for the answer. The prompts are the ones
measured before any training (docs/simulate.md, "Open mode": value of asking), with no
per-turn instruction block. Adaptive length is not defined in open mode.

Adaptive length (``adaptive=True``; the paper's third use case): the system prompt and every turn before the last
tell the assistant that it may give its final answer early, in the usual answer format, and that doing so ends the
conversation (the rollout detects it with ``parsing.early_answer``). In the reasoning setting the note is a per-turn
instruction (after :data:`INSTRUCTION_MARK`, so judges never see it); in the clarifying setting the ``ask``/``reason``
instructions offer the final answer as the alternative. The last turn is the same as in fixed-length conversations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from clarify_lit.data.echoes import INSTRUCTION_MARK, split_instruction  # noqa: F401  (re-exported)
from clarify_lit.data.tasks import LETTERS, QATask, format_choices  # noqa: F401  (format_choices: re-exported)

Setting = Literal["reasoning", "clarifying"]
Mode = Literal["thinking", "standard", "open"]
TurnKind = Literal["initial", "critique", "elaborate", "final", "ask", "reason"]

WORD_LIMIT = "Use at most 50-60 words."

# One line that tells the assistant where a question comes from, keyed by a normalised dataset-name prefix.
DATASET_LINES: dict[str, str] = {
    "openbookqa": "This question is from an open-book elementary science test: it combines a basic science fact "
    "with common knowledge.",
    "arc": "This question is from a grade-school science exam.",
    "sciq": "This is a science exam question (physics, chemistry, biology or earth science).",
    "scienceqa": "This is a science exam question (physics, chemistry, biology or earth science).",
    "mmlu": "This question is from an exam covering academic and professional subjects.",
    "commonsenseqa": "This question tests everyday commonsense knowledge.",
    "cosql": "This question asks which SQL query correctly answers a request about a database.",
    "mathdial": "This is a math word problem: pick the correct final numeric answer.",
}
DEFAULT_DATASET_LINE = "This is a multiple-choice question."


def dataset_line(dataset: str) -> str:
    """The one-line dataset instruction for T1 (``arc_easy``, ``ARC-Challenge`` … all map to ``arc``)."""
    key = re.sub(r"[^a-z0-9]", "", dataset.lower().split("/")[0])
    for prefix, line in DATASET_LINES.items():
        if key.startswith(prefix):
            return line
    return DEFAULT_DATASET_LINE


def format_question(task: QATask, mode: Mode | None = None) -> str:
    """The question as the student sees it: with its lettered options, or (open mode) the question alone."""
    return open_question(task) if mode == "open" else task.question_prompt


def open_question(task: QATask) -> str:
    """``Question: <text>`` without the options (open mode)."""
    return f"Question: {task.question.strip()}"


def with_instruction(text: str, instruction: str | None) -> str:
    """Append a per-turn assistant instruction to a teacher message (kept apart by :data:`INSTRUCTION_MARK`)."""
    if not instruction:
        return text
    return f"{text}\n\n{INSTRUCTION_MARK} {instruction}]"


# ---------------------------------------------------------------------------------------------------------------
# turn plans


def check_setting(setting: str, mode: str, n_turns: int) -> None:
    """Raise a clear error for combinations the simulator does not define."""
    if setting not in ("reasoning", "clarifying"):
        raise ValueError(f"setting must be 'reasoning' or 'clarifying', got {setting!r}")
    if mode not in ("thinking", "standard", "open"):
        raise ValueError(f"mode must be 'thinking', 'standard' or 'open', got {mode!r}")
    if setting == "clarifying" and mode == "standard":
        raise ValueError(
            "the clarifying setting is defined in thinking mode (as in the paper) and in open mode; use "
            "mode='thinking' or mode='open'"
        )
    minimum = 1 if setting == "reasoning" else 2
    if not isinstance(n_turns, int) or n_turns < minimum:
        raise ValueError(f"n_turns must be an integer >= {minimum} in the {setting} setting, got {n_turns!r}")


def turn_kinds(setting: Setting, n_turns: int, mode: Mode | None = None) -> list[TurnKind]:
    """What each assistant turn is for (see the module docstring)."""
    if setting == "clarifying" and mode == "open":
        return ["ask"] * (n_turns - 1) + ["final"]
    if setting == "reasoning":
        if n_turns == 1:
            return ["final"]
        middle: list[TurnKind] = ["critique"] + ["elaborate"] * (n_turns - 3) if n_turns >= 3 else []
        return ["initial", *middle, "final"]
    if n_turns == 2:
        return ["ask", "final"]
    return ["ask"] * (n_turns - 2) + ["reason", "final"]


def needs_teacher_reply(setting: Setting, n_turns: int, turn: int, mode: Mode | None = None) -> bool:
    """Whether teacher turn ``turn`` (1-based) starts with the teacher's reply to the previous assistant turn."""
    return setting == "clarifying" and turn >= 2 and turn_kinds(setting, n_turns, mode)[turn - 2] == "ask"


# ---------------------------------------------------------------------------------------------------------------
# the reasoning setting (scripted teacher)

_THINK_HOW = "Put your reasoning inside <thinking></thinking> tags."


# adaptive length: what the system prompts add, and the per-turn note before every turn but the last
ADAPTIVE_SYSTEM_REASONING = (
    " You may give your final answer at any turn, as soon as you are sure of it, in the same "
    "format; giving it ends the conversation."
)
EARLY_ANSWER_REASONING = {
    "thinking": (
        "If you are already sure of the answer, you may give your final answer now instead: begin with "
        "'The answer is X' outside the thinking tags. That ends the conversation."
    ),
    "standard": (
        "If you are already sure of the answer, you may give your final answer now instead: begin with "
        "'The answer is X'. That ends the conversation."
    ),
}


def reasoning_system_prompt(mode: Mode, adaptive: bool = False) -> str:
    extra = ADAPTIVE_SYSTEM_REASONING if adaptive else ""
    if mode == "thinking":
        return (
            "You are an expert at answering multiple-choice questions. Reason step by step inside "
            "<thinking></thinking> tags. When you are asked for your final answer, first write 'The answer is "
            "X' (X is A, B, C or D) outside the thinking tags, then give your reasoning inside "
            "<thinking></thinking> tags." + extra
        )
    return (
        "You are an expert at answering multiple-choice questions. When you are asked for your final answer, "
        "first write 'The answer is X' (X is A, B, C or D), then explain your reasoning." + extra
    )


def reasoning_teacher_turn(task: QATask, kind: TurnKind, mode: Mode, first: bool, adaptive: bool = False) -> str:
    """The scripted teacher's message before an assistant turn of the given kind (``first``: it is T1).

    ``adaptive``: turns other than ``final`` carry the early-answer note as a per-turn instruction."""
    text = _reasoning_teacher_text(task, kind, mode, first)
    return with_instruction(text, EARLY_ANSWER_REASONING[mode]) if adaptive and kind != "final" else text


def _reasoning_teacher_text(task: QATask, kind: TurnKind, mode: Mode, first: bool) -> str:
    think = f" {_THINK_HOW}" if mode == "thinking" else ""
    if kind == "initial":
        return (
            f"{dataset_line(task.dataset)}\n\n{format_question(task)}\n\n"
            f"What are your initial thoughts on this question and its choices?{think}"
        )
    if kind == "critique":
        concepts = "" if mode == "thinking" else " What are the key concepts this question is testing?"
        return (
            f"Good start, that is a thoughtful beginning.{concepts} Why might some of the options be incorrect?{think}"
        )
    if kind == "elaborate":
        return (
            "Nice work. Please elaborate on the key concepts behind this question and how they apply to each option."
            f"{think}"
        )
    if kind == "final":
        if mode == "thinking":
            ask = (
                "Now give your final answer (A, B, C or D). Begin with 'The answer is X' outside the thinking "
                "tags, then justify your choice inside <thinking></thinking> tags."
            )
        else:
            ask = "Now give your final answer (A, B, C or D). Begin with 'The answer is X', then justify your choice."
        if first:  # n = 1: the question and the final request in one turn
            return f"{dataset_line(task.dataset)}\n\n{format_question(task)}\n\n{ask}"
        return ask
    raise ValueError(f"turn kind {kind!r} does not belong to the reasoning setting")


# ---------------------------------------------------------------------------------------------------------------
# the clarifying setting (student asks, teacher answers)

CLARIFYING_SYSTEM_PROMPT = (
    "You are a curious student working on a multiple-choice question with a teacher. Ask specific clarifying "
    "questions to understand the options better. Do your thinking inside lowercase <thinking></thinking> tags. "
    "When the teacher asks for your final answer, write 'Answer is X' (X is A, B, C or D) first, then your "
    "reasoning inside <thinking></thinking> tags."
)

ASK_INSTRUCTION = (
    "Ask ONE short, specific question about ONE of the options. Do not answer the question and do "
    f"not explain anything. {WORD_LIMIT}"
)
ASK_AGAIN_INSTRUCTION = (
    f"Ask ONE more short, specific question about ONE of the options. Do not answer the question yet. {WORD_LIMIT}"
)
REASON_INSTRUCTION = (
    "Think step by step about every option inside <thinking></thinking> tags. Do not ask any "
    f"more questions. {WORD_LIMIT}"
)

# adaptive length: the same turns, with the final answer offered as the alternative to asking or reasoning on
ADAPTIVE_SYSTEM_CLARIFYING = (
    " You may also give your final answer before the teacher asks for it, as soon as you "
    "are sure: write 'Answer is X' first. That ends the conversation, so ask only the "
    "questions you need."
)
_EARLY_CLARIFY = (
    "or, if you are already sure, give your final answer instead: start with 'Answer is X' (X is A, B, "
    "C or D), then your reasoning inside <thinking></thinking> tags."
)
ASK_INSTRUCTION_ADAPTIVE = f"Ask ONE short, specific question about ONE of the options, {_EARLY_CLARIFY} {WORD_LIMIT}"
ASK_AGAIN_INSTRUCTION_ADAPTIVE = (
    f"Ask ONE more short, specific question about ONE of the options, {_EARLY_CLARIFY} {WORD_LIMIT}"
)
REASON_INSTRUCTION_ADAPTIVE = (
    "Think step by step about every option inside <thinking></thinking> tags. Do not ask "
    "any more questions. If you are already sure, you may give your final answer now: "
    f"start with 'Answer is X' outside the thinking tags. {WORD_LIMIT}"
)

CLARIFY_T1 = "Ask me ONE specific question about any ONE of the options."
CLARIFY_FINAL = (
    "Thank you for working through it. What is your final answer? Give it first, then your reasoning "
    "inside <thinking></thinking> tags."
)
# What the scripted teacher says in the clarifying setting: no information at all (the no-teacher baseline).
SCRIPTED_CLARIFY_REPLY = (
    "That is a fair question. Think about what that option means and whether it really fits what the question asks."
)


def final_clarify_instruction(task: QATask) -> str:
    options = " ".join(f"{letter}) {text}" for letter, text in zip(LETTERS, task.choices, strict=True))
    return (
        f"Remember the question: {task.question.strip()} {options}. "
        "Start with 'Answer is X' where X is A, B, C or D, then give 2-3 sentences of reasoning inside "
        f"<thinking></thinking> tags. {WORD_LIMIT}"
    )


def clarifying_teacher_turn(
    task: QATask, kind: TurnKind, previous: TurnKind | None, reply: str | None, adaptive: bool = False
) -> str:
    """The teacher message before an assistant turn of ``kind`` (``previous``: the kind of the turn before;
    ``adaptive``: the ``ask``/``reason`` instructions offer the final answer as the alternative)."""
    if previous is None:  # T1, hard-coded
        return with_instruction(
            f"{format_question(task)}\n\n{CLARIFY_T1}", ASK_INSTRUCTION_ADAPTIVE if adaptive else ASK_INSTRUCTION
        )
    parts: list[str] = []
    if previous == "ask":
        if reply is None or not reply.strip():
            raise ValueError(f"task {task.task_id}: the teacher's answer to the student's question is missing")
        parts.append(reply.strip())
    if kind == "ask":
        return with_instruction(
            "\n\n".join(parts), ASK_AGAIN_INSTRUCTION_ADAPTIVE if adaptive else ASK_AGAIN_INSTRUCTION
        )
    if kind == "reason":
        return with_instruction("\n\n".join(parts), REASON_INSTRUCTION_ADAPTIVE if adaptive else REASON_INSTRUCTION)
    if kind == "final":
        parts.append(CLARIFY_FINAL)
        return with_instruction("\n\n".join(parts), final_clarify_instruction(task))
    raise ValueError(f"turn kind {kind!r} does not belong to the clarifying setting")


# ---------------------------------------------------------------------------------------------------------------
# open mode (both settings): the question without its options, the final answer in words

OPEN_SYSTEM_PROMPTS: dict[str, str] = {
    "clarifying": "You are a curious student. Ask the teacher one question, then answer.",
    "reasoning": "You are an expert at answering science questions. Think it through, then answer in a few words.",
}
OPEN_ASK = "Ask me one question that would help you answer."
OPEN_FINAL = "Now give your final answer in a few words, starting with 'The answer is'."
OPEN_INITIAL = "What are your initial thoughts on this question?"
OPEN_CRITIQUE = "Good start. What facts do you need to answer it, and what might be a tempting wrong answer?"
OPEN_ELABORATE = "Nice work. Please elaborate on the key concepts behind this question."
# the open teacher's two fixed replies (teachers.OpenTeacher): a turn without a question gets no information
OPEN_ASK_FOR_QUESTION = "Please ask me one question about the problem."
OPEN_NOTHING_ON_THAT = "My notes say nothing about that."


def check_open(adaptive: bool) -> None:
    if adaptive:
        raise NotImplementedError(
            "adaptive length is not implemented in open mode: an early final answer is "
            "recognised by its answer letter (parsing.early_answer), and open answers have none"
        )


def open_teacher_turn(
    task: QATask, setting: Setting, kind: TurnKind, previous: TurnKind | None, reply: str | None
) -> str:
    """The teacher message before an open-mode assistant turn of ``kind`` (``previous``: the turn before's kind)."""
    parts: list[str] = []
    if previous is None:
        parts.append(open_question(task))
    if previous == "ask":
        if reply is None or not reply.strip():
            raise ValueError(f"task {task.task_id}: the teacher's answer to the student's question is missing")
        parts.append(reply.strip())
    follow = {
        "ask": OPEN_ASK,
        "final": OPEN_FINAL,
        "initial": OPEN_INITIAL,
        "critique": OPEN_CRITIQUE,
        "elaborate": OPEN_ELABORATE,
    }.get(kind)
    if follow is None:
        raise ValueError(f"turn kind {kind!r} does not belong to open mode's {setting} setting")
    parts.append(follow)
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# one entry point for the rollout


def system_prompt(setting: Setting, mode: Mode, adaptive: bool = False) -> str:
    if mode == "open":
        check_open(adaptive)
        return OPEN_SYSTEM_PROMPTS[setting]
    if setting == "reasoning":
        return reasoning_system_prompt(mode, adaptive)
    return CLARIFYING_SYSTEM_PROMPT + (ADAPTIVE_SYSTEM_CLARIFYING if adaptive else "")


def teacher_message(
    task: QATask,
    setting: Setting,
    mode: Mode,
    n_turns: int,
    turn: int,
    reply: str | None = None,
    adaptive: bool = False,
) -> str:
    """Teacher message ``turn`` (1-based) of a conversation; ``reply`` is the teacher's answer when
    :func:`needs_teacher_reply` says one is needed; ``adaptive`` offers an early final answer (turns < n)."""
    kinds = turn_kinds(setting, n_turns, mode)
    if not 1 <= turn <= n_turns:
        raise ValueError(f"turn must be in 1..{n_turns}, got {turn}")
    kind = kinds[turn - 1]
    if mode == "open":
        check_open(adaptive)
        return open_teacher_turn(task, setting, kind, kinds[turn - 2] if turn >= 2 else None, reply)
    if setting == "reasoning":
        return reasoning_teacher_turn(task, kind, mode, first=turn == 1, adaptive=adaptive)
    return clarifying_teacher_turn(task, kind, kinds[turn - 2] if turn >= 2 else None, reply, adaptive=adaptive)


# ---------------------------------------------------------------------------------------------------------------
# the LLM teacher

TEACHER_SYSTEM_PROMPT = (
    "You are an expert teacher guiding a student through a multiple-choice question. The student asks you "
    "clarifying questions about the options. Answer each clarification helpfully, accurately and concisely so the "
    "student can reason their way to the answer themselves. Never give away the answer and never say which option "
    "is correct."
)


def teacher_request(
    task: QATask, student_message: str, *, show_gold: bool = True, show_knowledge: bool = True
) -> list[dict[str, str]]:
    """Chat messages for one LLM-teacher reply: the question, the (secret) answer, notes, the student's question."""
    lines = [format_question(task)]
    if show_gold:
        idx = LETTERS.index(task.gold)
        lines.append(f"Correct answer (for you only, never reveal it): {task.gold}) {task.choices[idx]}")
    if show_knowledge and task.knowledge:
        lines.append(f"Background notes: {task.knowledge.strip()}")
    student, _ = split_instruction(student_message)
    lines.append(f'The student asks: "{student.strip()}"')
    lines.append(
        "Answer the student's question in 2-3 sentences (at most 50-60 words). Do not give away the final "
        "answer and do not say which option is correct."
    )
    return [{"role": "system", "content": TEACHER_SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(lines)}]


# ---------------------------------------------------------------------------------------------------------------
# judges
#
# The one vocabulary of the paper's LLM judge. A score's *key* is what the judge is asked to return and what the
# reward stores in ``reward_components``; its *metric name* is how metrics.json and the report call it
# (``judge_<name>``), the same except for confidence calibration. Rewards (parsing a reply) and metrics (reading
# records) both map a spelling to a score with :func:`judge_key`.

JUDGE_CRITERIA: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy: is the assistant's final answer correct?"),
    ("reasoning", "Reasoning: is the reasoning logical, sound and relevant?"),
    ("comprehensiveness", "Comprehensiveness: does it consider all the options and the concepts they involve?"),
    ("pedagogical_value", "Pedagogical value: would the conversation help someone learn the material?"),
    ("confidence_calibration", "Confidence calibration: is the confidence it expresses warranted by its reasoning?"),
    ("overall", "Overall: the overall quality of the assistant's part of the conversation."),
)
JUDGE_KEYS = tuple(key for key, _ in JUDGE_CRITERIA)
#: key → metric name, for every score
JUDGE_METRIC_NAMES = {key: {"confidence_calibration": "confidence"}.get(key, key) for key in JUDGE_KEYS}
#: other spellings of the scores (a judge's reply, another tool's records) → key
JUDGE_ALIASES = {
    "reasoning_ability": "reasoning",
    "pedagogical": "pedagogical_value",
    "pedagogy": "pedagogical_value",
    "calibration": "confidence_calibration",
    "overall_score": "overall",
    "overall_quality": "overall",
    **{name: key for key, name in JUDGE_METRIC_NAMES.items()},
}


def judge_key(spelling: str) -> str | None:
    """The judge score key that ``spelling`` (lower case, words joined by ``_``) names, or ``None``."""
    return spelling if spelling in JUDGE_METRIC_NAMES else JUDGE_ALIASES.get(spelling)


JUDGE_SYSTEM_PROMPT = "You are a strict, impartial expert who evaluates tutoring conversations."


def transcript(
    messages: Sequence[dict[str, str]], teacher_name: str = "Teacher", assistant_name: str = "Assistant"
) -> str:
    """The conversation as plain text (system prompt and per-turn instructions left out)."""
    out = []
    for m in messages:
        if m["role"] == "system":
            continue
        text, _ = split_instruction(m["content"]) if m["role"] == "user" else (m["content"], None)
        name = teacher_name if m["role"] == "user" else assistant_name
        out.append(f"{name}: {text.strip()}")
    return "\n\n".join(out)


def judge_request(task: QATask, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The LLM-judge prompt: question, choices, correct answer, the whole conversation; six 0-10 scores as JSON."""
    idx = LETTERS.index(task.gold)
    criteria = "\n".join(f"{i}. {text}" for i, (_, text) in enumerate(JUDGE_CRITERIA, start=1))
    example = ", ".join(f'"{key}": 5' for key, _ in JUDGE_CRITERIA)
    user = (
        "Evaluate the assistant in the conversation below, in which it works on a multiple-choice question with a "
        f"teacher.\n\n{format_question(task)}\n\nCorrect answer: {task.gold}) {task.choices[idx]}\n\n"
        f"Conversation:\n{transcript(messages)}\n\n"
        f"Score the assistant from 0 (worst) to 10 (best) on each criterion:\n{criteria}\n\n"
        "Reply with a JSON object only, with an integer for every key, e.g.\n{" + example + "}"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


GOLD_PROB_PREFIX = "The answer is"


def gold_prob_request(task: QATask, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The frozen judge's view for the ``gold_prob`` reward; the reply is prefixed with :data:`GOLD_PROB_PREFIX`."""
    user = (
        f"Read this conversation about a multiple-choice question.\n\n{format_question(task)}\n\n"
        f"Conversation:\n{transcript(messages, assistant_name='Student')}\n\n"
        "Based on the conversation, which option is correct? Reply with 'The answer is X' (X is A, B, C or D)."
    )
    return [{"role": "user", "content": user}]
