"""
The layers of docs/architecture.md, held by the code's own imports (lazy ones included):
the method's files import no machinery, plumbing/ imports nothing above it, no two files
import each other, directly or around a circle.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = ("model", "lora", "gast", "data")
MACHINERY = ("plumbing", "testbed", "methods", "evaluation", "tools", "gradot", "run")
ABOVE_PLUMBING = MACHINERY[1:] + ("train", "sample")
SCRIPTS = ("train", "sample", "tools.bench", "tools.compare")


def modules():
    """{module name: path} of every non-test Python file in the tree."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                out[rel.replace(os.sep, ".")] = os.path.join(folder, name)
    return out


def imports(path, known):
    """The tree's modules that the file at path imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        found |= {n for n in names if n in known}
    return found


def graph():
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def reached(edges, start):
    """Every module that importing `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for t in edges[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def below(edges, modules, banned):
    """{module: the banned modules it reaches}, for those that reach any."""
    out = {m: sorted(t for t in reached(edges, m) if t.split(".")[0] in banned) for m in modules}
    return {m: t for m, t in out.items() if t}


def test_the_method_imports_no_machinery():
    edges = graph()
    assert not below(edges, METHOD, MACHINERY)


def test_plumbing_imports_nothing_above_it():
    edges = graph()
    assert not below(edges, [m for m in edges if m.startswith("plumbing.")], ABOVE_PLUMBING)


def test_no_file_imports_a_script():
    edges = graph()
    bad = {m: sorted(ts & set(SCRIPTS)) for m, ts in edges.items() if m not in SCRIPTS}
    assert not {m: t for m, t in bad.items() if t}, bad


def test_no_circle_of_imports():
    edges = graph()
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_docs_architecture_holds_the_route_as_the_code_counts_it():
    """docs/architecture.md's route table is what `python tests/route.py` prints now."""
    from route import table

    doc = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    assert table() in doc, "rerun python tests/route.py and paste its table into the doc"
