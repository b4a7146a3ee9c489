"""The layering of docs/architecture.md, read from the source: no import goes up the picture, and
no private name (`_x`) is used across packages."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "procure"

EDGES = {"vendors", "clouds", "payments", "gpu"}
DECISIONS = {"agent", "fleet", "gateway"}
ABOVE_DECISIONS = {"api", "web", "cli", "demos", "sim"}
STORE_MAY_IMPORT = {"store", "models", "bounds", "settings"}
"""`store` reads the domain (`models`), clips text (`bounds`) and the checked-number rule
(`settings`); nothing that decides or serves."""


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. procure.web.actions
    target: str  # the module imported, e.g. procure.agent.metrics
    name: str | None  # the name taken from it (`from target import name`), if any
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """The package a module belongs to: `procure.web.actions` → `web`, `procure.cli.runs` →
    `cli` (the `procure` command), `procure.demos.serve` → `demos`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) >= 2 else "procure"


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name → a procure module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "procure":
                    found.append(Import(module, alias.name, None, node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "procure":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if is_module(sub):  # `from procure.api import metrics`: the module itself
                    found.append(Import(module, sub, None, node.lineno))
                    aliases[alias.asname or alias.name] = sub
                else:
                    found.append(Import(module, target, alias.name, node.lineno))
    # `mod._private` on a module bound above counts as importing that private name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            found.append(Import(module, aliases[node.value.id], node.attr, node.lineno))
    return found


def all_imports() -> list[Import]:
    return [imp for path in sorted(ROOT.rglob("*.py")) for imp in imports_of(path)]


def against_layering(imp: Import) -> str | None:
    """Why this import goes up the picture, or None."""
    src, dst = part(imp.module), part(imp.target)
    if src == dst:
        return None
    if src in EDGES and dst in DECISIONS | ABOVE_DECISIONS:
        return f"the edges ({src}) must not import {dst}"
    if src in DECISIONS and dst in ABOVE_DECISIONS:
        return f"the decisions ({src}) must not import {dst}"
    if src == "store" and dst not in STORE_MAY_IMPORT:
        return f"store imports only {sorted(STORE_MAY_IMPORT - {'store'})}, not {dst}"
    if src == "web" and dst == "api":
        return "web must not import api: share the piece from the layer below"
    if src == "models":
        return "models imports nothing of procure"
    return None


def private_across(imp: Import) -> bool:
    if part(imp.module) == part(imp.target):
        return False
    names = imp.target.split(".")[1:] + ([imp.name] if imp.name else [])
    return any(n.startswith("_") and not n.startswith("__") for n in names)


def where(imp: Import) -> str:
    name = f" ({imp.name})" if imp.name else ""
    return f"{imp.module}:{imp.line} imports {imp.target}{name}"


def test_the_checker_reads_the_package() -> None:
    found = all_imports()
    # the checker sees what it must: relative and absolute imports, modules taken by name
    assert any(i.module == "procure.web.actions" and i.target.startswith("procure.") for i in found)
    assert part("procure.cli.runs") == "cli" and part("procure.demos.serve") == "demos"
    assert against_layering(Import("procure.gpu.x", "procure.fleet.y", None, 1))
    assert against_layering(Import("procure.web.x", "procure.api.schemas", "Start", 1))
    assert against_layering(Import("procure.store.x", "procure.agent", None, 1))
    assert private_across(Import("procure.sim.x", "procure.fleet.controller", "_sync", 1))
    assert not private_across(Import("procure.fleet.x", "procure.fleet.controller", "_sync", 1))


def test_no_import_goes_up_the_layers() -> None:
    wrong = [f"{where(i)}: {why}" for i in all_imports() if (why := against_layering(i))]
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_used_across_packages() -> None:
    wrong = [where(i) for i in all_imports() if private_across(i)]
    assert not wrong, "\n".join(wrong)
