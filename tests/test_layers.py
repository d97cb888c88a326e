"""The package's layers point one way (README "Layout"): a module imports only its own layer or lower ones,
and no two modules import each other, directly or round a longer loop. Checked on the source, imports inside
functions included, so a lazy import cannot hide an upward arrow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module's layer is the longest prefix listed
LAYERS = [
    ("base", ["ssamba", "ssamba.base"]),
    ("config", ["ssamba.config"]),
    ("ops", ["ssamba.ops"]),
    ("data", ["ssamba.data"]),
    ("model", ["ssamba.model"]),
    ("train", ["ssamba.train"]),
    ("sweep", ["ssamba.sweep"]),
    ("tools", ["ssamba.bench", "ssamba.kernels", "ssamba.pretrain", "ssamba.finetune"]),
    ("reporting", ["ablations"]),
]


def layer_of(module: str) -> int:
    best, rank = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, rank = p, i
    if module.endswith(".__main__"):  # a command line sits on top of what it runs
        return len(LAYERS) - 2 if rank is not None and rank < len(LAYERS) - 2 else rank
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Project modules imported by ``path`` (``from a import b`` counts ``a.b`` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
    return {m for m in found if m.split(".")[0] in ("ssamba", "ablations") and _is_module(m)}


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def sources() -> list[Path]:
    return sorted(p for top in ("ssamba", "ablations") for p in (ROOT / top).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in sources()}


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer_of(m) is None] == []


def upward(g: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in g.items()
        for d in deps
        if layer_of(d) > layer_of(m) and not d.endswith(".__main__") and not d.startswith(m + ".")
    ]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    # a package __init__ importing its own modules (or they it) is not a loop of the layout
    g = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")} for m, deps in g.items()}
    state, found = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_points_up():
    assert upward(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_can_fail():
    """A data module importing the sweep layer, and a loop of three, are both caught."""
    assert upward({"ssamba.data.dataset": {"ssamba.sweep.trial"}}) == [
        "ssamba.data.dataset (data) imports ssamba.sweep.trial (sweep)"
    ]
    assert upward({"ssamba.kernels.build": {"ssamba.ops.backends"}}) == []  # tooling may use the runtime
    assert cycles(
        {
            "ssamba.model.a": {"ssamba.model.b"},
            "ssamba.model.b": {"ssamba.model.c"},
            "ssamba.model.c": {"ssamba.model.a"},
        }
    ) == [["ssamba.model.a", "ssamba.model.b", "ssamba.model.c", "ssamba.model.a"]]
    assert layer_of("ssamba.data.__main__") == layer_of("ssamba.bench.encoder")  # a command line is a tool
