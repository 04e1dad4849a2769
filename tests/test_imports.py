"""Importing lit_vhead: no import cycle among its modules, each module imports on its own in a fresh interpreter,
the light entry points stay light, and no import changes warning filters or logging."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = Path(ROOT, "lit_vhead")
# Third-party libraries that may change warning filters or loggers when they are imported themselves.
THIRD_PARTY = ("torch", "transformers", "lightning", "hydra", "omegaconf", "peft", "numpy")


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _module_level_imports(tree: ast.AST):
    """Import statements that run when the module is imported: not inside functions, not under TYPE_CHECKING."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of lit_vhead whose code runs when it imports}``. Importing ``a.b.c`` runs ``a``, ``a.b``
    and ``a.b.c``; a module's own parent packages are already running, so they count only where it takes a name
    from one (which the parent may not have defined yet)."""
    names = set(module_names())
    graph: dict[str, set[str]] = {}
    for name in names:
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
        path = PACKAGE.parent / (name.replace(".", "/") + ("/__init__.py" if is_package else ".py"))
        package = name if is_package else name.rpartition(".")[0]
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                taken = []
            else:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                    else node.module
                targets = [base]
                taken = [f"{base}.{alias.name}" for alias in node.names]
                targets += [t for t in taken if t in names]
                if base in ancestors and any(t not in names for t in taken):
                    edges.add(base)  # a name read from a parent package that is still running
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in names and prefix not in ancestors and prefix != name:
                        edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_lit_vhead_modules_import_one_another_without_a_cycle():
    graph = import_graph()
    assert "lit_vhead.config" in graph["lit_vhead.module"]  # the graph is real
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle_through_a_package_init():
    """What issue 21 found: ``ppo/__init__`` importing the engine, which imports config, which imports ``ppo``."""
    graph = {"p": {"p.engine"}, "p.engine": {"c"}, "c": {"p", "p.math"}, "p.math": set()}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"p", "p.engine", "c"}


CHILD = textwrap.dedent(
    """
    import importlib, json, logging, os, sys, traceback, warnings
    for lib in {third_party!r}:
        importlib.import_module(lib)

    def logging_state():
        loggers = dict(logging.root.manager.loggerDict, root=logging.root)
        return {{name: (lg.level, list(lg.handlers), list(lg.filters), lg.propagate, lg.disabled)
                for name, lg in loggers.items() if isinstance(lg, logging.Logger)}}

    results = {{}}
    for name, code in {entries!r}.items():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                filters, logs = list(warnings.filters), logging_state()
                exec(code, {{}})
                new_filters = [str(f) for f in warnings.filters if f not in filters]
                after = logging_state()
                changed = [n for n, s in logs.items() if after[n] != s]
                changed += [n for n, s in after.items() if n not in logs and s != (0, [], [], True, False)]
                report = {{"filters": new_filters, "loggers": changed}}
            except BaseException:
                report = {{"error": traceback.format_exc()}}
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            results[name] = json.loads(pipe.read() or '{{"error": "no report"}}')
        os.waitpid(pid, 0)
    print(json.dumps(results))
    """
)


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def imported_alone() -> dict:
    """Each module imported on its own, in a process forked from one that imported only the third-party libraries."""
    entries = {name: f"import {name}" for name in module_names()}
    entries.update(ORDERS)
    return json.loads(run_python(CHILD.format(third_party=THIRD_PARTY, entries=entries)))


# The PPO package's engine, reached first through the package or after the modules it imports (issue 21: a
# partially initialised module). Checked with the other imports, in a fresh process each.
ORDERS = {
    "engine from the package": "from lit_vhead.ppo import PPOCore",
    "engine after config": "import lit_vhead.config\nfrom lit_vhead.ppo import PPOCore",
    "engine after rollout": "import lit_vhead.rollout\nfrom lit_vhead.ppo import PPOCore",
    "config after engine": "from lit_vhead.ppo import PPOCore\nimport lit_vhead.config",
}


def test_every_module_imports_on_its_own(imported_alone):
    errors = {name: r["error"].splitlines()[-1] for name, r in imported_alone.items() if "error" in r}
    assert errors == {}
    assert len(imported_alone) == len(module_names()) + len(ORDERS) > 30


def test_importing_any_module_leaves_warning_filters_and_logging_as_they_were(imported_alone):
    changed = {name: r for name, r in imported_alone.items() if r.get("filters") or r.get("loggers")}
    assert changed == {}


def test_the_models_and_the_config_import_no_lightning_hydra_omegaconf_or_peft():
    """``import lit_vhead``, ``lit_vhead.modeling``, ``lit_vhead.config`` and the names a TRL script imports (through
    ``lit_vhead``'s lazy attributes), in one fresh process: none of them brings these (``lit_vhead`` and the PPO math
    not even transformers)."""
    line = run_python(
        "import sys, json\n"
        "import lit_vhead, lit_vhead.ppo\n"  # the PPO math: torch alone
        "heavy = [sorted(m for m in ('lightning', 'hydra', 'omegaconf', 'peft', 'transformers') if m in sys.modules)]\n"
        "import lit_vhead.modeling, lit_vhead.config\n"
        "from lit_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig\n"
        "heavy.append(sorted(m for m in ('lightning', 'hydra', 'omegaconf', 'peft') if m in sys.modules))\n"
        "print(json.dumps(heavy + ['transformers' in sys.modules]))"
    )
    assert json.loads(line) == [[], [], True]
