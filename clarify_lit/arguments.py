"""How every ``clarify`` command reads its command line: jsonargparse from typed dataclasses and signatures.

``fit``/``validate``/``test``/``predict`` are LightningCLI (``clarify_lit.cli``); every other command is one
pattern (docs/architecture.md): a config dataclass (``SimulateConfig``, ``EvaluateConfig``, ``ReportConfig``,
``ExportConfig``, ``RescoreConfig``, ``IterateConfig``, ``DemoConfig``), a ``run(cfg)``, and a ``main(argv)`` that
parses with its :class:`CommandLine` (:func:`dataclass_parser`, :func:`parse_dataclass`); jsonargparse gives, like
LightningCLI, one
``--option`` per field with its type checked, ``--config`` YAML files, ``--print_config`` and a ``--help`` that
shows each field's documentation.
Options are spelled with underscores and booleans take a value (``--dry_run true``); :func:`renamed_switches` keeps
the older hyphenated switches (``--dry-run``) working, with a deprecation message, and :func:`moved_config_keys` a
``--config`` file's keys that moved (``max_new_tokens`` → ``rollout.max_new_tokens``).

Every parser is a :class:`ClarifyParser`: abbreviations are off (``--teacher.endpoint.api_key`` is an unknown option,
never taken for ``api_key_env``), an error message never repeats a value that looks like a secret, and
``--print_config`` refuses a configuration holding one (checked before printing, printed redacted).
:func:`refuse_secrets` refuses a parsed configuration that holds a key where an environment variable's *name* belongs
(``*_env`` fields) or a recognisable API key anywhere, before anything is written: keys come from the environment
only.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

# API keys of the common providers (OpenAI sk-…, Hugging Face hf_…, GitHub, GitLab, Slack, AWS, Google)
_KEY_PATTERN = re.compile(
    r"(?:sk-|sk_|hf_|ghp_|gho_|ghs_|ghu_|github_pat_|glpat-|xox[abpr]-|AKIA|AIza)"
    r"[A-Za-z0-9_\-]{12,}"
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# an option whose value may be a secret: its value is never repeated in an error message
_SECRET_OPTION = re.compile(
    r"(--[\w.\-]*(?:key|token|secret|password|_env)[\w.\-]*(?:=|\s+))([^\s;,')\]]+)", re.IGNORECASE
)


def looks_like_secret(value: str) -> bool:
    """A recognisable API key (``sk-…``, ``hf_…``, ``ghp_…`` …) inside ``value``."""
    return bool(_KEY_PATTERN.search(value))


def _random_token(value: str, min_length: int) -> bool:
    """A long token mixing upper case, lower case and digits (how keys look; environment variable names do not)."""
    for token in re.findall(r"[A-Za-z0-9_\-+=]{" + str(min_length) + ",}", value):
        if any(c.isupper() for c in token) and any(c.islower() for c in token) and any(c.isdigit() for c in token):
            return True
    return False


def redact(text: str) -> str:
    """``text`` with every value that may be a secret replaced by ``<redacted>`` (for error messages)."""

    def hide(m: re.Match) -> str:
        option, value = m.group(1), m.group(2)
        if option.rstrip("= \t").endswith("_env") and _ENV_NAME.fullmatch(value) and not _random_token(value, 20):
            return m.group(0)  # an environment variable's name is no secret
        return option + "<redacted>"

    text = _SECRET_OPTION.sub(hide, text)
    text = _KEY_PATTERN.sub("<redacted>", text)
    return re.sub(
        r"[A-Za-z0-9_\-+=]{32,}", lambda m: "<redacted>" if _random_token(m.group(0), 32) else m.group(0), text
    )


class SecretInConfigError(ValueError):
    """A configuration value looks like a secret; the message names the field, never the value."""


def refuse_secrets(config: Any, prefix: str = "") -> None:
    """Refuse a configuration (dict, :class:`~jsonargparse.Namespace`, dataclass, list) that holds a secret.

    A field named ``*_env`` must be the *name* of an environment variable (``OPENAI_API_KEY``); a value that is not
    such a name, or that looks like a key, is refused. Anywhere else a recognisable API key (``sk-…``, ``hf_…`` …) is
    refused too (e.g. inside ``fit_args``). The message names the field and never the value.
    """
    if isinstance(config, Namespace):
        config = config.as_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        for key, value in config.items():
            if key == "init_args":  # a class's settings (``class_path`` + ``init_args``): named as on the command line
                refuse_secrets(value, prefix)
                continue
            name = f"{prefix}{key}"
            if (
                isinstance(value, str)
                and str(key).endswith("_env")
                and (not _ENV_NAME.fullmatch(value) or looks_like_secret(value) or _random_token(value, 20))
            ):
                raise SecretInConfigError(
                    f"{name} takes the NAME of an environment variable that holds the key (e.g. OPENAI_API_KEY), "
                    "and the value given is not such a name (not shown: it may be the key itself). Set "
                    f"`export SOME_NAME=<key>` and pass --{name} SOME_NAME; never put a key on the command line "
                    "or in a config file"
                )
            refuse_secrets(value, f"{name}.")
    elif isinstance(config, list | tuple):
        for i, value in enumerate(config):
            refuse_secrets(value, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(config, str) and looks_like_secret(config):
        raise SecretInConfigError(
            f"{prefix.rstrip('.') or 'an argument'} holds what looks like an API key (not shown); keys are read from "
            "environment variables only (the endpoint options' api_key_env names one)"
        )


def _printing_config(parser: Any) -> bool:
    """Whether ``parser`` (or the parser of its command) is printing ``--print_config``."""
    while parser is not None:
        if hasattr(parser, "print_config"):
            return True
        parser = getattr(parser, "parent_parser", None)
    return False


class NoSecretsDumped:
    """Mixin of the ``clarify`` parsers: a configuration holding a secret is never dumped — not by ``--print_config``
    (which jsonargparse runs inside parsing, before any command could check it), nor into a saved config — and a
    printed configuration is redacted as well (:func:`redact`)."""

    def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:
        values = cfg.as_dict() if isinstance(cfg, Namespace) else cfg
        if isinstance(values, Mapping):
            values = {k: v for k, v in values.items() if k != "config"}  # the config files' paths
        refuse_secrets(values)
        text = super().dump(cfg, *args, **kwargs)  # type: ignore[misc]
        return redact(text) if _printing_config(self) else text


def option_names(parser: Any) -> list[str]:
    """Every ``--option`` ``parser`` accepts (nested dataclass fields by their dotted names)."""
    return sorted({o for a in getattr(parser, "_actions", []) for o in a.option_strings if o.startswith("--")})


def closest_option(message: str, options: list[str], moved: Mapping[str, str] | None = None) -> str:
    """``"; did you mean --n_turns?"`` for an error about an unknown option (``unrecognized arguments: --n_turn 3``,
    a config file's ``Option 'n_turn' is not accepted``) that is close to one of ``options``; for an option that
    ``moved`` (old name → new option: a config file's ``max_new_tokens`` is ``--rollout.max_new_tokens`` now), where it
    went; else ``""``."""
    m = (
        re.search(r"unrecognized arguments: (--[^\s=]+)", message)
        or re.search(r"Option '([^']+)' is not accepted", message)
        or re.search(r'Key "([^"]+)" is not expected', message)
    )
    if not m:
        return ""
    name = m.group(1) if m.group(1).startswith("--") else f"--{m.group(1)}"
    if moved and name[2:] in moved:
        return f"; it moved: {moved[name[2:]]}"
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if not near:  # an option of a block given without it (--n_turn for --rollout.n_turns)
        tails = {"--" + o.rsplit(".", 1)[-1]: o for o in reversed(options) if "." in o}
        near = [tails[t] for t in difflib.get_close_matches(name, list(tails), n=1, cutoff=0.6)]
    return f"; did you mean {near[0]}?" if near else ""


def one_line_error(prog: str, message: str, options: list[str], moved: Mapping[str, str] | None = None) -> str:
    """A command-line mistake as one line (never the whole usage text), secrets redacted, with the closest valid
    option name (or where a moved option went) when the mistake is an unknown one."""
    text = " ".join(redact(str(message)).split())
    return f"{prog}: error: {text}{closest_option(text, options, moved)} (see {prog} --help)"


class ClarifyParser(NoSecretsDumped, ArgumentParser):
    """jsonargparse's parser with abbreviations off, a command-line mistake reported in one line (with the closest
    valid option name) instead of the usage text, and secrets kept out of error messages and printed or saved
    configurations."""

    def __init__(self, *args, moved: Mapping[str, str] | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.moved = dict(moved or {})  # old option name → the option it became (named in errors)

    def error(self, message: str, ex: Exception | None = None):
        message = redact(str(message))
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(one_line_error(self.prog or "clarify", message, option_names(self), self.moved) + "\n")
        self.exit(2)


@contextmanager
def attribute_docstrings() -> Iterator[None]:
    """jsonargparse reads fields' docstrings (``--help`` text) inside the block, and goes back to its previous setting
    after: the setting is global, and left on it makes every later parse — LightningCLI's in ``clarify iterate
    --in_process true`` — about 10x slower."""
    try:  # jsonargparse has a setter only; its getter is private
        from jsonargparse._optionals import get_docstring_parse_options

        before = bool(get_docstring_parse_options()["attribute_docstrings"])
    except (ImportError, KeyError):
        before = False
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=before)


def dataclass_parser(
    config_class: type,
    prog: str,
    description: str,
    env_prefix: str,
    config_help: str,
    *,
    positional: str | None = None,
    spaced: tuple[str, ...] = (),
    moved: Mapping[str, str] | None = None,
) -> ArgumentParser:
    """A parser for a command configured by one dataclass (``--config`` YAML + one option per field; ``--help`` shows
    each field's docstring). ``positional`` names a list-of-strings field taken as the positional arguments
    (``clarify report a b``); ``spaced`` names list-of-strings fields whose option takes its values space-separated
    (``--order Base Refit``) instead of as one list (``--order '[Base, Refit]'``); ``moved``: old option names and
    the options they became, named in the error about an old name (e.g. in a config file)."""
    parser = ClarifyParser(prog=prog, description=description, env_prefix=env_prefix, default_env=False, moved=moved)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    by_hand = {positional, *spaced} - {None}
    with attribute_docstrings():
        parser.add_class_arguments(config_class, None, as_group=False, skip=by_hand or None)
    docs = field_docs(config_class) if by_hand else {}
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    if positional:
        parser.add_argument(positional, type=str, nargs="+", help=" ".join(docs.get(positional, "").split()))
    for name in spaced:
        parser.add_argument(
            f"--{name}",
            type=str,
            nargs="+",
            default=defaults[name],
            metavar=name.upper(),
            help=" ".join(docs.get(name, "").split()),
        )
    return parser


def field_docs(config_class: type) -> dict[str, str]:
    """Each field's docstring (the string after it in the class body), read from the source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(config_class))).body[0].body
    return {
        a.target.id: b.value.value
        for a, b in zip(body, body[1:], strict=False)
        if isinstance(a, ast.AnnAssign)
        and isinstance(a.target, ast.Name)
        and isinstance(b, ast.Expr)
        and isinstance(b.value, ast.Constant)
        and isinstance(b.value.value, str)
    }


Config = TypeVar("Config")


@dataclasses.dataclass(frozen=True)
class CommandLine(Generic[Config]):
    """How a command configured by one dataclass reads its command line: the shared factory of every command's
    ``build_parser`` and ``parse_config`` (docs/architecture.md, "One command pattern")."""

    config: type[Config]
    prog: str
    description: str
    env_prefix: str
    config_help: str = "YAML with any of the options below"
    positional: str | None = None
    """A list field taken as the positional arguments (:func:`dataclass_parser`)."""
    spaced: tuple[str, ...] = ()
    """List fields whose option takes space-separated values (:func:`dataclass_parser`)."""
    rewrite: Callable[[list[str] | None], list[str]] | None = None
    """Rewrites deprecated spellings in the arguments before they are parsed (each use reported on stderr)."""
    moved: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Old option names → the options they became: a ``--config`` file's old key is moved there, with a deprecation
    line (:func:`moved_config_keys`)."""

    def parser(self) -> ArgumentParser:
        return dataclass_parser(
            self.config,
            self.prog,
            self.description,
            self.env_prefix,
            self.config_help,
            positional=self.positional,
            spaced=self.spaced,
            moved=self.moved,
        )

    def parse(self, argv: list[str] | None = None) -> Config:
        parser = self.parser()
        argv = self.rewrite(argv) if self.rewrite else argv
        if self.moved:
            argv = moved_config_keys(argv, self.moved, self.prog, parser.error)
        return parse_dataclass(parser, self.config, argv)


def parse_dataclass(parser: ArgumentParser, config_class: type, argv: list[str] | None) -> Any:
    """Parse ``argv`` with a :func:`dataclass_parser` parser and build the dataclass from it (a secret in the
    configuration is refused first: :func:`refuse_secrets`)."""
    parsed = parser.parse_args(argv)
    refuse_secrets({k: v for k, v in parsed.as_dict().items() if k != "config"})
    init = parser.instantiate(parsed)
    return config_class(**{k: v for k, v in vars(init).items() if k in config_class.__dataclass_fields__})


def moved_config_keys(
    argv: list[str] | None, moved: Mapping[str, str], prog: str, error: Callable[[str], Any]
) -> list[str]:
    """``argv`` with each ``--config`` YAML (a file or an inline string) that holds an old key of ``moved`` (old name →
    the option it became: ``max_new_tokens`` → ``--rollout.max_new_tokens``) given instead as its content with the key
    nested where it moved (``rollout: {max_new_tokens: 40}``), each old key reported on stderr in one line naming the
    file. Inline, in the place of the file, so the usual order holds (later arguments override earlier ones); a
    config without old keys is passed on untouched. A key given both flat and in its new place in one file is
    ``error``-ed (the parser's one-line error)."""
    import yaml

    args = list(sys.argv[1:] if argv is None else argv)
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            out += [a, _moved_config(args[i + 1], moved, prog, error, yaml)]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + _moved_config(a[len("--config=") :], moved, prog, error, yaml)
        out.append(a)
        i += 1
    return out


def _moved_config(value: str, moved: Mapping[str, str], prog: str, error: Callable[[str], Any], yaml: Any) -> str:
    """One ``--config`` value with its old keys moved (:func:`moved_config_keys`), or ``value`` when it has none."""
    try:
        is_file = os.path.isfile(value)
        cfg = yaml.safe_load(Path(value).read_text(encoding="utf-8") if is_file else value)
    except (OSError, ValueError, yaml.YAMLError):
        return value  # unreadable: the parser says so, in its words
    if not isinstance(cfg, dict) or not set(cfg) & set(moved):
        return value
    where = value if is_file else "--config"
    for old in [k for k in cfg if k in moved]:
        *parents, leaf = moved[old].lstrip("-").split(".")
        new = ".".join([*parents, leaf])
        block = cfg
        for part in parents:
            if block.get(part) is None:
                block[part] = {}
            block = block[part]
            if not isinstance(block, dict):  # e.g. ``rollout: other.yaml``: left to the parser
                return value
        if leaf in block or new in cfg:
            error(f"{where}: {old} is given both flat and as {new}; keep only {new}")
            return value  # an error that does not exit: the parser's own refusal follows
        print(f"{prog}: {where}: {old} is deprecated, use {new}", file=sys.stderr)
        block[leaf] = cfg.pop(old)
    return yaml.safe_dump(cfg, sort_keys=False)


def renamed_switches(argv: list[str] | None, renames: Mapping[str, str], prog: str) -> list[str]:
    """``argv`` with deprecated on/off switches (``--dry-run``, which took no value) replaced by the current boolean
    options (``--dry_run true``), each use reported on stderr."""
    out = []
    for a in list(sys.argv[1:] if argv is None else argv):
        if a in renames:
            print(f"{prog}: {a} is deprecated, use {renames[a]} true", file=sys.stderr)
            out += [renames[a], "true"]
        else:
            out.append(a)
    return out
