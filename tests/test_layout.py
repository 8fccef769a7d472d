"""The import contract: each package of keyframes/ is a layer and imports only from the layers
below it; only tracking imports MLflow; generation, pipeline, conditioning (and everything
under them) never import Hydra, tracking or the command-line modules."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "keyframes"
# Lowest first. The top-level modules (run, sync, compare, review, styles) are the command line.
LAYERS = [
    "errors",
    "config",
    "shotlist",
    "pipeline",
    "scoring",
    "conditioning",
    "outputs",
    "generation",
    "tracking",
    "cli",
]
CLI = {"run", "sync", "compare", "review", "styles", "replicas", "api"}
# third-party packages only some layers may use
ONLY_IN = {"mlflow": {"tracking"}, "hydra": {"config", "tracking", "cli"}}


def layer_of(module: str) -> str:
    """keyframes.generation.session -> generation; keyframes.run -> cli."""
    part = module.split(".")[1]
    return "cli" if part in CLI else part


def imports_of(source: str, module: str) -> set[str]:
    """Every module named by an import statement anywhere in the source (also inside
    functions), relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            if base == "keyframes":  # `from keyframes import generation`
                names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def violations(sources: dict[str, str]) -> list[str]:
    """What breaks the contract, for modules given as {dotted name: source}."""
    found = []
    for module, source in sources.items():
        own = layer_of(module)
        for name in sorted(imports_of(source, module)):
            top = name.split(".")[0]
            if top == "keyframes" and name.count(".") >= 1:
                if LAYERS.index(layer_of(name)) > LAYERS.index(own):
                    found.append(f"{module} ({own}) imports {name} ({layer_of(name)})")
            elif top in ONLY_IN and own not in ONLY_IN[top]:
                found.append(f"{module} ({own}) imports {name}")
    return found


def package_sources() -> dict[str, str]:
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            sources[".".join(parts)] = path.read_text()
    return sources


def test_every_module_belongs_to_a_layer():
    for module in package_sources():
        assert layer_of(module) in LAYERS, f"{module}: put it in a layer package"


def test_the_packages_import_only_downwards():
    assert violations(package_sources()) == []


def test_the_contract_catches_a_generation_module_that_imports_mlflow():
    bad = {
        "keyframes.generation.session": "import torch\n\ndef log():\n    import mlflow\n",
        "keyframes.pipeline.load": "from keyframes.tracking.store import log_run\n",
        "keyframes.conditioning.tint": "from hydra import compose\n",
        "keyframes.outputs.records": "from ..generation import session\n",
    }
    assert violations(bad) == [
        "keyframes.generation.session (generation) imports mlflow",
        "keyframes.pipeline.load (pipeline) imports keyframes.tracking.store (tracking)",
        "keyframes.conditioning.tint (conditioning) imports hydra",
        "keyframes.outputs.records (outputs) imports keyframes.generation (generation)",
    ]


def test_generation_core_imports_neither_hydra_nor_mlflow():
    """The same, as Python sees it: importing the core loads neither library."""
    code = (
        "import sys, keyframes.generation.recipe, keyframes.pipeline.load, "
        "keyframes.scoring.clip; print(sorted(m for m in ('hydra', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Layers holding data and records: every parameter is annotated there, so that an object from a
# layer above cannot pass through them untyped (the duck-typed upward use imports cannot show).
FULLY_ANNOTATED = {"errors", "config", "shotlist", "scoring", "outputs"}
# The whole settings: only the config layer (which resolves them) and the recipe's setup take them.
WHOLE_CONFIG = {"Config", "RunPlan"}
WHOLE_CONFIG_ALLOWED = {"keyframes.generation.recipe.KeyframesRecipe.setup"}


def _imported_names(tree: ast.AST, module: str) -> dict[str, str]:
    """name -> the module it comes from, for every import in the source (TYPE_CHECKING too)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                names[alias.asname or alias.name] = base
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name
    return names


def _annotation_names(node: ast.AST | None) -> set[str]:
    """The first name of every dotted name in an annotation (string annotations parsed)."""
    if node is None:
        return set()
    found = set()
    for part in ast.walk(node):
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            found |= _annotation_names(ast.parse(part.value, mode="eval").body)
        elif isinstance(part, ast.Name):
            found.add(part.id)
    return found


def _functions(tree: ast.AST, prefix: str):
    """(qualified name, function node) for every function, methods named by their class."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}.{node.name}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}.{node.name}", node
            yield from _functions(node, f"{prefix}.{node.name}")


def annotation_problems(sources: dict[str, str]) -> list[str]:
    """Annotations that point up the layers, name nothing the module defines or imports,
    are missing in a data layer, or take the whole settings outside the config layer."""
    import builtins

    found = []
    for module, source in sources.items():
        tree, own = ast.parse(source), layer_of(module)
        imported = _imported_names(tree, module)
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        defined |= {
            t.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for name, function in _functions(tree, module):
            arguments = function.args
            params = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            params += [a for a in (arguments.vararg, arguments.kwarg) if a]
            for param in params:
                if param.arg in ("self", "cls"):
                    continue
                if param.annotation is None:
                    if own in FULLY_ANNOTATED:
                        found.append(f"{name}({param.arg}): not annotated")
                    continue
                for word in sorted(_annotation_names(param.annotation)):
                    origin = imported.get(word)
                    if origin is None and word not in defined and not hasattr(builtins, word):
                        found.append(f"{name}({param.arg}): {word} is not imported")
                    elif (
                        origin
                        and origin.startswith("keyframes.")
                        and (LAYERS.index(layer_of(origin)) > LAYERS.index(own))
                    ):
                        found.append(f"{name}({param.arg}): {word} from {origin} is above {own}")
                    elif word in WHOLE_CONFIG and own not in ("config", "cli"):
                        if name not in WHOLE_CONFIG_ALLOWED:
                            found.append(f"{name}({param.arg}): takes the whole {word}")
    return found


def test_annotations_follow_the_layers():
    assert annotation_problems(package_sources()) == []


def test_the_annotation_check_catches_duck_typed_upward_use():
    bad = {
        "keyframes.outputs.records": "def run_info(ctx, session: 'Session') -> None: ...\n",
        "keyframes.outputs.parts": (
            "from keyframes.generation.recipe import RenderResult\n"
            "def merge(result: list[RenderResult]): ...\n"
        ),
        "keyframes.conditioning.tint": (
            "from keyframes.config.plan import RunPlan\n"
            "class Tint:\n    def __init__(self, plan: RunPlan, pipe): ...\n"
        ),
    }
    assert annotation_problems(bad) == [
        "keyframes.outputs.records.run_info(ctx): not annotated",
        "keyframes.outputs.records.run_info(session): Session is not imported",
        "keyframes.outputs.parts.merge(result): RenderResult from keyframes.generation.recipe "
        "is above outputs",
        "keyframes.conditioning.tint.Tint.__init__(plan): takes the whole RunPlan",
    ]


MAX_FUNCTION_LINES = 60


def long_functions(source: str, name: str) -> list[str]:
    return [
        f"{name}::{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_is_longer_than_a_screen():
    found = [
        line
        for path in sorted(PACKAGE.rglob("*.py"))
        for line in long_functions(path.read_text(), str(path.relative_to(PACKAGE)))
    ]
    assert found == []
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n", "m.py") == ["m.py::f (61 lines)"]
