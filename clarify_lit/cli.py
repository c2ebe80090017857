"""The ``clarify`` console script.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands over :class:`ClarifyModule` and
:class:`ConversationDataModule`; ``simulate``, ``rescore``, ``evaluate`` and ``report`` are the pipeline's other
stages, and
``iterate`` loops simulate → fit → evaluate over rounds.

Run layout: everything of one run lives in ``trainer.default_root_dir`` (default ``runs/default``):
``config.yaml``, ``checkpoints/last.ckpt``, TensorBoard events, ``export/`` (HF/PEFT folder written at fit end),
``rollouts/`` (evaluation callback). ``--ckpt_path last`` therefore finds the previous run's last checkpoint
(``last_or_none``: that, or a new run when there is none yet); a resumed segment's config goes to
``config.resume-N.yaml`` and what it changed to ``resumes.jsonl`` (``clarify_lit.train.run_folder``). A folder holding
another run is refused unless ``--ckpt_path`` resumes it or ``--overwrite true`` replaces it; the folder is locked
while a fit writes it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clarify_lit import __version__
from clarify_lit.arguments import NoSecretsDumped, closest_option, option_names, redact, refuse_secrets
from clarify_lit.data.datamodule import ConversationDataModule
from clarify_lit.environment import environment_stamp
from clarify_lit.io import output_lock
from clarify_lit.simulate.options import moved_rollout_flags
from clarify_lit.simulate.teachers import EndpointError
from clarify_lit.train import objectives, run_folder
from clarify_lit.train.checkpointing import AtomicCheckpointIO, LastCheckpoint, ResumeState
from clarify_lit.train.module import ClarifyModule, NonFiniteLossError
from clarify_lit.train.trainer import ClarifyTrainer

log = logging.getLogger("clarify.fit")

# The one dispatch table: command → (the module whose ``main(argv)`` runs it, one line of ``clarify --help``).
# Modules are named, not imported: ``clarify <command>`` loads only what that command needs, and ``clarify iterate
# --in_process true`` runs its stages through :func:`main` (clarify_lit.jobs.stages) without an import cycle.
# fit/validate/test/predict are LightningCLI's subcommands, run by :func:`lightning_main` in this module.
COMMANDS = {
    "simulate": ("clarify_lit.simulate.command", "roll out conversations with a teacher and score them"),
    "rescore": (
        "clarify_lit.simulate.rescore",
        "score finished conversations again with another reward (no generation)",
    ),
    "fit": (__name__, "train a policy on conversation records (Refit, Swift, SFT, DPO, StepDPO or Distill)"),
    "validate": (__name__, "run one validation pass"),
    "test": (__name__, "run one test pass"),
    "predict": (__name__, "run prediction"),
    "evaluate": ("clarify_lit.evaluate.command", "roll out a base model, checkpoint or export on held-out questions"),
    "report": ("clarify_lit.evaluate.report", "compare evaluated runs: Markdown table, plot, paired tests"),
    "iterate": ("clarify_lit.jobs.iterate", "K rounds of simulate (current policy) → fit → evaluate; report by round"),
    "export": (
        "clarify_lit.train.export_command",
        "write a run's adapter, or a merged standalone model, from its checkpoint",
    ),
}

DEFAULT_ROOT = "runs/default"


class ClarifyCLI(LightningCLI):
    _overwrite = False  # fit's --overwrite (read before the config is saved with it reset)
    _cleared = False  # the earlier run's files were removed (--overwrite, last_or_none without a checkpoint)

    def add_arguments_to_parser(self, parser) -> None:
        # one tokenizer: the model's
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: replace the run already in trainer.default_root_dir (its config, checkpoints, "
            "export and events); without it such a folder is refused unless --ckpt_path resumes it",
        )

    # ------------------------------------------------------------------------------------------- the run folder
    def _root(self) -> Path:
        trainer = self.config[self.subcommand].get("trainer") if self.subcommand else None
        return Path((trainer or {}).get("default_root_dir") or DEFAULT_ROOT)

    def before_instantiate_classes(self) -> None:
        """Before any model loads: no secret in the configuration, and a fit never starts over another run."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        refuse_secrets({k: v for k, v in config.as_dict().items() if k != "config"})
        if self.subcommand == "fit":
            self._overwrite = bool(config.get("overwrite"))
            config["overwrite"] = False  # the saved config.yaml must not replace the next run by itself
            if _rank_zero():
                # a resume may write into an occupied folder (last_or_none too: it resumes, or restarts a run that
                # never saved a checkpoint)
                run_folder.refuse_occupied(self._root(), config.get("ckpt_path"), self._overwrite)

    def _run_subcommand(self, subcommand: str) -> None:
        """``fit`` holds the run folder's lock throughout (a second writer is refused in one line)."""
        root = self._root()
        if subcommand != "fit" or "://" in str(root) or not _rank_zero():
            return super()._run_subcommand(subcommand)
        with output_lock(root, "clarify fit"):
            before = set(run_folder.run_files(root, everything=True))
            try:
                return super()._run_subcommand(subcommand)
            except BaseException:
                trainer = getattr(self, "trainer", None)
                if self._cleared:  # --overwrite (or last_or_none) removed the earlier run: all there is is ours
                    before = set()
                if trainer is None or trainer.global_step == 0:
                    # a start that failed before its first optimizer step (every bad-data refusal): what it wrote
                    # (config.yaml, an events file, run_info.json) is removed, so the corrected command is not
                    # refused as "already holds a run" (nor sent to a --ckpt_path last that finds no checkpoint)
                    run_folder.remove_failed_start(root, before)
                raise

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path``, check the resume against its checkpoint (``clarify_lit.train.run_folder``) and
        record this segment's environment stamp in ``run_info.json``."""
        self._resolve_ckpt_path()
        if _rank_zero() and "://" not in str(self._root()):
            stamp = environment_stamp(self.trainer.strategy.root_device, str(self.trainer.precision))
            run_folder.record_run_info(self._root(), stamp)

    def _resolve_ckpt_path(self) -> None:
        """``last``/``last_or_none`` → the newest last checkpoint; a resume checked and recorded (``resumes.jsonl``)."""
        root = self._root()
        kwargs = self.config_init["fit"]
        ckpt = requested = kwargs.get("ckpt_path")
        if ckpt in ("last", "last_or_none"):
            found = self._last_checkpoint()
            if found is None and ckpt == "last":
                raise FileNotFoundError(
                    f"--ckpt_path last: {root} holds no checkpoint to resume; drop --ckpt_path "
                    "to start a new run, or pass --ckpt_path last_or_none to resume when there "
                    "is a checkpoint and start a new run otherwise"
                )
            if found is None:
                log.info("--ckpt_path last_or_none: no checkpoint in %s yet, starting a new run", root)
            ckpt = kwargs["ckpt_path"] = found
        if ckpt is None:
            if _rank_zero() and (self._overwrite or requested == "last_or_none"):
                run_folder.clear_run(root)  # --overwrite, or last_or_none over a run that never saved a checkpoint
                self._cleared = True
            return
        if str(ckpt) in ("best", "hpc") or "://" in str(ckpt):
            return  # Lightning's own ways to name a checkpoint
        ckpt = Path(ckpt)
        if not ckpt.is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt}: checkpoint not found")
        saved = run_folder.read_checkpoint(ckpt)
        changed = run_folder.check_resume(ckpt, dict(saved.get("hyper_parameters") or {}), dict(self.model.hparams))
        if not _rank_zero():
            return
        before = run_folder.latest_config(root)
        config_name = "config.yaml"
        if before is not None:
            now = yaml.safe_load(self._parser("fit").dump(self.config["fit"], skip_none=False))
            changed.update(run_folder.config_differences(yaml.safe_load(before.read_text(encoding="utf-8")) or {}, now))
            config_name = run_folder.next_resume_config(root)
            for cb in self.trainer.callbacks:  # the original config.yaml keeps describing the steps it produced
                if isinstance(cb, SaveConfigCallback):
                    cb.config_filename = config_name
        if changed:
            log.warning(
                "resuming %s with %d changed setting(s): %s (recorded in %s)",
                ckpt,
                len(changed),
                ", ".join(changed),
                root / run_folder.RESUMES_FILE,
            )
        run_folder.record_resume(root, ckpt, saved.get("global_step"), config_name, changed)

    def _last_checkpoint(self) -> str | None:
        """The newest ``last*.ckpt`` of the trainer's checkpoint callbacks (Lightning's ``"last"``), or None."""
        found: set[str] = set()
        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                with contextlib.suppress(Exception):
                    found |= cb._find_last_checkpoints(self.trainer)
        found = {p for p in found if os.path.isfile(p)}
        return max(found, key=os.path.getmtime) if found else None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        root = Path(config.get("default_root_dir") or DEFAULT_ROOT)
        config["default_root_dir"] = str(root)
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(save_dir=str(root), name="", version="", default_hp_metric=False)
        existing = config.get("callbacks") or []
        existing = existing if isinstance(existing, list) else [existing]
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in existing + callbacks
        ):
            callbacks = [*callbacks, LastCheckpoint(dirpath=str(root / "checkpoints"), save_last=True, save_top_k=0)]
        # interruption safety (docs/reliability.md): atomic checkpoint writes, RNG state in checkpoints, SIGTERM saves
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if (
            not any(isinstance(p, CheckpointIO) for p in plugins)
            and getattr(config.get("strategy"), "_checkpoint_io", None) is None
        ):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        if not any(isinstance(c, ResumeState) for c in existing + callbacks):
            callbacks = [*callbacks, ResumeState()]
        return super()._instantiate_trainer(config, callbacks)


