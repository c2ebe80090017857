"""GGUF export (train/gguf_export.py): the tiny model written as GGUF reads back with ``gguf.GGUFReader`` and loads in
transformers' own GGUF reader with the same logits and tokens (the query/key permutation and the vocabulary are
right), and ``clarify export --format gguf`` of a tiny fit writes the merged policy with a card that says how to serve
it. Serving such a file with llama.cpp is the opt-in ``make test-server`` (tests/test_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_lora_fit

from clarify_lit.cli import main
from clarify_lit.train.gguf_export import GGUFExportError, _permute, llama_pre_tokenizer, write_llama_gguf

PROMPT = [{"role": "user", "content": "Which gas do plants absorb? The answer is"}]


def fields(path: Path) -> tuple[dict, dict]:
    """``(metadata, {tensor name: (type name, shape)})`` of a GGUF file, read with llama.cpp's own reader."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in ("tokens", "token_type", "merges"):
            meta[key] = field.contents()
        elif not key.startswith("GGUF."):
            meta[key] = field.contents()
    return meta, {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_tiny_model_round_trips_through_gguf(tiny_model_dir, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_llama_gguf(tiny_model_dir, tmp_path / f"tiny.{gguf_type}.gguf", gguf_type)
    meta, tensors = fields(path)
    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [hf_tok.convert_ids_to_tokens(i) for i in range(len(hf_tok))]
    assert meta["tokenizer.ggml.eos_token_id"] == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.chat_template"] == hf_tok.chat_template
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert len(tensors) == 2 * 9 + 3  # 9 per block, embeddings, final norm, output (untied)
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert tensors["blk.0.attn_q.weight"][0] == gguf_type.upper()
    # transformers reads GGUF with llama.cpp's layout undone: same tokens, same logits as the folder
    gg_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = hf_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert gg_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist() == ids.tolist()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = original(ids).logits, loaded(ids).logits
    tolerance = 1e-5 if gguf_type == "f32" else 0.05 * a.abs().max().item()  # f16, q8_0 (8-bit blocks) round
    assert torch.allclose(a, b, atol=tolerance), (a - b).abs().max()


def test_pre_tokenizers_it_knows_and_refuses():
    assert llama_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}],
    }
    assert llama_pre_tokenizer({"pre_tokenizer": smollm}) == "smollm"
    with pytest.raises(GGUFExportError, match="Metaspace.*convert_hf_to_gguf.py"):
        llama_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})


def test_another_architecture_is_refused_with_the_way_out(tiny_model_dir, tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="model_type 'gpt2'.*convert_hf_to_gguf.py"):
        write_llama_gguf(folder, tmp_path / "x.gguf")


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, cache_root, tiny_model_dir):
    """A 2-step Refit LoRA fit of the tiny model (its ``checkpoints/last.ckpt``)."""
    return tiny_lora_fit(tmp_path_factory.mktemp("gguf"), cache_root, tiny_model_dir)


def test_clarify_export_format_gguf_writes_the_merged_policy(fit_run, tiny_model_dir, clarify_cache, capsys):
    from safetensors.torch import load_file

    main(["export", "--run_dir", str(fit_run), "--format", "gguf", "--gguf_type", "f32"])
    out = fit_run / "export_gguf"
    assert f"GGUF file of {fit_run / 'checkpoints/last.ckpt'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "clarify_export.json", "model.f32.gguf"]
    card = (out / "README.md").read_text()
    assert "python -m llama_cpp.server --model model.f32.gguf" in card and "ollama create" in card
    assert "clarify evaluate --policy_endpoint.base_url" in card and "## How to load" not in card
    assert "FROM ./model.f32.gguf" in (out / "Modelfile").read_text()
    meta = json.loads((out / "clarify_export.json").read_text())
    assert meta["format"] == "gguf" and meta["gguf_file"] == "model.f32.gguf"
    # the GGUF holds the merged weights (not the base's): compare with the --merge true export of the same checkpoint
    main(["export", "--run_dir", str(fit_run), "--merge", "true", "--dtype", "float32"])
    merged = load_file(fit_run / "export_merged/model.safetensors")
    import gguf

    reader = gguf.GGUFReader(out / "model.f32.gguf")
    got = {t.name: np.array(t.data) for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = 0
    for name, weight in merged.items():
        want = weight.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary layout
            want = _permute(want, 4 if "q_proj" in name else 2)
        assert np.array_equal(got[names.get_name(name, try_suffixes=(".weight",))].reshape(want.shape), want), name
        moved += not torch.equal(weight, base[name])
    assert moved  # the trained adapter is in the file, not the base weights
    # another export into the same folder is refused without --overwrite (the export's usual rule)
    with pytest.raises(SystemExit):
        main(["export", "--run_dir", str(fit_run), "--format", "gguf"])
    assert "--overwrite true" in capsys.readouterr().err
