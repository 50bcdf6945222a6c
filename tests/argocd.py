"""Argo CD's view of an AmberCompression: manifests/gitops/argocd-health.lua run in a real Lua
interpreter (lupa), the way Argo CD runs resource health checks."""

from __future__ import annotations

from pathlib import Path

import lupa

SCRIPT = Path(__file__).parent.parent / "manifests" / "gitops" / "argocd-health.lua"


def health(obj: dict) -> tuple[str, str]:
    """(status, message) of a resource as Argo CD would show it."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj)\n{SCRIPT.read_text()}\nend")
    result = check(lua.table_from(obj, recursive=True))
    return result["status"], result["message"]
