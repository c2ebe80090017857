"""How every ``clarify`` command reads its command line: jsonargparse from typed dataclasses and signatures.

``fit``/``validate``/``test``/``predict`` are LightningCLI (``clarify_lit.cli``); every other command describes its
options as one dataclass (``SimulateConfig``, ``IterateConfig``, ``DemoOptions``) or one typed function
(``evaluate``, ``report``) and gets from jsonargparse, like LightningCLI, one ``--option`` per field with its type
checked, ``--config`` YAML files, ``--print_config`` and a ``--help`` that shows each field's documentation.
Options are spelled with underscores and booleans take a value (``--dry_run true``); :func:`renamed_switches` keeps
the older hyphenated switches (``--dry-run``) working, with a deprecation message.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings


def dataclass_parser(config_class: type, prog: str, description: str, env_prefix: str, config_help: str
                     ) -> ArgumentParser:
    """A parser for a command configured by one dataclass (``--config`` YAML + one option per field; ``--help`` shows
    each field's docstring)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=description, env_prefix=env_prefix, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_class_arguments(config_class, None, as_group=False)
    return parser


def parse_dataclass(parser: ArgumentParser, config_class: type, argv: list[str] | None) -> Any:
    """Parse ``argv`` with a :func:`dataclass_parser` parser and build the dataclass from it."""
    init = parser.instantiate(parser.parse_args(argv))
    return config_class(**{k: v for k, v in vars(init).items() if k in config_class.__dataclass_fields__})


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
