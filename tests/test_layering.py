"""The package's layering, read from the import statements of every module (top-level and
function-local imports alike): the model knows nothing of parallelism, checkpoints know nothing
of training, and parallelism knows nothing of checkpoint files."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qtrain"

# (importing package, forbidden package): docs/architecture.md, "Invariants".
RULES = [("models", "parallel"), ("checkpoint", "train"), ("parallel", "checkpoint")]


def imported_modules(source: str, module: str) -> list[str]:
    """The qtrain module each import statement of `source` names, relative imports resolved.
    `module` is the file's dotted path under qtrain/ ("parallel.mesh", "parallel.__init__")."""
    package = ["qtrain", *module.split(".")[:-1]]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            # `from qtrain import checkpoint`: the names are the subpackages
            out += [f"{name}.{a.name}" for a in node.names] if name == "qtrain" else [name]
    return [m for m in out if m == "qtrain" or m.startswith("qtrain.")]


def violations(sources: dict[str, str]) -> list[str]:
    """'qtrain/<file> imports qtrain.<b>...' for each rule broken; sources: {module path under qtrain: text}."""
    found = []
    for module, text in sources.items():
        top = module.split(".")[0]
        for name in imported_modules(text, module):
            parts = name.split(".")
            if len(parts) > 1 and (top, parts[1]) in RULES:
                found.append(f"qtrain/{module.replace('.', '/')}.py imports {name}")
    return found


def package_sources() -> dict[str, str]:
    return {".".join(path.relative_to(PACKAGE).with_suffix("").parts): path.read_text(encoding="utf-8")
            for path in PACKAGE.rglob("*.py")}


def test_layering_rules_hold():
    sources = package_sources()
    assert {"models.qwen3", "parallel.__init__", "checkpoint.dcp", "train.loop"} <= set(sources)
    assert violations(sources) == []


@pytest.mark.parametrize("module, text", [
    ("models.qwen3", "def f():\n    from qtrain.parallel.weights import materialize\n"),
    ("checkpoint.convert", "import qtrain.train.lora\n"),
    ("parallel.mesh", "from qtrain.checkpoint import layout\n"),
    ("parallel.mesh", "from ..checkpoint.layout import split_layers\n"),
    ("parallel.__init__", "from .. import checkpoint\n"),
])
def test_a_forbidden_import_is_found(module, text):
    assert len(violations({module: text})) == 1
    assert violations({module: "from qtrain.errors import QtrainError\nfrom . import x\n"}) == []
