"""Imports go down the layers only, and nothing but the registry imports a method package.

Each room of the package sits on a layer; a module may import from its own room or from a lower layer, never
from a higher one or from a peer room of its layer. The test reads every module's imports (``import`` and
``from ... import``, also inside functions) with `ast`, so an upward import anywhere fails it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "dpimages"

# lowest first; rooms in one tuple are peers and may not import each other
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("seeds", "filehash", "allocator", "distributed", "clipping"),
    ("privacy",),
    ("config", "data"),
    ("nets", "runs"),
    ("report", "eval", "budget", "scatter_classifier"),
    ("synthesizer",),
    ("registry",),
    ("methods",),
    ("fit_runner",),
    ("testing", "export", "demo", "tune"),
    ("audit", "bench"),
    ("api", "budget_cli"),
    ("cli", "__init__"),
    ("__main__",),
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
# the one module that may import the `dpimages` package itself (its version) from below the top
VERSION_ONLY = "__version__"


def room_of(module: str) -> str:
    """`dpimages.privacy.dpsgd` -> `privacy`; `dpimages` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every dpimages import in `path`."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpimages":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "dpimages"]
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        mine = room_of(me)
        assert mine in LAYER, f"{me}: room {mine!r} has no layer: add it to LAYERS"
        for target, names in imports(path):
            theirs = room_of(target)
            if target == "dpimages" and names == [VERSION_ONLY]:
                continue  # `from dpimages import __version__`: a constant of the package
            if theirs == mine:
                continue
            if theirs not in LAYER:
                bad.append(f"{me} imports unknown room {target}")
            elif LAYER[theirs] >= LAYER[mine]:
                bad.append(f"{me} (layer {LAYER[mine]}, {mine}) imports {target} (layer {LAYER[theirs]}, {theirs})")
            if target.startswith("dpimages.methods.") and mine not in ("methods", "registry"):
                bad.append(f"{me} imports inside a method package ({target}): go through dpimages.registry")
    return bad


def test_imports_go_down_the_layers_only():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The test can fail: a privacy module that imports a network is reported."""
    fake = SRC / "privacy" / "_upward_probe.py"
    fake.write_text("from dpimages.nets import SmallCNN\n")
    try:
        assert any("_upward_probe" in v and "nets" in v for v in violations())
    finally:
        fake.unlink()


@pytest.mark.parametrize("room", ["privacy", "nets", "data", "eval"])
def test_low_rooms_import_no_method(room):
    for path in (SRC / room).rglob("*.py"):
        assert not any(t.startswith("dpimages.methods") for t, _ in imports(path)), path
