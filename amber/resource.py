"""Reading `AmberCompression` resources from YAML, with errors a person can act on.

The loader trusts nothing in the file: it refuses files over MAX_BYTES, bytes that are not
UTF-8, documents nested deeper than MAX_DEPTH, more than MAX_ALIASES aliases (a few aliases
can expand to gigabytes: the "billion laughs") and duplicate keys (with them the last one
silently wins, and a run can land in another resource's folder).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from amber.api import KIND, AmberCompression
from amber.errors import InvalidInput
from amber.stages import STAGE_TYPES

FIELD_PREFIX = re.compile(r"^[a-zA-Z][\w\[\].]*: ")
MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_ALIASES = 16
MAX_PROBLEMS = 20  # lines of one refusal; the rest are counted


class InvalidResource(InvalidInput):
    """A resource file that cannot be run; the message names each bad field."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader with bounds on depth and aliases, and no duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise InvalidResource(
                    f"line {mark.line + 1}: more than {MAX_ALIASES} YAML aliases; write the "
                    "values out"
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise InvalidResource(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: the constructor says so below
            if first != key_node.start_mark.line + 1:
                raise InvalidResource(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on "
                    f"line {first})"
                )
        return super().construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


def read_text(path: str | Path) -> str:
    """A resource file's text: bounded, UTF-8, or InvalidResource naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as src:
            raw = src.read(MAX_BYTES + 1)
    except OSError as err:
        raise InvalidResource(f"{path}: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise InvalidResource(f"{path}: larger than {MAX_BYTES >> 10} KiB; not a resource file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidResource(f"{path}: not UTF-8 text (byte {err.start})") from None


def load_documents(text: str) -> list:
    """Every YAML document in `text`, through the bounded loader."""
    try:
        return list(yaml.load_all(text, Loader=_Loader))  # _Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise InvalidResource(f"not valid YAML: {err}") from None
    except RecursionError:
        raise InvalidResource(f"nested deeper than {MAX_DEPTH}") from None


def _path(loc: tuple) -> str:
    out = ""
    for prev, part in zip((None, *loc), loc, strict=False):
        if isinstance(part, int):
            out += f"[{part}]"
        elif prev is not None and isinstance(prev, int) and part in STAGE_TYPES:
            continue  # the discriminated union's tag, not a field
        elif not str(part).startswith("function-"):
            out += f".{part}" if out else str(part)
    return out


def format_errors(err: ValidationError) -> list[str]:
    """One `field.path: reason` line per problem, the first MAX_PROBLEMS of them (a file with
    thousands of unknown keys gets a screenful, not thousands of lines)."""
    lines = _problem_lines(err)
    if len(lines) > MAX_PROBLEMS:
        lines = [*lines[:MAX_PROBLEMS], f"and {len(lines) - MAX_PROBLEMS} more"]
    return lines


def _problem_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        path = _path(e["loc"])
        for msg in e["msg"].removeprefix("Value error, ").split("; "):
            # Cross-field checks report their own sub-path ("stages[3].singleLayers: ...").
            if FIELD_PREFIX.match(msg) and path:
                lines.append(f"{path}.{msg}")
            else:
                lines.append(f"{path}: {msg}" if path else msg)
    return lines


def parse(document: dict) -> AmberCompression:
    if not isinstance(document, dict) or document.get("kind") != KIND:
        found = document.get("kind") if isinstance(document, dict) else type(document).__name__
        raise InvalidResource(f"kind: expected {KIND}, found {found!r}")
    try:
        return AmberCompression.model_validate(document)
    except ValidationError as err:
        raise InvalidResource("\n".join(format_errors(err))) from None


def load(path: str | Path) -> AmberCompression:
    """The one AmberCompression in a YAML file (other kinds in the file are skipped)."""
    try:
        documents = [d for d in load_documents(read_text(path)) if d is not None]
    except InvalidResource as err:
        message = str(err)
        named = message if message.startswith(str(path)) else f"{path}: {message}"
        raise InvalidResource(named) from None
    ours = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(ours) != 1:
        raise InvalidResource(f"{path}: expected one {KIND}, found {len(ours)}")
    return parse(ours[0])
