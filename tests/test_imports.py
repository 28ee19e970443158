"""ct_jax has no import cycle (imports inside functions count: they close cycles too, only later),
and the test run checks annotations at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of the package (packages by their __init__.py)."""
    names = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (functions included)."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name: its module
                    target = target.rpartition(".")[0]
                if target:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_ct_jax_has_no_import_cycle():
    graph = import_graph(ROOT / "ct_jax")
    assert "ct_jax.bench.harness" in graph and "ct_jax.model" in graph["ct_jax.training"], "the graph is empty"
    assert not cycles(graph), f"import cycles in ct_jax: {cycles(graph)}"


def test_the_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("import pkg.a as a\n")
    (package / "d.py").write_text("from pkg import a\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_every_public_module_is_reachable_from_import_ct_jax():
    import ct_jax

    modules = [path.stem for path in (ROOT / "ct_jax").glob("*.py")]
    packages = [path.parent.name for path in (ROOT / "ct_jax").glob("*/__init__.py")]
    public = sorted(name for name in [*modules, *packages] if not name.startswith("_"))
    assert {"training", "evaluation", "parity", "generation", "commands"} <= set(public), public
    assert set(public) <= set(ct_jax.__all__) and set(ct_jax.__all__) <= set(dir(ct_jax)), ct_jax.__all__
    for name in public:
        module = getattr(ct_jax, name)
        assert isinstance(module, types.ModuleType) and module.__name__ == f"ct_jax.{name}", (name, module)
    assert ct_jax.CompressiveTransformer is ct_jax.model.CompressiveTransformer
    assert ct_jax.Memory is ct_jax.memory.Memory and ct_jax.ModelConfig is ct_jax.config.ModelConfig
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ct_jax.nope  # noqa: B018


def test_import_ct_jax_is_lazy():
    """`import ct_jax` loads no JAX and no submodule until one is used; then it works without an explicit import."""
    code = ("import sys, ct_jax; loaded = sorted(m for m in sys.modules if m.startswith(('jax', 'ct_jax.'))); "
            "assert not loaded, loaded; ct_jax.training.TrainConfig; ct_jax.evaluation.evaluate_stream; "
            "print(ct_jax.parity.BF16_DECODE_LOGITS_ATOL > 0, 'jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr[-2000:]


def test_annotations_are_checked_at_run_time():
    """tests/conftest.py's import hook is on: a call that breaks an annotation fails in the checker."""
    import jax.numpy as jnp
    import jaxtyping

    from ct_jax.sampling import top_k

    top_k(jnp.zeros((2, 5)))
    with pytest.raises(jaxtyping.TypeCheckError, match="logits"):
        top_k(jnp.zeros((2, 5), jnp.int32))  # Float[Array, "... v"] gets integers