class ClarifyArgumentParser(NoSecretsDumped, LightningArgumentParser):
    """A command-line mistake is reported in one line (``clarify: error: …``), not the whole usage text, and never
    repeats a value that looks like a secret; ``--print_config`` refuses a configuration holding one."""

    def error(self, message: str, ex: Exception | None = None):
        message = redact(str(message))
        if not self.exit_on_error:
            return super().error(message, ex)
        text = _one_line_parse_error(message)
        sys.stderr.write(
            f"clarify: error: {text}{closest_option(text, option_names(self))} (see clarify <command> --help)\n"
        )
        self.exit(2)


def _rank_zero() -> bool:
    """This process is rank 0 (a DDP rank started by Lightning's launcher runs the CLI again: it must not refuse
    or clear the folder rank 0 is writing)."""
    return (getattr(rank_zero_only, "rank", 0) or 0) == 0


def objective_names() -> list[str]:
    """The objectives ``--model.objective`` accepts by name, in the order they are defined."""
    return [
        c.__name__
        for c in vars(objectives).values()
        if isinstance(c, type)
        and issubclass(c, objectives.Objective)
        and c is not objectives.Objective
        and c.__module__ == objectives.__name__
    ]


def _one_line_parse_error(message: str) -> str:
    text = " ".join(str(message).split())
    if text.startswith('Parser key "model.objective"'):
        m = re.search(r"Expected a path but (\S+) either", text)
        given = f" {m.group(1)!r}" if m else ""
        return f"--model.objective:{given} is not an objective; choose one of {', '.join(objective_names())}"
    return text


