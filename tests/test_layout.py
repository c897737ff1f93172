"""The package's layering: data flows config -> model / data -> train -> trainer loop -> tools -> entry points.
A module imports project modules of its own layer or the layers above it in this list, never below; the
tools open runs through ``workdir.py`` and never import the trainer; there are no import cycles."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = [
    ("config",),
    ("sharding", "exchange"),
    ("attention", "layers", "scanning", "stem", "variants", "model", "accounting", "sources", "store", "prep_pool", "corpus",
     "data"),
    ("optim", "sparse", "steps", "offload", "checkpoint", "lock", "preemption", "peers", "writer"),
    ("trainer", "cli"),
    ("workdir", "scoring", "sampling", "hotrows", "editor", "edit_batch", "editing", "tasks", "evaluate",
     "lm_eval_model", "hf", "analysis", "aot", "data_prep"),
    ("experiments.compare", "experiments.knowledge"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
TOOLS = LAYERS[5]


def _module_files() -> dict[str, Path]:
    pkg = REPO / "stem_jax"
    return {".".join(p.relative_to(pkg).with_suffix("").parts): p for p in pkg.rglob("*.py")
            if p.name != "__init__.py"}


def project_imports(path: Path) -> set[str]:
    """The stem_jax modules a file imports, anywhere in the file (``from stem_jax import a, b``,
    ``from stem_jax.a import x``, ``import stem_jax.a``)."""
    known = set(_module_files())
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stem_jax":
            rest = node.module[len("stem_jax"):].lstrip(".")
            if rest:
                out.add(rest)
            else:
                out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.Import):
            out |= {a.name[len("stem_jax."):] for a in node.names if a.name.startswith("stem_jax.")}
    return out


def test_every_module_has_a_layer():
    assert set(_module_files()) == set(LAYER), "add new modules to LAYERS"


@pytest.mark.parametrize("module", sorted(LAYER))
def test_imports_come_from_the_same_layer_or_above(module):
    path = _module_files()[module]
    below = {m: LAYER[m] for m in project_imports(path) if LAYER[m] > LAYER[module]}
    assert not below, f"{module} (layer {LAYER[module]}) imports modules of later layers: {below}"
    if module in TOOLS:
        assert "trainer" not in project_imports(path), f"{module} builds the trainer; open runs with workdir.py"


def test_no_import_cycles():
    graph = {m: project_imports(p) for m, p in _module_files().items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join(stack + [m, n])
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from stem_jax import trainer\nfrom stem_jax.steps import loss\nimport stem_jax.sparse\n")
    assert project_imports(bad) == {"trainer", "steps", "sparse"}
