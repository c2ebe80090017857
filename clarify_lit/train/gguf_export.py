"""GGUF export: a trained policy as one file that llama.cpp, its Python server and Ollama load.

``clarify export --format gguf`` (:func:`export_gguf`) merges the LoRA into the base weights
(:func:`~clarify_lit.train.export.export_merged`, into a temp folder) and writes that merged model as GGUF with the
``gguf`` package (llama.cpp's own Python library, already a dependency: the embedded model is read with it). The
conversion does what llama.cpp's ``convert_hf_to_gguf.py`` does for a Llama-architecture model
(:func:`write_llama_gguf`): the ``llama`` hyper-parameters, the tensors under llama.cpp's names
(``gguf.get_tensor_name_map``) with the query/key rows permuted to llama.cpp's rotary layout, the byte-level BPE
vocabulary with token types, merges, special tokens and the chat template (``gguf.SpecialVocab``). Only what this
project trains is accepted (``model_type: llama``: SmolLM2, Llama, the tiny test model); another architecture is
refused with the way out (llama.cpp's converter on the ``--merge true`` folder).

**Pre-tokenizer.** llama.cpp splits text before BPE with a named regex (``tokenizer.ggml.pre``). It is read from the
tokenizer the policy was trained with: a plain byte-level pre-tokenizer is llama.cpp's ``gpt-2``; digits split one by
one before it (SmolLM's hub tokenizer) is ``smollm``. Anything else is refused, since a wrong regex would make the
served model read its prompts as other tokens than it was trained on. (The embedded SmolLM2's tokenizer, as
transformers rebuilds it from the GGUF, is the plain one, so its exports say ``gpt2``.)

Checked: the default suite reads an export back with ``gguf.GGUFReader`` and compares every tensor with the merged
weights (tests/test_gguf_export.py); ``make test-server`` serves an export with ``llama_cpp.server`` and runs
``clarify evaluate --policy_endpoint`` against it (tests/test_server.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clarify_lit.base_reference import write_export_metadata
from clarify_lit.io import build_into
from clarify_lit.train.export import earlier_export_files, export_merged

log = logging.getLogger(__name__)

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
#: the GGUF weight file of an export folder (``{type}`` is the --gguf_type)
GGUF_FILE = "model.{type}.gguf"
MODELFILE = "Modelfile"


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF by this converter (the message says why and what to do instead)."""


