"""Collect real judge replies from a served model, for tests/fixtures/judge_replies_llama_cpp.json.

Sends the LLM judge's prompt (``prompts.judge_request``) for the conversations of a simulation to an OpenAI-compatible
server, greedy and sampled, and writes each raw reply with what ``parse_judge_scores`` reads in it::

    python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8765 --chat_format chatml \\
        --model_alias smollm2 &
    python scripts/collect_judge_replies.py runs/served/conversations.jsonl --base_url http://127.0.0.1:8765/v1 \\
        --model smollm2 --data.path configs/simulate/tiny-tasks.jsonl --out /tmp/judge_replies.json

The fixture's ``overall`` of each reply is then set by a person reading the reply (null where no score can be read
honestly); the test checks the parser against those readings, not against itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clarify_lit.data.records import load_records  # noqa: E402
from clarify_lit.data.tasks import load_tasks  # noqa: E402
from clarify_lit.simulate import prompts  # noqa: E402
from clarify_lit.simulate.judge_parsing import parse_judge_scores  # noqa: E402
from clarify_lit.simulate.teachers import EndpointChatBackend  # noqa: E402

COLUMNS = {"question": "question", "choices": "choices", "answer": "answer", "id": "id", "knowledge": "knowledge"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records")
    ap.add_argument("--base_url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data.path", dest="data_path", default=str(ROOT / "configs/simulate/tiny-tasks.jsonl"))
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    ap.add_argument("--max_new_tokens", type=int, default=160)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tasks = {
        t.task_id.rsplit("/", 1)[-1]: t
        for part in ("train", "test")
        for t in load_tasks("local", path=args.data_path, columns=COLUMNS, label="tiny", n_train=6, n_test=2, part=part)
    }
    records, _ = load_records(args.records)
    backend = EndpointChatBackend(args.base_url, args.model, timeout=600, concurrency=1)
    rows = []
    for temp in args.temperatures:
        requests = [prompts.judge_request(tasks[r.task_id.rsplit("/", 1)[-1]], r.messages) for r in records]
        for r, reply in zip(
            records, backend.chat(requests, temperature=temp, max_new_tokens=args.max_new_tokens, seed=7), strict=True
        ):
            parsed = parse_judge_scores(reply)
            rows.append(
                {"record": r.id, "temperature": temp, "reply": reply, "parsed_overall": (parsed or {}).get("overall")}
            )
    Path(args.out).write_text(json.dumps({"model": args.model, "replies": rows}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} replies to {args.out}")


if __name__ == "__main__":
    main()
