"""Imports inside vera_jax only point down one order (DESIGN.md, "Shape of the code"); this file is
where that order is written. Each module's imports are read with `ast` (nothing is imported), at
package granularity: `vera_jax.models.hub` is package `models`, `vera_jax.quant` is `quant`."""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "vera_jax"
FACADE = "vera_jax"  # the package's __init__: the public API, for users and the top layer only
# Lowest first. A package may import one in an earlier tier, never its own tier's neighbours, a
# later tier, or the facade (which sits just below tasks/serving). interop sits above models: it
# reads each family's Hugging Face naming tables (models never import interop).
LAYERS = (
    ("tree", "network", "extras", "errors", "_lazy"),
    ("sharding",),
    ("quant",),
    ("adapters",),
    ("models",),
    ("interop",),
    ("data", "metrics"),
    ("train",),
    (FACADE,),
    ("tasks", "serving"),
)
OUTSIDE = ("experiments", "configs")  # above everything: the library never imports them


def tier(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    raise AssertionError(f"package {package!r} is in no tier of LAYERS; add it to tests/test_layering.py")


def package_of(module: str) -> str | None:
    """The vera_jax package a dotted module name belongs to; the facade for "vera_jax" itself."""
    parts = module.split(".")
    if parts[0] in OUTSIDE:
        return parts[0]
    if parts[0] != "vera_jax":
        return None
    return FACADE if len(parts) == 1 else parts[1]


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, and of every module a package's
    `lazy_exports` names; `from vera_jax import x` names the submodule x when there is one, else
    the facade."""
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    is_package = rel[-1] == "__init__"
    module = rel[:-1] if is_package else rel
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(module if is_package else module[:-1])
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            if name == "vera_jax":
                out += [(node.lineno, f"vera_jax.{a.name}" if (ROOT / a.name).is_dir()
                         or (ROOT / f"{a.name}.py").exists() else "vera_jax") for a in node.names]
            else:
                out.append((node.lineno, name))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            # a package __init__'s lazy names: {".module": names} imports those modules when read
            package = ".".join(module)
            for key in node.args[1].keys:
                name = key.value
                out.append((node.lineno, package + name if name.startswith(".") else name))
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        own = package_of(".".join(rel.with_suffix("").parts[:-1] if rel.name == "__init__.py"
                                  else rel.with_suffix("").parts))
        for line, name in imports(path):
            target = package_of(name)
            if target is None or target == own:
                continue
            if target in OUTSIDE or tier(target) >= tier(own):
                found.append(f"{rel}:{line}: {own} imports {name} ({target} is not below {own})")
    return found


def test_imports_point_down():
    found = violations()
    assert not found, "imports that point up or sideways:\n" + "\n".join(found)


def test_every_package_has_a_tier():
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    for package in packages:
        tier(package)


def test_an_upward_import_is_named(tmp_path, monkeypatch):
    """The check can fail: a models module importing train (absolutely and relatively) and one
    importing the facade are each reported with file and line."""
    root = tmp_path / "vera_jax"
    for package in ("models", "train"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "models" / "hub.py").write_text("import os\nfrom vera_jax.train import mesh\nfrom .. import train\n"
                                            "import vera_jax\n")
    (root / "models" / "__init__.py").write_text("lazy_exports(__name__, {'.hub': ('f',), 'vera_jax.train': ('g',)})\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    assert violations() == [
        "vera_jax/models/__init__.py:1: models imports vera_jax.train (train is not below models)",
        "vera_jax/models/hub.py:2: models imports vera_jax.train (train is not below models)",
        "vera_jax/models/hub.py:3: models imports vera_jax.train (train is not below models)",
        "vera_jax/models/hub.py:4: models imports vera_jax (vera_jax is not below models)",
    ]
