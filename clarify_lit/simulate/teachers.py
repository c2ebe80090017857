"""Teachers: who speaks the ``user`` turns.

* ``scripted`` — no model. In the reasoning setting every teacher turn is scripted (:mod:`.prompts`); in the
  clarifying setting it answers every student question with the same uninformative nudge (a no-teacher baseline).
* ``retrieval`` — our offline stand-in for the paper's LLM teacher (Llama-3.1-8B-Instruct). It answers a clarifying
  question from the task's hidden ``knowledge`` text by ranking its sentences against the question with BM25
  (query = the student's words + the text of the options the question names). It never names a letter as right,
  and by default drops sentences that quote the gold option's text, so it clarifies without giving the answer away.
  Deterministic, no model, no network.
* ``open`` — open mode's teacher (:class:`OpenTeacher`): answers only a question, from the knowledge notes ranked
  against that question alone, never seeing the options and blanking nothing (docs/simulate.md#open-mode).
* ``llm`` — an LLM answers with the paper's teacher prompt (:func:`.prompts.teacher_request`), through a
  :class:`ChatBackend`: :class:`HFChatBackend` (any local HF causal LM, batched via :class:`.engine.GenerationEngine`)
  or :class:`EndpointChatBackend` (any OpenAI-compatible ``/chat/completions`` server, stdlib ``http.client``).

A teacher answers a whole batch of conversations in one :meth:`Teacher.reply` call.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from clarify_lit.data.records import Message
from clarify_lit.data.tasks import LETTERS, QATask
from clarify_lit.simulate import prompts
from clarify_lit.simulate.engine import GenerationEngine, derive_seed
from clarify_lit.simulate.open_answer import option_pattern, questions_in

log = logging.getLogger(__name__)

TeacherKind = Literal["scripted", "retrieval", "open", "llm"]


# ---------------------------------------------------------------------------------------------------------------
# chat backends (shared with the LLM judge)


class ChatBackend(ABC):
    """Answers a batch of chat requests; ``temperature`` 0 = greedy; ``seed`` makes local sampling repeatable."""

    name: str = "backend"

    @abstractmethod
    def chat(
        self,
        requests: Sequence[Sequence[Message]],
        *,
        temperature: float = 0.0,
        max_new_tokens: int = 128,
        seed: int = 0,
    ) -> list[str]: ...


class HFChatBackend(ChatBackend):
    """A local Hugging Face causal LM through the batched :class:`GenerationEngine`."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, name: str = "hf"):
        self.engine = GenerationEngine(model, tokenizer, batch_size=batch_size)
        self.name = name

    def chat(self, requests, *, temperature=0.0, max_new_tokens=128, seed=0):
        outs = self.engine.generate(requests, float(temperature), seed=seed, max_new_tokens=max_new_tokens)
        return [o.text for o in outs]


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint could not give an answer (unreachable, refused, or malformed replies)."""


class EndpointChatBackend(ChatBackend):
    """Any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, TGI, OpenAI …).

    ``base_url`` like ``http://127.0.0.1:8000/v1``; the API key is read from the environment variable named
    ``api_key_env`` (not given = no auth header). Each request gets ``timeout`` seconds and up to ``max_retries``
    retries with exponential backoff (``backoff * 2**k`` s) on connection errors, timeouts, 429 and 5xx; other 4xx
    fail at once. ``concurrency`` requests of a batch run in parallel threads; results keep input order.
    """

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 4,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = max(1, concurrency)
        self.name = f"endpoint:{model}"
        # HTTP attempts made and, of them, retries (simulate's summary reports both: endpoint_calls)
        self.attempts = 0
        self.retries = 0
        self.answered = 0
        self._count = threading.Lock()
        if api_key_env and not os.environ.get(api_key_env):
            raise EndpointError(f"environment variable {api_key_env!r} (the endpoint's API key) is not set")

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key_env:
            h["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        return h

    def _complete_one(
        self, messages: Sequence[Message], temperature: float, max_new_tokens: int, seed: int
    ) -> tuple[str, str | None, int | None]:
        """``(text, finish_reason, completion tokens)`` of one request (the last two as the server reports them)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": list(messages),
                "temperature": float(temperature),
                "max_tokens": int(max_new_tokens),
                "seed": int(seed) % (2**31),
            }
        ).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._count:
                self.attempts += 1
                self.retries += attempt > 0
            req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                last = f"HTTP {e.code}: {detail}"
                if e.code not in self.RETRY_STATUS:
                    raise EndpointError(f"endpoint {self.url} refused the request ({last})") from None
                continue
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, timeout
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            except json.JSONDecodeError as e:
                last = f"reply is not JSON ({e.msg})"
                continue
            try:
                choice = payload["choices"][0]
                text = str(choice["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                last = f"reply lacks choices[0].message.content: {str(payload)[:200]}"
                continue
            usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
            tokens = usage.get("completion_tokens")
            with self._count:
                self.answered += 1
            return text, choice.get("finish_reason"), tokens if isinstance(tokens, int) else None
        raise EndpointError(
            f"endpoint {self.url} gave no usable answer after {self.max_retries + 1} attempts "
            f"(timeout {self.timeout}s each); last error: {last}. Is the server running and is "
            f"base_url right?"
        )

    def calls(self) -> dict[str, int]:
        """Requests answered, HTTP attempts and retries so far (every request answered: ``answered`` = requests)."""
        return {"answered": self.answered, "attempts": self.attempts, "retries": self.retries}

    def chat(self, requests, *, temperature=0.0, max_new_tokens=128, seed=0):
        return [
            text
            for text, _, _ in self.complete(requests, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        ]

    def complete(
        self, requests, *, temperature=0.0, max_new_tokens=128, seed=0
    ) -> list[tuple[str, str | None, int | None]]:
        """Like :meth:`chat`, with each reply's finish reason and completion-token count (``None`` if not sent)."""

        def call(i: int) -> tuple[str, str | None, int | None]:
            return self._complete_one(requests[i], temperature, max_new_tokens, derive_seed(seed, i))

        if self.concurrency == 1 or len(requests) <= 1:
            return [call(i) for i in range(len(requests))]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(call, range(len(requests))))


# ---------------------------------------------------------------------------------------------------------------
# teachers


class Teacher(ABC):
    """Replies to the latest student turn of each conversation (one call per batch)."""

    kind: TeacherKind

    @abstractmethod
    def reply(
        self, tasks: Sequence[QATask], conversations: Sequence[Sequence[Message]], *, seed: int = 0
    ) -> list[str]: ...

    def describe(self) -> str:
        return self.kind


def _last_student_turn(conversation: Sequence[Message]) -> str:
    if not conversation or conversation[-1]["role"] != "assistant":
        raise ValueError("a teacher replies to a conversation whose last turn is the assistant's")
    return conversation[-1]["content"]


class ScriptedTeacher(Teacher):
    """No model: the reasoning setting's turns come from :mod:`.prompts`; a student question gets a fixed nudge."""

    kind: TeacherKind = "scripted"

    def reply(self, tasks, conversations, *, seed=0):
        return [prompts.SCRIPTED_CLARIFY_REPLY for _ in conversations]


_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an the of to in on at for by with and or but is are was were be been being do does did it its this that "
    "these those what which who whom how why when where i you he she we they me my your can could would should "
    "will as from about into than then so if not no yes any one option options choice answer question mean means "
    "please tell explain".split()
)


def tokens(text: str) -> list[str]:
    """Lowercase content words with a crude plural/suffix strip (deterministic, no NLP dependency)."""
    out = []
    for w in _WORD.findall(text.lower()):
        if w in _STOP or len(w) < 2:
            continue
        for suffix in ("ies", "es", "s"):
            if len(w) > 4 and w.endswith(suffix):
                w = w[: -len(suffix)] + ("y" if suffix == "ies" else "")
                break
        out.append(w)
    return out


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", re.sub(r"\s+", " ", text.strip()))
    return [p.strip() for p in parts if len(p.strip()) > 1]


def bm25_scores(query: list[str] | Counter, docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each doc for the query, IDF from these docs alone (one task's sentences). A ``Counter`` query
    weighs its terms (a term's contribution times its weight); a list counts each distinct term once."""
    weights = query if isinstance(query, Counter) else Counter(set(query))
    n = len(docs)
    if n == 0:
        return []
    avg = sum(len(d) for d in docs) / n or 1.0
    df = Counter(w for d in docs for w in set(d))
    scores = []
    for d in docs:
        tf = Counter(d)
        s = 0.0
        for w, weight in weights.items():
            if w not in tf:
                continue
            idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
            s += weight * idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(d) / avg))
        scores.append(s)
    return scores


_LETTER_MENTION = re.compile(r"(?:\b(?:option|choice)\s+([A-D])\b|\(([A-D])\)|\b([A-D])\)|\b([B-D])\b)", re.I)


def referenced_options(question: str, choices: Sequence[str]) -> list[int]:
    """Indices of the options a student question names, by letter or by (part of) its text."""
    found: list[int] = []
    for m in _LETTER_MENTION.finditer(question):
        letter = next(g for g in m.groups() if g).upper()
        if m.group(4) and not m.group(4).isupper():  # a lowercase bare "b"/"c"/"d" is a word, not a letter
            continue
        idx = LETTERS.index(letter)
        if idx not in found:
            found.append(idx)
    q = f" {' '.join(tokens(question))} "
    for i, c in enumerate(choices):
        ct = " ".join(tokens(c))
        if ct and f" {ct} " in q and i not in found:
            found.append(i)
    return found


BLANK = "____"


def blank_text(sentence: str, pattern: re.Pattern[str]) -> str:
    """``sentence`` with every match of ``pattern`` replaced by :data:`BLANK`."""
    return pattern.sub(BLANK, sentence)


class RetrievalTeacher(Teacher):
    """Answers from the task's hidden knowledge by BM25 sentence ranking (see the module docstring).

    The query weighs the text of the options the student names 2 (the reply should be about the option asked about),
    the student's own words 1 and the task question's words 0.5 (so that, when the student's words are vague, the
    sentences relevant to the question rank first). ``top_k`` best sentences with a positive score are returned in their
    original order, cut to ``max_words``. ``hide_gold_text`` keeps the answer out of every reply:
    ``hide_mode="blank"`` (default) replaces the gold option's text, in any inflection, by ``____`` in the chosen
    sentences — the sentence that explains the answer stays useful without naming it; ``"drop"`` leaves out every
    sentence quoting the gold text (the older behaviour, which leaves little to say on most questions). With no
    usable sentence the reply points at the option asked about without judging it (counted in ``fallbacks``).
    """

    kind: TeacherKind = "retrieval"

    def __init__(
        self,
        top_k: int = 2,
        max_words: int = 60,
        hide_gold_text: bool = True,
        hide_mode: Literal["blank", "drop"] = "blank",
    ):
        if hide_mode not in ("blank", "drop"):
            raise ValueError(f"hide_mode must be 'blank' or 'drop', got {hide_mode!r}")
        self.top_k = top_k
        self.max_words = max_words
        self.hide_gold_text = hide_gold_text
        self.hide_mode = hide_mode
        self.fallbacks = 0  # replies made without a knowledge sentence (counted, reported in meta)

    def describe(self) -> str:
        return "retrieval" if self.hide_mode == "drop" or not self.hide_gold_text else "retrieval:blank"

    def answer(self, task: QATask, question: str) -> tuple[str, bool]:
        """``(reply, used_knowledge)`` for one student question."""
        question, _ = prompts.split_instruction(question)
        refs = referenced_options(question, task.choices)
        query = Counter()
        for w in tokens(task.question):
            query[w] = 0.5
        for w in tokens(question):
            query[w] = 1.0
        for i in refs:
            for w in tokens(task.choices[i]):
                query[w] = 2.0
        sentences = split_sentences(task.knowledge or "")
        gold_text = task.choices[LETTERS.index(task.gold)]
        gold = option_pattern(gold_text) if self.hide_gold_text else None
        if gold is None:
            usable = sentences
        elif self.hide_mode == "blank":
            usable = [blank_text(s, gold) for s in sentences]
        else:  # any inflection counts: "zygospores" gives "a zygospore" away as much as the exact text does
            usable = [s for s in sentences if not gold.search(s)]
        scores = bm25_scores(query, [tokens(s) for s in usable])
        ranked = sorted((i for i, sc in enumerate(scores) if sc > 0), key=lambda i: (-scores[i], i))[: self.top_k]
        if ranked:
            words: list[str] = []
            for i in sorted(ranked):
                words.extend(usable[i].split())
                if len(words) >= self.max_words:
                    break
            text = " ".join(words[: self.max_words])
            return ("Good question. " + text if text[-1:] in ".!?" else "Good question. " + text + " ..."), True
        if refs:
            # the same words whichever option was named: quoting the option back only when it is not the gold one
            # (the gold text is never written) would tell the student which one is
            return (
                f"Good question. Think about what option {LETTERS[refs[0]]} means and whether it matches exactly "
                "what the question asks."
            ), False
        return (
            "Good question. Look at the key words of the question and check each option against them one by one."
        ), False

    def reply(self, tasks, conversations, *, seed=0):
        out = []
        for task, conv in zip(tasks, conversations, strict=True):
            text, used = self.answer(task, _last_student_turn(conv))
            self.fallbacks += not used
            out.append(text)
        return out


class OpenTeacher(Teacher):
    """Open mode's clarifying teacher: it answers questions, and only questions (docs/simulate.md#open-mode).

    When the student's turn holds a question (a sentence ending in "?"; with several, the first), the reply is the
    ``top_k`` knowledge sentences that BM25 ranks highest against *that question's* words alone — not the task's
    question, not the options, which this teacher never sees — in their original order, cut to ``max_words``, with
    nothing blanked: what the notes say about what was asked. A turn without a question gets :data:`ASK_FOR_QUESTION`;
    a question that shares no content word with the notes gets :data:`NOTHING_ON_THAT`. Both are counted
    (``no_question``, ``no_match``). So information reaches the student only through a question, and a question
    that names what the problem is about earns more of it than a generic one ("Can you give me a hint?").
    """

    kind: TeacherKind = "open"
    ASK_FOR_QUESTION = prompts.OPEN_ASK_FOR_QUESTION
    NOTHING_ON_THAT = prompts.OPEN_NOTHING_ON_THAT

    def __init__(self, top_k: int = 2, max_words: int = 60):
        if top_k < 1 or max_words < 1:
            raise ValueError(f"top_k and max_words must be >= 1, got {top_k}, {max_words}")
        self.top_k = top_k
        self.max_words = max_words
        self.no_question = 0  # turns without a question (answered with ASK_FOR_QUESTION)
        self.no_match = 0  # questions the notes say nothing about (answered with NOTHING_ON_THAT)

    def describe(self) -> str:
        return "open"

    def answer(self, task: QATask, student_turn: str) -> str:
        """The reply to one student turn (see the class docstring)."""
        text, _ = prompts.split_instruction(student_turn)
        asked = questions_in(text)
        if not asked:
            self.no_question += 1
            return self.ASK_FOR_QUESTION
        sentences = split_sentences(task.knowledge or "")
        scores = bm25_scores(tokens(asked[0]), [tokens(s) for s in sentences])
        ranked = sorted((i for i, sc in enumerate(scores) if sc > 0), key=lambda i: (-scores[i], i))[: self.top_k]
        if not ranked:
            self.no_match += 1
            return self.NOTHING_ON_THAT
        words: list[str] = []
        for i in sorted(ranked):
            words.extend(sentences[i].split())
        reply = " ".join(words[: self.max_words])
        return reply if len(words) <= self.max_words else reply + " ..."

    def reply(self, tasks, conversations, *, seed=0):
        return [self.answer(t, _last_student_turn(c)) for t, c in zip(tasks, conversations, strict=True)]


class LLMTeacher(Teacher):
    """An LLM answers each student question (paper's teacher prompt) through a :class:`ChatBackend`.

    ``show_gold`` tells the teacher the correct answer (with the instruction never to reveal it — the paper's
    teacher "never gives away the answer", which presumes it knows it); ``show_knowledge`` adds the task's hidden
    notes. Empty replies are retried once with sampling, then replaced by the scripted nudge and counted.
    """

    kind: TeacherKind = "llm"

    def __init__(
        self,
        backend: ChatBackend,
        *,
        temperature: float = 0.0,
        max_new_tokens: int = 96,
        show_gold: bool = True,
        show_knowledge: bool = True,
    ):
        self.backend = backend
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.show_gold = show_gold
        self.show_knowledge = show_knowledge
        self.empty_replies = 0

    def describe(self) -> str:
        return f"llm:{self.backend.name}"

    def reply(self, tasks, conversations, *, seed=0):
        requests = [
            prompts.teacher_request(
                t, _last_student_turn(c), show_gold=self.show_gold, show_knowledge=self.show_knowledge
            )
            for t, c in zip(tasks, conversations, strict=True)
        ]
        replies = self.backend.chat(
            requests, temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=seed
        )
        empty = [i for i, r in enumerate(replies) if not r.strip()]
        if empty:
            again = self.backend.chat(
                [requests[i] for i in empty],
                temperature=max(self.temperature, 0.7),
                max_new_tokens=self.max_new_tokens,
                seed=derive_seed(seed, "retry"),
            )
            for i, r in zip(empty, again, strict=True):
                replies[i] = r
        for i, r in enumerate(replies):
            if not r.strip():
                self.empty_replies += 1
                log.warning("teacher gave an empty reply for %s twice; using the scripted nudge", tasks[i].task_id)
                replies[i] = prompts.SCRIPTED_CLARIFY_REPLY
        return replies


def make_teacher(kind: TeacherKind, *, backend: ChatBackend | None = None, **options) -> Teacher:
    """Build a teacher by name; ``llm`` needs a ``backend``."""
    if kind == "scripted":
        return ScriptedTeacher()
    if kind == "retrieval":
        return RetrievalTeacher(**options)
    if kind == "open":
        return OpenTeacher(**options)
    if kind == "llm":
        if backend is None:
            raise ValueError("teacher 'llm' needs a backend (a local HF model or an OpenAI-compatible endpoint)")
        return LLMTeacher(backend, **options)
    raise ValueError(f"teacher must be one of scripted, retrieval, open, llm; got {kind!r}")
