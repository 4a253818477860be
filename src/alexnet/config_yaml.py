"""Config files as YAML of plain values only: no tags (safe_load) and no aliases.

Presets, ``--config`` files and the command line's values (``optim.lr=1e-4``) are all read
with :class:`_ConfigLoader`; :func:`load_yaml` turns every way a file can be refused into
one AlexNetError that names the file and the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from alexnet.errors import AlexNetError


class _AliasRefused(yaml.YAMLError):
    def __init__(self, mark: Any) -> None:
        super().__init__("aliases are not allowed")
        self.mark = mark


class _ConfigLoader(yaml.SafeLoader):
    """safe_load without aliases (``*name``).

    A config is five sections of scalars, so an alias saves nothing, while nested
    aliases make a few hundred bytes stand for billions of values ("billion laughs")
    that any later repr, copy or comparison expands. Anchors alone are harmless.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _parse(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except _AliasRefused as e:
        raise AlexNetError(
            f"{where} is refused at line {e.mark.line + 1}: YAML aliases (*name) are not allowed in config files; "
            "write the value out"
        ) from None


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise AlexNetError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise AlexNetError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x})") from None
    try:
        values = _parse(text, f"config file {path}") or {}
    except yaml.constructor.ConstructorError as e:
        # safe_load builds no objects: a tag such as !!python/object/apply is refused here.
        where = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise AlexNetError(
            f"config file {path} is refused{where}: {e.problem} (only plain YAML values are allowed)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AlexNetError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise AlexNetError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values
