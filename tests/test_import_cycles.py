"""No import cycle inside the package: gptfast, gptfast.kernels (kernels/) and gptfast.bench
(bench/), counting imports inside functions too (a lazy import hides a cycle from Python, not
from the reader who has to understand one module before the other). Entry points named by a
"module:function" string (the kernels registered in gptfast.functional, the modern GPT class in
gptfast.model) are late bindings, not imports: the named module builds on the naming one."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder in the checkout -> the package name it is installed as (setup.py's package_dir)
PACKAGES = {"gptfast": "gptfast", "kernels": "gptfast.kernels", "bench": "gptfast.bench"}


def _modules():
    """{module name: path} for every .py file of the three packages."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported(name, node, modules):
    """The in-package modules an import statement of module ``name`` loads."""
    is_package = modules[name].name == "__init__.py"
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        # `from package import module` loads the submodule; `from module import name` the module
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                   for alias in node.names]
    return {t for t in targets if t in modules and t != name}


def import_graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _imported(name, node, modules)
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_graph_sees_the_packages_imports():
    graph = import_graph()
    assert "gptfast.reference" in graph["gptfast.functional"]
    assert "gptfast.bench.common" in graph["gptfast.bench.gpt"]
    assert "gptfast.backend" in graph["gptfast.kernels.attention"]
    # a lazy import inside a function counts
    assert "gptfast.bench.headline.child" in graph["gptfast.bench.headline"]


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (each a set of modules importing each other): " + "; ".join(
        " <-> ".join(component) for component in found)


def test_per_kernel_bench_modules_do_not_import_the_headline_runner():
    """bench/headline/ builds on the per-kernel modules and the measurement core, never the
    reverse: only the sweep (the `gptfast bench` dispatcher) imports the headline package."""
    graph = import_graph()
    headline = {m for m in graph if m == "gptfast.bench.headline"
                or m.startswith("gptfast.bench.headline.")}
    importers = {m for m, imported in graph.items() if m not in headline and imported & headline}
    assert importers == {"gptfast.bench.sweep"}
    assert "gptfast.bench.nanochat_attention" in graph["gptfast.bench.headline.nanochat"]
