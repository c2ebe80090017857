"""The ``clarify`` console script.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands over :class:`ClarifyModule` and
:class:`ConversationDataModule`; ``simulate``, ``evaluate`` and ``report`` are the pipeline's other stages.

Run layout: everything of one run lives in ``trainer.default_root_dir`` (default ``runs/default``):
``config.yaml``, ``checkpoints/last.ckpt``, TensorBoard events, ``export/`` (HF/PEFT folder written at fit end),
``rollouts/`` (evaluation callback). ``--ckpt_path last`` therefore finds the previous run's last checkpoint.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from clarify_lit.data.datamodule import ConversationDataModule
from clarify_lit.train.module import ClarifyModule

PIPELINE_COMMANDS = {
    "simulate": ("clarify_lit.simulate.command", "roll out conversations with a teacher and score them"),
    "evaluate": ("clarify_lit.evaluate.command", "roll out a base model, checkpoint or export on held-out questions"),
    "report": ("clarify_lit.evaluate.report", "compare evaluated runs: Markdown table, plot, paired tests"),
}
LIGHTNING_COMMANDS = {
    "fit": "train a policy on conversation records (Refit, Swift, SFT or DPO)",
    "validate": "run one validation pass",
    "test": "run one test pass",
    "predict": "run prediction",
}

DEFAULT_ROOT = "runs/default"


class ClarifyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one tokenizer: the model's
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        root = Path(config.get("default_root_dir") or DEFAULT_ROOT)
        config["default_root_dir"] = str(root)
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(save_dir=str(root), name="", version="", default_hp_metric=False)
        existing = config.get("callbacks") or []
        existing = existing if isinstance(existing, list) else [existing]
        if config.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in existing + callbacks):
            callbacks = [*callbacks, ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True,
                                                     save_top_k=0)]
        return super()._instantiate_trainer(config, callbacks)


def lightning_main(args: list[str] | None = None, run: bool = True) -> ClarifyCLI:
    return ClarifyCLI(
        ClarifyModule,
        ConversationDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # the DataModule's batch sampler shards across ranks itself (it must know optimizer-step boundaries)
        trainer_defaults={"use_distributed_sampler": False, "default_root_dir": DEFAULT_ROOT},
        parser_kwargs={"description": "clarify: reward-weighted fine-tuning (Refit/Swift/SFT/DPO) on conversations"},
    )


def usage() -> str:
    lines = ["usage: clarify <command> [options]   (clarify <command> --help for each)", "",
             "Pipeline: simulate → fit → evaluate → report", "", "commands:"]
    for name, (_, text) in PIPELINE_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, text in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in PIPELINE_COMMANDS:
        module = importlib.import_module(PIPELINE_COMMANDS[argv[0]][0])
        module.main(argv[1:])
        return
    if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        print(f"clarify: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    lightning_main(argv)


if __name__ == "__main__":
    main()