def llama_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a ``tokenizer.json`` (module docstring), or :class:`GGUFExportError`."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1:] and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True)
    if byte_level and len(steps) == 1 and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    if byte_level and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise GGUFExportError(
        f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name this exporter knows (it "
        "knows byte-level BPE, alone or after single digits); convert the --merge true export with "
        "llama.cpp's convert_hf_to_gguf.py instead"
    )


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Query/key rows from the HF rotary layout (halves) to llama.cpp's (interleaved pairs), as its converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocabulary(tokenizer, n_vocab: int, gguf) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t.special for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows beyond the tokenizer (padding)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = by_id[i]
        tokens.append(t)
        if t in added:
            types.append(gguf.TokenType.CONTROL if added[t] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_llama_gguf(
    folder: str | Path, path: str | Path, gguf_type: GGUFType = "f16", name: str | None = None
) -> Path:
    """Write the ``transformers`` Llama folder ``folder`` (model + tokenizer) as the GGUF file ``path``."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder, path = Path(folder), Path(path)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llama":
        raise GGUFExportError(
            f"{folder}: model_type {config.model_type!r}: this exporter writes Llama-architecture "
            "models only; convert the --merge true export with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise GGUFExportError(
            f"{folder}: rope scaling {rope} is not written by this exporter; use llama.cpp's "
            "convert_hf_to_gguf.py on the --merge true export"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError(
            f"{folder}: biases in attention/MLP are not written by this exporter; use llama.cpp's "
            "convert_hf_to_gguf.py on the --merge true export"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pre = llama_pre_tokenizer(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[gguf_type]

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name or folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype)
    tokens, types = _vocabulary(tokenizer, config.vocab_size, gguf)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if tokenizer.chat_template and "tokenizer.chat_template" not in writer.kv_data[0]:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise GGUFExportError(f"{folder}: no *.safetensors weights to convert")
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(
                f"{folder}: tensor {hf_name!r} has no llama.cpp name; use llama.cpp's "
                "convert_hf_to_gguf.py on the --merge true export"
            )
        data = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(new, np.ascontiguousarray(data, dtype=np.float32))
            continue
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(new, data.astype(np.float16))
            continue
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(new, packed, raw_shape=packed.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def serving_section(gguf_name: str, model_name: str) -> str:
    """The model card's "How to serve" section for the GGUF file ``gguf_name``."""
    return "\n".join(
        [
            "## How to serve (GGUF)",
            "",
            f"`{gguf_name}` is this policy as one GGUF file: llama.cpp, its Python server and Ollama load it.",
            "",
            'llama-cpp-python\'s OpenAI-compatible server (`pip install "llama-cpp-python[server]"`):',
            "",
            "```bash",
            f"python -m llama_cpp.server --model {gguf_name} --host 127.0.0.1 --port 8765 --chat_format chatml "
            f"--model_alias {model_name}",
            "```",
            "",
            "llama.cpp's own server: `llama-server -m " + gguf_name + " --host 127.0.0.1 --port 8765`. "
            "Ollama: `ollama create " + model_name + " -f Modelfile` (the `Modelfile` beside this card), then "
            "`ollama run " + model_name + "`; its OpenAI-compatible API is `http://127.0.0.1:11434/v1`.",
            "",
            "Then roll the policy out, or log new data with it, through the endpoint:",
            "",
            "```bash",
            "clarify evaluate --policy_endpoint.base_url http://127.0.0.1:8765/v1 --policy_endpoint.model "
            f"{model_name} ...",
            "clarify iterate --policy_endpoint.base_url http://127.0.0.1:8765/v1 ...   # docs/iterate.md",
            "```",
            "",
        ]
    )


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file (ChatML, the chat format every clarify policy was trained in)."""
    return "\n".join(
        [
            f"FROM ./{gguf_name}",
            'TEMPLATE """{{ if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}{{ range .Messages }}<|im_start|>{{ .Role }}",
            "{{ .Content }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '"""',
            'PARAMETER stop "<|im_end|>"',
            "PARAMETER temperature 0",
            "",
        ]
    )


def export_gguf(
    module,
    folder: str | Path,
    gguf_type: GGUFType = "f16",
    *,
    run_dir: Path | None = None,
    checkpoint: dict | None = None,
) -> Path:
    """Write ``module``'s policy (LoRA merged) as ``folder``/``model.<gguf_type>.gguf`` with a model card that says
    how to serve it, an Ollama ``Modelfile`` and ``clarify_export.json``; returns the folder."""
    folder = Path(folder)
    gguf_name = GGUF_FILE.format(type=gguf_type)
    model_name = (run_dir.name if run_dir is not None else folder.name) or "clarify-policy"
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=folder.parent if folder.parent.exists() else None) as tmp:
        merged = export_merged(module, Path(tmp) / "merged", "float32", run_dir=run_dir, checkpoint=checkpoint)

        def build(out: Path) -> None:
            write_llama_gguf(merged, out / gguf_name, gguf_type, name=model_name)
            card = (merged / "README.md").read_text(encoding="utf-8")
            head, sep, rest = card.partition("## How to load")
            rest = rest[rest.find("\n## ") :] if sep else ""
            (out / "README.md").write_text(
                head + serving_section(gguf_name, model_name) + rest.lstrip("\n"), encoding="utf-8"
            )
            (out / MODELFILE).write_text(modelfile(gguf_name), encoding="utf-8")
            meta = json.loads((merged / "clarify_export.json").read_text(encoding="utf-8"))
            meta.update(
                format="gguf",
                gguf_file=gguf_name,
                gguf_type=gguf_type,
                files=sorted([gguf_name, "README.md", MODELFILE, "clarify_export.json"]),
            )
            write_export_metadata(out, meta)

        build_into(folder, build, replace=earlier_export_files(folder))
        shutil.rmtree(merged, ignore_errors=True)
    log.info("exported the policy as GGUF (%s) to %s", gguf_type, folder / gguf_name)
    return folder
