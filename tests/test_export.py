"""Exports a user can take elsewhere: the portable base name, ``clarify_export.json``, the model card filled from the
run, the merged standalone export and ``clarify export`` from a checkpoint.

One tiny ``clarify fit`` (module scope) trains on records that sit in a ``clarify simulate``-like folder, under the
name ``embedded:smollm2-135m-instruct`` — resolved to the tiny random model here (``ensure_embedded_smollm2`` is
patched), so the export goes through the embedded model's portable naming without the 135M download.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_record

from clarify_lit import models
from clarify_lit.cli import lightning_main, main
from clarify_lit.data.records import write_records
from clarify_lit.models import EMBEDDED_SMOLLM2, export_base, load_export

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
PROMPTS = ["Which gas do plants absorb?", "The answer is", "Why might some options be incorrect?"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, cache_root, tiny_model_dir):
    """``(cli, run folder)`` of a 3-step Refit fit with ``--model.export_merged true`` and a high learning rate (the
    adapter must move far enough for the merged-vs-adapter comparisons to mean something)."""
    tmp = tmp_path_factory.mktemp("export")
    sim = tmp / "simulate"
    rows = []
    for t in range(4):
        for r in range(3):
            rec = make_record(t, r, [1.0, 0.0, 0.5][r])
            rec["meta"].update(teacher="scripted", reward="correct", model=EMBEDDED_SMOLLM2, setting="reasoning")
            rows.append(rec)
    records = write_records(sim / "conversations.jsonl", rows)
    (sim / "summary.json").write_text(
        json.dumps({"tasks": 4, "conversations": 12, "mean_reward": 0.5, "teacher": "scripted"})
    )
    (sim / "run_config.json").write_text(
        json.dumps({"config": {"model": EMBEDDED_SMOLLM2, "reward": {"kind": "correct"}}, "task_ids": []})
    )
    root = tmp / "run"
    # what the RolloutEvaluation callback leaves in a run folder (its own tests cover writing it)
    (root / "rollouts").mkdir(parents=True)
    (root / "rollouts" / "step_000003.metrics.json").write_text(
        json.dumps(
            {
                "metrics": {"accuracy": 0.75, "accuracy_se": 0.2, "reward": 0.625},
                "meta": {"step": 3, "n_questions": 4, "dataset": "toy", "teacher": "scripted", "reward": "correct"},
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLARIFY_CACHE", str(cache_root))
        mp.setattr(models, "ensure_embedded_smollm2", lambda: tiny_model_dir)
        cli = lightning_main(
            [
                "fit",
                *QUIET,
                f"--model.model_name_or_path={EMBEDDED_SMOLLM2}",
                f"--data.train_files=[{records}]",
                "--data.batch_size=2",
                "--data.val_fraction=0.25",
                "--trainer.max_steps=3",
                "--trainer.val_check_interval=3",
                "--trainer.log_every_n_steps=1",
                f"--trainer.default_root_dir={root}",
                "--model.learning_rate=5e-2",
                "--model.lora_dropout=0.0",
                "--model.export_merged=true",
            ]
        )
    return cli, root


@pytest.fixture
def embedded_is_tiny(monkeypatch, clarify_cache, tiny_model_dir):
    monkeypatch.setattr(models, "ensure_embedded_smollm2", lambda: tiny_model_dir)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def token_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = token_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


# ------------------------------------------------------------------------------------------------ portable base
def test_adapter_names_the_hub_id_and_keeps_the_local_resolution(fitted, tiny_model_dir, cache_root):
    _, root = fitted
    export = root / "export"
    adapter_config = (export / "adapter_config.json").read_text()
    assert json.loads(adapter_config)["base_model_name_or_path"] == HUB_ID
    assert str(cache_root) not in adapter_config  # nothing of this machine's cache is named
    meta = json.loads((export / "clarify_export.json").read_text())
    assert meta["base_model"] == HUB_ID and meta["base_model_spec"] == EMBEDDED_SMOLLM2
    assert meta["base_model_local_path"] == str(tiny_model_dir.resolve())
    assert meta["format"] == "adapter" and meta["dtype"] == "float32" and meta["global_step"] == 3
    assert "Q4_1" in meta["base_model_note"]


def test_export_copied_elsewhere_loads_its_base_offline(fitted, embedded_is_tiny, monkeypatch, tmp_path):
    cli, root = fitted
    copy = shutil.copytree(root / "export", tmp_path / "elsewhere")

    def no_hub(repo_id):
        raise AssertionError(f"the hub was consulted for {repo_id} although clarify_export.json names the base")

    monkeypatch.setattr(models, "hub_model_available", no_hub)
    model, tokenizer, base = load_export(copy)
    assert base == EMBEDDED_SMOLLM2
    ids = token_ids(tokenizer, PROMPTS[0])
    module = cli.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-5)
    assert models.policy_base(str(copy)) == EMBEDDED_SMOLLM2  # the teacher/judge default, offline too
    main(
        [
            "evaluate",
            "--export_dir",
            str(copy),
            "--out_dir",
            str(tmp_path / "eval"),
            "--data.dataset",
            "local",
            "--data.path",
            str(REPO / "configs/simulate/tiny-tasks.jsonl"),
            "--data.n_train",
            "0",
            "--data.n_test",
            "2",
            "--data.columns",
            '{"question": "question", "choices": "choices", "answer": "answer", "id": "id"}',
            "--rollout.max_new_tokens",
            "2",
            "--progress",
            "false",
        ]
    )
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]["base_model"] == EMBEDDED_SMOLLM2

    # without the metadata (an export edited by hand, or written by an older version): the hub id maps back to the
    # embedded model only when the hub copy is neither cached nor reachable
    (copy / "clarify_export.json").unlink()
    monkeypatch.setattr(models, "hub_model_available", lambda repo_id: False)
    assert export_base(copy, HUB_ID) == EMBEDDED_SMOLLM2
    monkeypatch.setattr(models, "hub_model_available", lambda repo_id: True)
    assert export_base(copy, HUB_ID) == HUB_ID
    # an adapter config pointing elsewhere wins over metadata about another base
    assert export_base(root / "export", "some-org/another-model") == "some-org/another-model"


def test_training_continues_from_the_portable_export(fitted, embedded_is_tiny):
    """``--model.init_adapter <export>`` (clarify iterate --init continue) accepts the hub id the export names."""
    from clarify_lit.train.module import ClarifyModule

    cli, root = fitted
    module = ClarifyModule(EMBEDDED_SMOLLM2, init_adapter=str(root / "export"), lora_dropout=0.0)
    trained = {n: p for n, p in cli.model.named_parameters() if "lora_" in n}
    loaded = dict(module.named_parameters())
    assert trained and all(torch.equal(loaded[n], p) for n, p in trained.items())


def test_compare_bases_measures_the_difference(tiny, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from clarify_lit.base_reference import DEFAULT_PROMPTS, compare_bases

    model, tokenizer = tiny
    same = compare_bases(model, model, tokenizer, DEFAULT_PROMPTS[:3], max_new_tokens=4)
    assert same == {"mean_abs_logit_diff": 0.0, "argmax_agreement": 1.0, "greedy_agreement": 1.0, "n_prompts": 3.0}
    other = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        other.lm_head.weight.add_(0.05 * torch.randn_like(other.lm_head.weight))
    apart = compare_bases(model, other, tokenizer, DEFAULT_PROMPTS[:3], max_new_tokens=4)
    assert apart["mean_abs_logit_diff"] > 0 and 0 <= apart["argmax_agreement"] <= 1
    assert len(DEFAULT_PROMPTS) == 20


def test_unreadable_metadata_is_named(tmp_path):
    (tmp_path / "clarify_export.json").write_text("{not json")
    with pytest.raises(ValueError, match="clarify_export.json: not valid JSON"):
        export_base(tmp_path, HUB_ID)


# ------------------------------------------------------------------------------------------------ model card
def test_model_card_is_filled_from_the_run(fitted):
    import peft
    import transformers

    _, root = fitted
    card = (root / "export" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == HUB_ID and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"clarify_lit", "refit", "lora"} <= set(meta["tags"]) and meta["datasets"] == ["toy"]
    assert "More Information Needed" not in card
    # objective, LoRA and optimiser settings
    assert "| objective | Refit |" in card and "| learning_rate | 0.05 |" in card and "| lora_r | 8 |" in card
    # training: steps and the final losses logged by the trainer
    assert "| global_step | 3 |" in card and "| train/loss_epoch |" in card and "| val/loss |" in card
    # data: counts from the records (9 conversations of 3 tasks train, 1 task held out: the file has all 12)
    assert "| conversations | 12 |" in card and "| questions (task ids) | 4 |" in card
    assert '| teacher | `["scripted"]` |' in card and '| reward kind | `["correct"]` |' in card
    assert f"Simulation folder `{root.parent / 'simulate'}`" in card and "| mean_reward | 0.5 |" in card
    # the rollout evaluation of the run, the command and the libraries
    assert "at step 3 on 4 held-out questions" in card and "| accuracy | 0.75 |" in card
    assert f"clarify fit --config {root / 'config.yaml'}" in card and "model_name_or_path: embedded:" in card
    assert f"| transformers | {transformers.__version__} |" in card and f"| peft | {peft.__version__} |" in card
    # the embedded base: what it is, and that the difference to the hub weights was not measured here
    assert "dequantized" in card and "Not measured" in card
    assert "## Intended use and limitations" in card


def test_card_without_run_facts_says_what_is_missing(clarify_cache, tmp_path):
    """An export of a bare module (no fit, no run folder) still gets a card, with no evaluation and no placeholder."""
    from clarify_lit.train.export import write_export
    from clarify_lit.train.module import ClarifyModule

    module = ClarifyModule("tiny-random", lora_r=2)
    write_export(module, tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    meta = front_matter(card)
    assert Path(meta["base_model"]).is_dir() and "license" not in meta  # tiny-random: its folder, no known licence
    assert "no rollout evaluation" in card and "More Information Needed" not in card and "## Data" not in card


# ------------------------------------------------------------------------------------------------ merged export
def test_merged_export_loads_with_transformers_alone_and_matches_the_adapter(fitted, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, root = fitted
    merged_dir = root / "export_merged"
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "clarify_export.json",
    ):
        assert (merged_dir / name).exists(), name
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(root / "export")
    ).eval()
    for prompt in PROMPTS:
        ids = token_ids(tokenizer, prompt)
        with torch.no_grad():
            got, want, untrained = (m(input_ids=ids).logits for m in (merged, adapter, base))
        assert torch.allclose(got, want, atol=1e-5), prompt
        assert (got - untrained).abs().max() > 1e-2, "the adapter did not move: the comparison would be vacuous"
        assert greedy(merged, tokenizer, prompt) == greedy(adapter, tokenizer, prompt)
    assert front_matter((merged_dir / "README.md").read_text())["library_name"] == "transformers"
    assert json.loads((merged_dir / "clarify_export.json").read_text())["format"] == "merged"


# ------------------------------------------------------------------------------------------------ clarify export
def test_clarify_export_from_the_run_checkpoint(fitted, embedded_is_tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    _, root = fitted
    main(
        [
            "export",
            "--run_dir",
            str(root),
            "--merge",
            "true",
            "--dtype",
            "bfloat16",
            "--out_dir",
            str(tmp_path / "bf16"),
        ]
    )
    assert "merged model" in capsys.readouterr().out
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    card = (tmp_path / "bf16" / "README.md").read_text()
    assert "| global_step | 3 |" in card and "| train/loss_step |" in card  # step from the checkpoint, loss from TB
    assert "| dtype of this export | bfloat16 |" in card

    main(["export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--out_dir", str(tmp_path / "adapter")])
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    at_fit_end = load_file(root / "export" / "adapter_model.safetensors")
    assert again.keys() == at_fit_end.keys() and all(torch.equal(again[k], at_fit_end[k]) for k in again)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "exactly one of --run_dir"),
        (["--run_dir", "a", "--ckpt_path", "b"], "exactly one of --run_dir"),
        (["--run_dir", "no/such/run"], "checkpoint not found: no/such/run/checkpoints/last.ckpt"),
    ],
)
def test_clarify_export_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", *args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_clarify_export_dtype_needs_merge(fitted, capsys):
    _, root = fitted
    with pytest.raises(SystemExit):
        main(["export", "--run_dir", str(root), "--dtype", "float16"])
    assert "--dtype applies to --merge true" in capsys.readouterr().err


# ------------------------------------------------------------------------------- an occupied folder (issue 29)
def evaluation_folder(folder: Path) -> dict[str, str]:
    """Another run's evaluation folder with an unrelated note: what `clarify export` must never delete."""
    files = {"metrics.json": '{"metrics": {"accuracy": 0.5}}', "rollouts.jsonl": '{"id": "t0"}\n', "notes.txt": "mine"}
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_clarify_export_refuses_an_occupied_folder_and_overwrite_keeps_other_files(
    fitted, embedded_is_tiny, tmp_path, capsys, merge
):
    _, root = fitted
    out = tmp_path / "eval"
    files = evaluation_folder(out)
    args = ["export", "--run_dir", str(root), "--merge", str(merge).lower(), "--out_dir", str(out)]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"--out_dir {out} is not empty (metrics.json, notes.txt, rollouts.jsonl)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # nothing written, nothing removed

    main([*args, "--overwrite", "true"])
    for name, text in files.items():  # every file the export did not write is still there, unchanged
        assert (out / name).read_text() == text
    weights = "model.safetensors" if merge else "adapter_model.safetensors"
    meta = json.loads((out / "clarify_export.json").read_text())
    assert weights in meta["files"] and not set(files) & set(meta["files"])
    assert sorted(p.name for p in out.iterdir()) == sorted(set(files) | set(meta["files"]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_an_export_over_an_earlier_export_replaces_only_its_files(fitted, embedded_is_tiny, tmp_path):
    """A merged export over an adapter export (with a note beside it): the adapter's files go, the note stays, and
    the folder holds one model, not two."""
    _, root = fitted
    out = tmp_path / "export"
    main(["export", "--run_dir", str(root), "--out_dir", str(out)])
    adapter_files = json.loads((out / "clarify_export.json").read_text())["files"]
    assert "adapter_model.safetensors" in adapter_files
    (out / "notes.txt").write_text("mine")
    main(["export", "--run_dir", str(root), "--merge", "true", "--out_dir", str(out), "--overwrite", "true"])
    merged_files = json.loads((out / "clarify_export.json").read_text())["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*merged_files, "notes.txt"])
    assert not (out / "adapter_model.safetensors").exists() and (out / "notes.txt").read_text() == "mine"


def test_a_safetensors_full_disk_error_names_the_folder(tiny_model_dir, tmp_path, monkeypatch):
    import clarify_lit.train.export as export
    from clarify_lit.train.module import ClarifyModule

    class SafetensorError(Exception):  # what safetensors raises on a full disk (no errno, no path)
        pass

    def disk_full(module, folder, *args):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(export, "_describe", disk_full)
    folder = tmp_path / "out"
    with pytest.raises(OSError, match=f"writing the merged export {folder} failed: Error while serializing"):
        export.export_merged(ClarifyModule(str(tiny_model_dir), lora_r=4), folder)
    assert list(tmp_path.iterdir()) == []
