"""The ``clarify`` console script.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands over :class:`ClarifyModule` and
:class:`ConversationDataModule`; ``simulate``, ``evaluate`` and ``report`` are the pipeline's other stages, and
``iterate`` loops simulate → fit → evaluate over rounds.

Run layout: everything of one run lives in ``trainer.default_root_dir`` (default ``runs/default``):
``config.yaml``, ``checkpoints/last.ckpt``, TensorBoard events, ``export/`` (HF/PEFT folder written at fit end),
``rollouts/`` (evaluation callback). ``--ckpt_path last`` therefore finds the previous run's last checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clarify_lit import __version__
from clarify_lit.data.datamodule import ConversationDataModule
from clarify_lit.simulate.teachers import EndpointError
from clarify_lit.train import objectives
from clarify_lit.train.checkpointing import AtomicCheckpointIO, LastCheckpoint, ResumeState
from clarify_lit.train.module import ClarifyModule, NonFiniteLossError

# The one dispatch table: command → (the module whose ``main(argv)`` runs it, one line of ``clarify --help``).
# Modules are named, not imported: ``clarify <command>`` loads only what that command needs, and ``clarify iterate
# --in_process true`` runs its stages through :func:`main` (clarify_lit.stages) without an import cycle.
# fit/validate/test/predict are LightningCLI's subcommands, run by :func:`lightning_main` in this module.
COMMANDS = {
    "simulate": ("clarify_lit.simulate.command", "roll out conversations with a teacher and score them"),
    "fit": (__name__, "train a policy on conversation records (Refit, Swift, SFT, DPO, StepDPO or Distill)"),
    "validate": (__name__, "run one validation pass"),
    "test": (__name__, "run one test pass"),
    "predict": (__name__, "run prediction"),
    "evaluate": ("clarify_lit.evaluate.command", "roll out a base model, checkpoint or export on held-out questions"),
    "report": ("clarify_lit.evaluate.report", "compare evaluated runs: Markdown table, plot, paired tests"),
    "iterate": ("clarify_lit.iterate", "K rounds of simulate (current policy) → fit → evaluate; report by round"),
    "export": ("clarify_lit.train.export_command", "write a run's adapter, or a merged standalone model, from its "
               "checkpoint"),
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
            callbacks = [*callbacks, LastCheckpoint(dirpath=str(root / "checkpoints"), save_last=True,
                                                    save_top_k=0)]
        # interruption safety (docs/reliability.md): atomic checkpoint writes, RNG state in checkpoints, SIGTERM saves
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins) and \
                getattr(config.get("strategy"), "_checkpoint_io", None) is None:
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        if not any(isinstance(c, ResumeState) for c in existing + callbacks):
            callbacks = [*callbacks, ResumeState()]
        return super()._instantiate_trainer(config, callbacks)


class ClarifyArgumentParser(LightningArgumentParser):
    """A command-line mistake is reported in one line (``clarify: error: …``), not the whole usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"clarify: error: {_one_line_parse_error(message)} (see clarify <command> --help)\n")
        self.exit(2)


def objective_names() -> list[str]:
    """The objectives ``--model.objective`` accepts by name, in the order they are defined."""
    return [c.__name__ for c in vars(objectives).values() if isinstance(c, type)
            and issubclass(c, objectives.Objective) and c is not objectives.Objective
            and c.__module__ == objectives.__name__]


def _one_line_parse_error(message: str) -> str:
    text = " ".join(str(message).split())
    if text.startswith('Parser key "model.objective"'):
        m = re.search(r"Expected a path but (\S+) either", text)
        given = f" {m.group(1)!r}" if m else ""
        return f"--model.objective:{given} is not an objective; choose one of {', '.join(objective_names())}"
    return text


def lightning_main(args: list[str] | None = None, run: bool = True) -> ClarifyCLI:
    return ClarifyCLI(
        ClarifyModule,
        ConversationDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # the DataModule's batch sampler shards across ranks itself (it must know optimizer-step boundaries)
        trainer_defaults={"use_distributed_sampler": False, "default_root_dir": DEFAULT_ROOT},
        parser_kwargs={"description": "clarify: reward-weighted fine-tuning (Refit/Swift/SFT/DPO/StepDPO/Distill) on "
                       "conversations"},
        parser_class=ClarifyArgumentParser,
    )


def usage() -> str:
    lines = ["usage: clarify <command> [options]   (clarify <command> --help for each; clarify --version)", "",
             "Pipeline: simulate → fit → evaluate → report", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


@contextlib.contextmanager
def reported_errors(command: str):
    """Bad input (a config, a path, a record, an endpoint) ends the command with one line on stderr and status 1
    instead of a stack trace (``CLARIFY_DEBUG=1`` shows the trace). A fit stopped by SIGTERM exits 143."""
    try:
        yield
    except SIGTERMException as e:
        where = getattr(e, "clarify_checkpoint", None)
        saved = f"; last checkpoint {where}, resume with --ckpt_path last" if where else ""
        print(f"clarify {command}: stopped by SIGTERM at step {getattr(e, 'clarify_step', '?')}{saved}",
              file=sys.stderr)
        raise SystemExit(143) from None
    except (ValueError, OSError, EndpointError, NonFiniteLossError) as e:
        if os.environ.get("CLARIFY_DEBUG"):
            raise
        print(f"clarify {command}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(f"clarify_lit {__version__}")
        return
    if argv[0] in COMMANDS and COMMANDS[argv[0]][0] != __name__:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        with reported_errors(argv[0]):
            module.main(argv[1:])
        return
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        print(f"clarify: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    with reported_errors(argv[0]):
        # args=None when the arguments are sys.argv's: LightningCLI warns when it is given both
        lightning_main(None if argv == sys.argv[1:] else argv)


if __name__ == "__main__":
    main()
