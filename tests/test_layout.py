"""The package's shape, read from the code (ast; imports inside functions count):

- the core is the modules at the package top; it imports nothing from the folders below it;
- no import circle anywhere in the package;
- every file:function the README's reading path names exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "higgs_min"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `path` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("higgs_min"):
            for target in [node.module] + [f"{node.module}.{a.name}" for a in node.names]:
                if target in mods:
                    out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    g = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    # importing higgs_min.x.y runs higgs_min.x's __init__ first: that edge is the interpreter's, not a design choice
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in g.items()}


def is_core(module: str) -> bool:
    return module.count(".") == 1 and module != "higgs_min.__main__"


def test_core_imports_nothing_from_the_folders():
    g = graph()
    core = sorted(m for m in g if is_core(m))
    assert {"higgs_min.model", "higgs_min.lora", "higgs_min.loss", "higgs_min.loop", "higgs_min.checkpoint"} <= set(core)
    bad = {m: sorted(t for t in g[m] if not is_core(t)) for m in core}
    assert not {m: t for m, t in bad.items() if t}, f"core modules importing folder modules: {bad}"


def on_circles(g: dict[str, set[str]]) -> list[str]:
    """The modules from which an import path leads back to themselves."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in g.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return sorted(m for m in g if m in reach(m))


def test_no_import_circles():
    assert on_circles(graph()) == []


def test_the_checks_can_fail():
    """Controls: one added edge makes a circle, and a core -> folder import is seen as one."""
    g = graph()
    assert "higgs_min.loop" in g["higgs_min.train.run"]
    g["higgs_min.loop"] = g["higgs_min.loop"] | {"higgs_min.train.run"}
    assert {"higgs_min.loop", "higgs_min.train.run"} <= set(on_circles(g))
    assert is_core("higgs_min.loop") and not is_core("higgs_min.train.run")


def test_readme_reading_path_names_real_functions():
    """Every `higgs_min/...py:name` (or `:Class.method`) the README names is defined in that file."""
    text = (ROOT / "README.md").read_text() + (PKG / "__init__.py").read_text()
    refs = set(re.findall(r"(higgs_min/[\w/]+\.py):([A-Za-z_][\w.]*)", text))
    assert len(refs) >= 10, f"the README's reading path names too few functions: {sorted(refs)}"
    missing = []
    for file, name in sorted(refs):
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
            continue
        tree = ast.parse(path.read_text())
        scope = tree.body
        for part in name.split("."):
            found = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
            if found is None:
                missing.append(f"{file}:{name}")
                break
            scope = found.body
    assert not missing, f"the README names code that does not exist: {missing}"


def test_pyproject_ships_every_package():
    """A non-editable install (`pip install .`, a wheel) carries exactly the packages pyproject.toml lists: every
    folder of higgs_min/ with an __init__.py must be there (higgs_min.v3 was missing, so such an install failed at
    `import higgs_min.train`, whose options import higgs_min.v3.config)."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert present - listed == set(), f"pyproject.toml [tool.setuptools] packages misses {sorted(present - listed)}"
    assert listed - present == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - present)}"


def test_readme_resume_table_lists_every_option_in_its_class():
    """README's "Options, and what a resume refuses" table: each option of train/options.py OPTIONS in the row of
    its resume class, and no other (the table is what a user reads before a resume is refused)."""
    from higgs_min.train.options import OPTIONS
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1] in ("TRAINED", "SHAPE", "OPERATIONAL"):
            rows[cells[1]] = set(re.findall(r"`(--[a-z0-9-]+)`", cells[2]))
    assert set(rows) == {"TRAINED", "SHAPE", "OPERATIONAL"}, f"README's resume table rows: {sorted(rows)}"
    wrong = {flag: (resume, [k for k, v in rows.items() if flag in v]) for flag, resume, _ in OPTIONS
             if flag not in rows[resume.upper()]}
    extra = sorted(set().union(*rows.values()) - {flag for flag, _, _ in OPTIONS})
    assert not wrong, f"options missing from their README row (class, rows found in): {wrong}"
    assert not extra, f"README's resume table names options that do not exist: {extra}"