def lightning_main(args: list[str] | None = None, run: bool = True) -> ClarifyCLI:
    with warnings.catch_warnings():
        # run in-process (clarify iterate --in_process, the Python API) LightningCLI warns that both ``args`` and
        # sys.argv are set and prints ``args`` whole: it would repeat anything on the command line, a key included
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return ClarifyCLI(
            ClarifyModule,
            ConversationDataModule,
            trainer_class=ClarifyTrainer,  # --trainer.precision auto (clarify_lit/train/trainer.py)
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            # the DataModule's batch sampler shards across ranks itself (it must know optimizer-step boundaries)
            trainer_defaults={"use_distributed_sampler": False, "default_root_dir": DEFAULT_ROOT},
            parser_kwargs={
                "description": "clarify: reward-weighted fine-tuning (Refit/Swift/SFT/DPO/StepDPO/Distill) "
                "on conversations",
                "allow_abbrev": False,
            },
            parser_class=ClarifyArgumentParser,
        )


def usage() -> str:
    lines = [
        "usage: clarify <command> [options]   (clarify <command> --help for each; clarify --version)",
        "",
        "Pipeline: simulate → fit → evaluate → report",
        "",
        "commands:",
    ]
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
        by = getattr(e, "clarify_signal", "SIGTERM")  # Ctrl-C is turned into the same stop (ResumeState)
        print(
            f"clarify {command}: stopped by {'Ctrl-C (SIGINT)' if by == 'SIGINT' else by} at step "
            f"{getattr(e, 'clarify_step', '?')}{saved}",
            file=sys.stderr,
        )
        raise SystemExit(130 if by == "SIGINT" else 143) from None
    except (ValueError, OSError, EndpointError, NonFiniteLossError) as e:
        if os.environ.get("CLARIFY_DEBUG"):
            raise
        print(f"clarify {command}: error: {redact(' '.join(str(e).split())) or type(e).__name__}", file=sys.stderr)
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
        args = moved_callback_flags(argv)
        # args=None when the arguments are sys.argv's: LightningCLI warns when it is given both
        lightning_main(None if args == sys.argv[1:] else args)


def moved_callback_flags(argv: list[str]) -> list[str]:
    """``argv`` with the rollout callback's flat rollout options (``--trainer.callbacks.init_args.max_new_tokens``,
    and its one ``temperature``) spelled as its ``rollout`` block's options, each use reported in one line."""
    prefix = "--trainer.callbacks.init_args."
    out = []
    for a in argv:
        name, eq, value = a.partition("=")
        if name == prefix + "temperature" and eq:
            print(f"clarify: {name} is deprecated, use {prefix}rollout.temperatures=[…]", file=sys.stderr)
            a = f"{prefix}rollout.temperatures=[{value}]"
        out.append(a)
    return moved_rollout_flags(out, "clarify", prefix=prefix)


if __name__ == "__main__":
    main()
