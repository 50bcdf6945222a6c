"""Reading `AmberCompression` resources from YAML, with errors a person can act on."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from amber.api import KIND, AmberCompression
from amber.stages import STAGE_TYPES

FIELD_PREFIX = re.compile(r"^[a-zA-Z][\w\[\].]*: ")


class InvalidResource(ValueError):
    """A resource file that cannot be run; the message names each bad field."""


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
    """One `field.path: reason` line per problem."""
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
    text = Path(path).read_text()
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise InvalidResource(f"{path}: not valid YAML: {err}") from None
    ours = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(ours) != 1:
        raise InvalidResource(f"{path}: expected one {KIND}, found {len(ours)}")
    return parse(ours[0])
