"""Is an accuracy gain a drift to one letter? Accuracy on the questions whose gold is A vs the others, per method.

On these SciQ test questions every policy favours A (the first option line), and always answering A scores 0.20
(the gold-A share). A method that only answers A more often gains on the 20 gold-A questions and nothing elsewhere;
one that learned something gains on the 80 others too. Reads the committed rollouts (`results/*-rollouts`).

Usage: python experiments/letter_audit.py ROLLOUTS_DIR [ROLLOUTS_DIR ...] [--out OUT_JSON]
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from clarify_lit.data.records import load_records
from clarify_lit.evaluate.metrics import final_answer


def audit(folder: Path) -> dict:
    by_method: dict[str, list] = defaultdict(list)
    for f in sorted(folder.glob("seed*-*.jsonl.gz")):
        method = f.name.removesuffix(".jsonl.gz").split("-", 1)[1]
        if method != "logged":
            by_method[method] += load_records(f)[0]
    out = {}
    for method, recs in by_method.items():
        # re-parse with the current parser (the stored prediction is the parse at rollout time: issue 25)
        for r in recs:
            r.prediction = final_answer(r)
        gold_a = [r for r in recs if r.gold == "A"]
        other = [r for r in recs if r.gold != "A"]
        out[method] = {
            "conversations": len(recs),
            "accuracy": sum(r.prediction == r.gold for r in recs) / len(recs),
            "answers_A": sum(r.prediction == "A" for r in recs) / len(recs),
            "correct_on_gold_A": sum(r.prediction == r.gold for r in gold_a),
            "gold_A": len(gold_a),
            "correct_on_other": sum(r.prediction == r.gold for r in other),
            "other": len(other),
        }
    return out


def main(argv: list[str]) -> None:
    out_path = None
    if "--out" in argv:
        i = argv.index("--out")
        out_path, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    result = {}
    for folder in map(Path, argv):
        result[folder.name] = audit(folder)
        print(
            f"\n{folder.name}\n\n| Method | conversations | accuracy | answers A | correct, gold A | correct, gold "
            f"B/C/D |"
        )
        print("|---|---|---|---|---|---|")
        for m, a in result[folder.name].items():
            print(
                f"| {m} | {a['conversations']} | {a['accuracy']:.3f} | {a['answers_A']:.2f} | "
                f"{a['correct_on_gold_A']}/{a['gold_A']} | {a['correct_on_other']}/{a['other']} |"
            )
    if out_path:
        out_path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
