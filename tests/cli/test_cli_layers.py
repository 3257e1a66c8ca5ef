"""Layers, read from the source (AST, nothing imported): imports run down, never up.

* nothing below the CLI imports it (the job's entrypoint lives with the CLI);
* the mathematics (solvers, geometry, batch) knows nothing of Ray, files or
  the runner; storage knows nothing of JAX or Ray; interop (Ray Data) needs
  nothing of the runner; the options import nothing heavy;
* helpers that used to exist in several copies exist once, and dead code stays gone;
* no process state behind ``global`` statements, no function body over 80
  lines and no class over 300 lines in raybary/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "raybary"


def _modules(package: str) -> list[Path]:
    return sorted((PKG / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(), str(path))
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    package = parts[:-1]  # of a module, and of a package's __init__ alike
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package[: len(package) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _hits(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(PKG.parent)} imports {name}"
            for p in _modules(package) for name in sorted(_imports(p))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_the_import_walker_sees_every_form():
    here = PKG / "cli" / "job_entry.py"
    assert "raybary.cli" in _imports(here) and "ray" in _imports(here)
    assert "raybary.cli.errors" in _imports(PKG / "cli" / "run_cmds.py")


@pytest.mark.parametrize("package", ["jobs", "runner", "storage", "solvers", "batch", "geometry"])
def test_nothing_below_the_cli_imports_it(package):
    assert _modules(package), package
    assert not _hits(package, ("raybary.cli",))


@pytest.mark.parametrize("package", ["solvers", "geometry", "batch"])
def test_the_mathematics_knows_nothing_of_ray_files_or_the_runner(package):
    assert not _hits(package, ("ray", "raybary.storage", "raybary.runner", "raybary.jobs"))


def test_storage_knows_nothing_of_jax_or_ray_and_interop_nothing_of_the_runner():
    assert not _hits("storage", ("jax", "ray", "raybary.batch", "raybary.solvers",
                                 "raybary.runner"))
    assert not _hits("interop", ("raybary.runner",))
    light = ("jax", "ray", "numpy", "pyarrow", "raybary.batch", "raybary.runner",
             "raybary.storage")
    for path in (PKG / "options.py", PKG / "solvers" / "config.py", PKG / "errors.py"):
        names = _imports(path)
        assert not [n for n in names if any(n == f or n.startswith(f + ".") for f in light)], path


def _body_lines(node: ast.FunctionDef) -> int:
    """Lines of a function's body, its docstring left out."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def test_no_globals_no_long_functions_no_huge_classes():
    long, huge, globals_ = [], [], []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(PKG.parent)}:{node.lineno if hasattr(node, 'lineno') else 0}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > 80:
                long.append(f"{where} {node.name}")
            elif isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                huge.append(f"{where} {node.name}")
            elif isinstance(node, ast.Global):
                globals_.append(where)
    assert not long and not huge and not globals_, (long, huge, globals_)


def _definitions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.setdefault(node.name, []).append(str(path.relative_to(PKG.parent)))
    return found


def test_one_copy_of_each_helper_and_no_dead_code():
    defs = _definitions()
    assert defs.get("peak_rss_mb") == ["raybary/runner/shard.py"]
    assert defs.get("next_pow2") == ["raybary/batch/padding.py"]
    assert defs.get("marginal_components") == ["raybary/density.py"]
    assert defs.get("list_array") == ["raybary/storage/arrow.py"]
    assert defs.get("offsets") == ["raybary/storage/arrow.py"]
    assert defs.get("shard_bounds") == ["raybary/storage/base.py"]
    assert defs.get("columns_to_table") == ["raybary/storage/parquet_store.py"]
    assert defs.get("solve_isolated") == ["raybary/batch/outcome.py"]
    assert defs.get("result_columns") == ["raybary/storage/results/layout.py"]
    for gone in ("_peak_rss_mb", "_next_pow2", "_marginal_components", "_marginal",
                 "grid_points", "_schedule", "_slot", "_record", "_offsets", "_list_array",
                 "_LegacyGrids", "_check_rows", "_default_solve", "configure_jax_globals"):
        assert gone not in defs, (gone, defs.get(gone))
