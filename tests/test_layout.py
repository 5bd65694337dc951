"""The package's rooms and which way imports go (README "Layout"): every import, at the top of a
module or inside a function, goes to the importer's own room or to a room on a lower floor, and
no set of modules imports itself round in a circle."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adaprelora_diffusion"

#: floor of each room; a room imports only itself and rooms on lower floors (not its neighbours on its own floor)
FLOORS = {"optim": 0, "engine": 0, "demo": 1, "dreambooth": 2, "llm": 2, "training": 3, "app": 4}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The package and app modules that ``path`` imports anywhere in it (relative imports resolved;
    ``from a import b`` counts as importing ``a.b`` when that is a module)."""
    own = _module_name(path)
    package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")]
            found.update(subs if subs and len(subs) == len(node.names) else [name, *subs])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n.split(".")[0] in ("adaprelora_diffusion", "app", "benchmarks") and n != own}


def _room_imports(room: str) -> dict[str, set[str]]:
    """{module path inside the package: what it imports} for one room (tests/llm/test_layout_llm.py uses it)."""
    return {str(p.relative_to(PACKAGE)): _imports(p) for p in (PACKAGE / room).rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "app").rglob("*.py")]
    return {_module_name(p): _imports(p) for p in files}


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "app":
        return "app"
    return parts[1] if len(parts) > 1 else ""


def test_importing_the_optimizer_core_loads_no_diffusers_or_gradio():
    code = "import sys, adaprelora_diffusion.optim; print(sorted(m for m in ('diffusers', 'gradio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run sideways (another room on the same floor), up a floor, or into benchmarks/."""
    wrong = []
    for module, names in graph.items():
        room = _room(module)
        for name in names:
            target = "benchmarks" if name.startswith("benchmarks") else _room(name)
            if target == "benchmarks" or (target != room and not FLOORS.get(target, 99) < FLOORS.get(room, -1)):
                wrong.append(f"{module} -> {name}")
    return sorted(wrong)


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk meets, as "a -> b -> a"."""
    found, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            if state.get(name) == "open":
                found.append(" -> ".join(trail[trail.index(name):] + [name]))
            elif name in graph and name not in state:
                visit(name, trail + [name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_imports_run_down_the_floors_only():
    assert not wrong_way(_graph()), "imports that run sideways or up a floor:\n" + "\n".join(wrong_way(_graph()))


def test_there_is_no_import_circle():
    assert not circles(_graph()), "import circles:\n" + "\n".join(circles(_graph()))


def test_the_checks_catch_the_old_descriptor_circle():
    """demo/descriptor.py once imported MODEL_DESCRIPTOR from dreambooth/model_loading.py, which imports the demo back."""
    graph = _graph()
    assert "adaprelora_diffusion.engine.model_descriptor" in graph["adaprelora_diffusion.demo.descriptor"]
    old = {**graph, "adaprelora_diffusion.demo.descriptor": {"adaprelora_diffusion.dreambooth.model_loading"}}
    assert wrong_way(old) == ["adaprelora_diffusion.demo.descriptor -> adaprelora_diffusion.dreambooth.model_loading"]
    assert any("demo.descriptor -> adaprelora_diffusion.dreambooth.model_loading" in c for c in circles(old))


def test_the_demo_is_reached_only_to_pick_the_default_model():
    source = (PACKAGE / "dreambooth" / "model_loading.py").read_text()
    tree = ast.parse(source)
    users = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and any(isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("demo") for n in ast.walk(f))]
    assert users == ["default_model"]
    for module, names in _graph().items():
        if _room(module) != "demo" and module != "adaprelora_diffusion.dreambooth.model_loading":
            assert not any(_room(n) == "demo" for n in names), module
