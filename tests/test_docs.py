"""Every code block of README.md and docs/{solver,runner,plots,cluster,performance}.md
runs here as written, at small sizes (docs/storage.md and docs/interop.md have
their own: tests/storage/test_storage_docs.py, tests/interop/test_interop_docs.py).

What happens to a block depends on its info string:

* ```python: executed; the blocks of one document in order, in one namespace,
  in a temporary working directory.
* ```bash: every command runs. ``raybary ...`` through click's CliRunner in
  this process (``raybary run`` then joins the session's local Ray,
  ``ray_local``), ``python -c`` in a subprocess, ``duckdb -c SQL`` with the
  ``duckdb`` CLI or, where it is not installed, DuckDB's Python package.
  ``raybary generate --problems N`` makes ``SMALL`` problems instead of N.
  Any other command fails the test: a block that cannot run here says why in
  its info string. The one exception are the README's two set-up commands,
  whose first parts create a virtual environment, install the project and run
  pytest: CI runs exactly these blocks in fresh environments (``.ci/run``,
  ``.ci/readme_main``), which is checked here; their ``raybary`` parts run.
* ```text: program output or a diagram, not code.
* tag ``notest-cluster``: needs a Ray cluster (``ray up``, a head's
  dashboard). Checked instead: every ``raybary`` command parses with its
  options (``raybary submit`` runs with ``--dry-run``, which checks the run
  options against ``raybary run`` and builds the runtime environment), and
  every ``ray`` command parses with Ray's own CLI. ``tests/jobs`` runs the
  same flow against a head on loopback.
* tag ``notest-benchmark``: takes minutes on every core. Checked instead:
  the benchmark script exists and every option used is in its ``--help``
  (``bash benchmarks/X.sh``: that of ``benchmarks/X.py``, which it runs).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from docs_blocks import ROOT, Block, fenced, shell_commands

README = ROOT / "README.md"
DOCS = {name: ROOT / "docs" / f"{name}.md"
        for name in ("solver", "runner", "plots", "cluster", "performance")}
SMALL = 20  # problems of every generated store
NOTEST = {
    "notest-cluster": "needs a Ray cluster; commands are parsed, submit runs with --dry-run",
    "notest-benchmark": "takes minutes on every core; options checked against --help",
}
SETUP = (["python3", "-m", "venv"], [".", ".venv/bin/activate"], ["pip", "install"],
         ["python", "-m", "pytest"])


# ------------------------------------------------------------------ running blocks
def _adapt(args: list[str], cwd: Path) -> list[str]:
    """``raybary generate ... --problems N`` at SMALL problems; ``raybary run``'s
    local INPUT and OUTPUT made absolute, since the session Ray's actors, which
    run it, do not share this test's working directory (an embedded Ray, what
    the docs' users get, starts in theirs)."""
    out = list(args)
    if args[0] == "generate":
        for i, a in enumerate(out[:-1]):
            if a == "--problems":
                out[i + 1] = str(min(int(out[i + 1]), SMALL))
    if args[0] == "run":
        from raybary.cli.run_cmds import run_cmd

        with run_cmd.make_context("run", out[1:]) as ctx:
            paths = {ctx.params["input_url"], ctx.params["output_url"]}
        out = [str(cwd / a) if a in paths and "://" not in a else a for a in out]
    return out


def run_command(cmd: list[str], where: str, cwd: Path) -> str:
    """Run one command of a ```bash block; return its output."""
    from raybary.cli import main

    if cmd[0] == "raybary":
        r = CliRunner().invoke(main, _adapt(cmd[1:], cwd))
        assert r.exit_code == 0, f"{where}: {' '.join(cmd)}\n{r.output}\n{r.exception!r}"
        return r.output
    if cmd[0] in ("python", "python3") and cmd[1] == "-c":
        p = subprocess.run([sys.executable, *cmd[1:]], cwd=cwd, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, f"{where}: {' '.join(cmd)}\n{p.stderr}"
        return p.stdout
    if cmd[0] == "duckdb" and cmd[1] == "-c":
        if shutil.which("duckdb"):
            p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, f"{where}: {' '.join(cmd)}\n{p.stderr}"
            return p.stdout
        import duckdb

        return repr(duckdb.connect().sql(cmd[2]).fetchall())
    raise AssertionError(f"{where}: `{' '.join(cmd)}` cannot run in the tests; give the block "
                         f"a tag saying why (one of {sorted(NOTEST)})")


def is_setup(cmd: list[str]) -> bool:
    return any(cmd[:len(s)] == s for s in SETUP)


def run_doc(doc: Path, cwd: Path, *, setup_blocks: int = 0) -> tuple[dict, list[str]]:
    """Run the python and bash blocks of ``doc`` in ``cwd`` (already the working
    directory); return the python namespace and the bash commands' outputs.
    The first ``setup_blocks`` bash blocks may hold SETUP commands."""
    namespace: dict = {"__name__": f"docs_{doc.stem}"}
    outputs: list[str] = []
    bash_seen = 0
    for block in fenced(doc):
        if block.tags:
            continue
        where = block.where(doc)
        if block.lang == "python":
            exec(compile(block.code, where, "exec"), namespace)
        elif block.lang == "bash":
            bash_seen += 1
            for cmd in shell_commands(block.code):
                if bash_seen <= setup_blocks and is_setup(cmd):
                    continue
                outputs.append(run_command(cmd, where, cwd))
    return namespace, outputs


def test_every_block_says_how_it_is_tested():
    """A block is python or bash (run), text (output, diagrams), or tagged with why not."""
    for doc in (README, *DOCS.values()):
        for block in fenced(doc):
            assert block.lang in ("python", "bash", "text"), \
                f"{block.where(doc)}: info string {block.info!r}: say python, bash or text"
            assert all(t in NOTEST for t in block.tags), \
                f"{block.where(doc)}: unknown tag in {block.info!r}; known: {sorted(NOTEST)}"


def test_readme_setup_commands_are_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert text.index("## Set up on a fresh machine") < text.index("```")
    first, second = [b for b in fenced(README) if b.lang == "bash"][:2]
    # .ci/readme_main runs the first ```bash block, at 200 problems
    assert re.findall(r"```bash\n(.*?)\n```", text, re.S)[0] == first.code.strip()
    assert "--problems 2000" in first.code
    assert [c[:2] for c in shell_commands(first.code)] == [
        ["python3", "-m"], [".", ".venv/bin/activate"], ["pip", "install"],
        ["raybary", "generate"], ["raybary", "run"], ["raybary", "show"]]
    # .ci/run: a fresh environment, the same install, then exactly this pytest
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = shell_commands(second.code)
    assert all(is_setup(c) for c in cmds)
    install = next(c for c in cmds if c[:2] == ["pip", "install"])
    assert install[2:] == ["-e", ".[test,plot]"] and "pip install --quiet -e '.[test,plot]'" in ci
    assert " ".join(cmds[-1]) in ci


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_lead_somewhere():
    """Relative links of README.md and these docs name files that exist, and anchors
    headings of them."""
    for doc in (README, *DOCS.values()):
        text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", file.read_text(encoding="utf-8"), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{doc.name}: no #{anchor} in {path}"


# ------------------------------------------------------------------ README, solver.md
@pytest.mark.usefixtures("ray_local")
def test_readme_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns, outputs = run_doc(README, tmp_path, setup_blocks=2)
    assert f"status: ok {SMALL}, invalid 0, failed 0" in outputs[-1], outputs[-1]
    r = ns["result"]
    assert r.converged and r.weights.shape == (2,) and r.means.shape == (2, 2)
    assert np.isclose(r.weights.sum(), 1.0) and r.objective > 0
    res = ns["res"]
    assert len(res.problems) == SMALL and (res.problems.status == "ok").all()
    assert res.barycenter(17).means.shape == (6, 2)


def test_solver_doc_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns, outputs = run_doc(DOCS["solver"], tmp_path)
    r = ns["result"]
    assert r.converged and r.covs.shape == (2, 2, 2)
    assert ns["grid"].shape == (100, 100) and np.isfinite(ns["grid"]).all()
    assert ns["logp"].shape == (5,) and np.isfinite(ns["logp"]).all()
    assert len(outputs) == 1 and "barycenter" in outputs[0].lower()


# ------------------------------------------------------------------ runner.md, plots.md
@pytest.fixture(scope="module")
def runner_doc(tmp_path_factory, ray_local):
    """docs/runner.md run in a fresh directory: its store, its results, what it printed."""
    cwd = tmp_path_factory.mktemp("runner-doc")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        ns, outputs = run_doc(DOCS["runner"], cwd)
    return cwd, ns, outputs


def test_runner_doc_runs(runner_doc):
    cwd, ns, outputs = runner_doc
    generate, run, show, sql, rows, fig, gallery = outputs
    assert f"wrote {SMALL} tutorial problems" in generate
    assert f"{SMALL} problems in 1 shards (complete)" in run
    assert f"status: ok {SMALL}" in show
    assert sql.strip() == f"[('ok', {SMALL})]" or re.search(rf"ok\W+{SMALL}", sql), sql
    assert rows.strip() == str(SMALL * 6)  # barycenter rows: 6 components each
    for name in ("fig.png", "gallery.png"):
        assert (cwd / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ns["g"].barycenter.shape == (10, 50, 50) and np.isfinite(ns["g"].barycenter).all()
    assert ns["res"].problems.status.eq("ok").sum() == SMALL


def test_plots_doc_runs_on_the_runner_docs_results(runner_doc, monkeypatch):
    cwd = runner_doc[0]
    (cwd / "fig.png").unlink()
    monkeypatch.chdir(cwd)
    ns, outputs = run_doc(DOCS["plots"], cwd)
    assert len(outputs) == 3 and (cwd / "fig.png").exists()
    g = ns["g"]
    assert g.inputs.shape[0] == 3 and g.barycenter.shape == (200, 200)
    assert g.source == "computed" and len(ns["fig"].axes) >= 4


# ------------------------------------------------------------------ blocks not run
def parse(group: click.Group, argv: list[str]) -> dict:
    """The parameters click gives ``group argv`` (subcommands resolved): a usage error,
    unknown option or missing argument raises."""
    cmd, name, args = group, group.name, list(argv)
    while isinstance(cmd, click.Group):
        name, *args = args
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"no command {name!r} in {' '.join(argv)}"
        cmd = sub
    with cmd.make_context(name, args) as ctx:
        return dict(ctx.params)


def tagged(tag: str) -> list[tuple[Path, Block]]:
    return [(doc, b) for doc in (README, *DOCS.values()) for b in fenced(doc) if tag in b.tags]


def test_cluster_blocks_parse(monkeypatch):
    from ray.scripts.scripts import cli as ray_cli

    from raybary.cli import main
    from raybary.cli.run_cmds import run_cmd

    monkeypatch.chdir(ROOT)  # cluster.yaml, jobs/*.yaml
    checked: dict[str, int] = {"raybary": 0, "ray": 0}
    for doc, block in tagged("notest-cluster"):
        for cmd in shell_commands(block.code):
            while cmd and re.fullmatch(r"[A-Z_]+=\S*", cmd[0]):  # VAR=value ray start ...
                cmd = cmd[1:]
            where = f"{block.where(doc)}: {' '.join(cmd)}"
            if cmd[:2] == ["raybary", "submit"]:
                r = CliRunner().invoke(main, [*cmd[1:], "--dry-run"])
                assert r.exit_code == 0, f"{where}\n{r.output}"
                plan = json.loads(r.stdout)
                assert "raybary.cli.job_entry" in plan["entrypoint"], where
            elif cmd[0] == "raybary":
                parse(main, cmd[1:])
            elif cmd[:3] == ["ray", "job", "submit"] and "--" in cmd:
                parse(ray_cli, cmd[1:])
                entry = cmd[cmd.index("--") + 1:]
                assert entry[:3] == ["python", "-m", "raybary.cli.job_entry"], where
                run_cmd.make_context("run", entry[3:]).close()  # job_entry takes run's options
            elif cmd[0] == "ray":
                parse(ray_cli, cmd[1:])
            else:
                continue  # pip install, export: nothing of ours to check
            checked[cmd[0]] += 1
    assert checked["raybary"] >= 9 and checked["ray"] >= 8, checked
    # and the checks can fail
    for group, argv in ((main, ["status", "--adress", "x"]), (ray_cli, ["up"]),
                        (main, ["run", "in.parquet", "out", "--bar-size", "0"])):
        with pytest.raises(click.UsageError):
            parse(group, argv)
    r = CliRunner().invoke(main, ["submit", "in", "out", "--epsilon", "x", "--dry-run"])
    assert r.exit_code == 2 and "options of `raybary run`" in r.output


def test_benchmark_blocks_use_existing_options():
    commands = [(doc, b, c) for doc, b in tagged("notest-benchmark")
                for c in shell_commands(b.code)]
    helps: dict[str, str] = {}
    for doc, block, cmd in commands:
        if cmd[0] == "bash" and cmd[1].endswith(".sh"):  # a wrapper of the .py of its name
            assert (ROOT / cmd[1]).is_file(), block.where(doc)
            assert f"{Path(cmd[1]).stem}.py" in (ROOT / cmd[1]).read_text(), block.where(doc)
            cmd = ["python", cmd[1][:-3] + ".py", *cmd[2:]]
        assert cmd[0] == "python" and cmd[1].startswith("benchmarks/"), block.where(doc)
        if cmd[1] not in helps:
            p = subprocess.run([sys.executable, cmd[1], "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
            assert p.returncode == 0, p.stderr
            helps[cmd[1]] = p.stdout
        for option in (a.split("=")[0] for a in cmd[2:] if a.startswith("--")):
            assert option in helps[cmd[1]], f"{block.where(doc)}: {cmd[1]} has no {option}"
    assert {"benchmarks/bench_speed.py", "benchmarks/bench_run.py",
            "benchmarks/gpu_check.py"} <= set(helps)


# ------------------------------------------------------------------ performance.md's table
@pytest.fixture(scope="module")
def bench_speed():
    """benchmarks/bench_speed.py as a module (it imports bench_solver from its folder)."""
    folder = str(ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location("bench_speed", f"{folder}/bench_speed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def _case(name, problems, rate, converged, its, us, idle):
    return dict(case=name, problems=problems, rate=rate, converged=converged, it_mean=its[0],
                it_p99=its[1], it_max=its[2], us_per_it=us, idle=idle)


# the run of 2026-11-26 whose table docs/performance.md shows, as bench_speed's dicts
RUN_2026_11_26 = dict(
    date="2026-11-26", machine="2 cores, Linux-test, JAX 0.0 (cpu backend), load average 0.1",
    jax_cache="present", ott=6.1, floors={"newton": 2.18, "sinkhorn": 0.21},
    rows=[_case("tutorial, epsilon=0.1", 4096, 1398.2, 1.0, (131.2, 228, 505), 5.47, 0.141),
          _case("tutorial, default epsilon", 4096, 2274.4, 1.0, (75.4, 124, 333), 5.90, 0.18),
          _case("ragged mix, epsilon=0.1, first call (compiles)", 1024, 25.3, 0.99902,
                (276, 1052, 30000), 143.2, 0.88),
          _case("ragged mix, epsilon=0.1", 1024, 39.4, 0.99902, (282, 1284, 30000), 89.8, 0.69)],
    gaps={"epsilon=0.1, float32": np.array([1.9e-5, 2.6e-8, -1e-9]),
          "epsilon=0.1, float64": np.array([-4.5e-9, -4.5e-9, 1e-10]),
          "default epsilon, float32": np.array([6.0e-7, 3.0e-5, 1e-8])},
)


# the machine floor of a run with numba installed (benchmarks/floor_numba.py)
MACHINE_FLOORS = {"numba": 1.89, "numba_parallel": 0.95, "numba_threads": 2}


def test_bench_speed_renders_the_docs_table(bench_speed):
    block = bench_speed.render_docs(RUN_2026_11_26)
    lines = block.splitlines()
    assert lines[0].startswith("_2026-11-26, 2 cores, Linux-test, JAX 0.0 (cpu backend)")
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 6
    assert table[2] == ("| tutorial family, `epsilon=0.1` | 4096 | 1,398 | 100% | "
                        "131 / 228 / 505 | 5.47 us | 2.5x | 0.14 |")
    assert table[5] == ("| ragged mix, `epsilon=0.1` | 1024 | 39 | 99.9% | 282 / 1,284 / 30,000 | "
                        "89.8 us | 41x | 0.69 |")
    assert "OTT-JAX's jitted solver in a loop, 6.1 problems/s (raybary is 229x faster" in block
    assert "bare Newton step of the solver 2.18 us per problem" in block
    # that run had no numba: no machine floor column, and the text says why
    assert "machine floor |" not in block
    assert "0.21 us; no machine floor (numba is not installed)." in block
    # with numba: a / machine floor column next to the Newton-step floor's
    # (raybary's wall per needed iteration over numba's one-core step)
    machine = bench_speed.render_docs(
        {**RUN_2026_11_26, "floors": {**RUN_2026_11_26["floors"], **MACHINE_FLOORS}})
    machine_table = [line for line in machine.splitlines() if line.startswith("|")]
    assert len(machine_table) == 6
    assert machine_table[0].endswith(
        "| wall per needed iteration | / Newton-step floor | / machine floor | idle slot share |")
    assert machine_table[1] == "|---|---:|---:|---:|---|---:|---:|---:|---:|"
    assert machine_table[2] == ("| tutorial family, `epsilon=0.1` | 4096 | 1,398 | 100% | "
                                "131 / 228 / 505 | 5.47 us | 2.5x | 2.9x | 0.14 |")
    assert machine_table[5] == ("| ragged mix, `epsilon=0.1` | 1024 | 39 | 99.9% | "
                                "282 / 1,284 / 30,000 | 89.8 us | 41x | 48x | 0.69 |")
    assert ("0.21 us; a plain compiled Newton step (numba, one core) 1.89 us per problem, "
            "(both cores) 0.95 us.") in machine
    assert "numba is not installed" not in machine
    four = bench_speed.render_docs({**RUN_2026_11_26, "floors": {
        **RUN_2026_11_26["floors"], **MACHINE_FLOORS, "numba_threads": 4}})
    assert "(numba, one core) 1.89 us per problem, (4 threads) 0.95 us." in four
    # the header is the one of the table in docs/performance.md (whatever run
    # wrote it, with numba or without), and the rows are that run's numbers,
    # formatted as the doc's
    doc = DOCS["performance"].read_text(encoding="utf-8")
    assert any(t[0] in doc and t[1] in doc for t in (table, machine_table))
    assert ("3 problems: `epsilon=0.1` float32 median 2.6e-08 (max 1.9e-05), `epsilon=0.1` "
            "float64 median -4.5e-09 (max 1.0e-10), default epsilon float32 median 6.0e-07 "
            "(max 3.0e-05).") in block
    # a run without OTT-JAX and POT (--ott 0 --sample 0) and with an empty cache
    bare = bench_speed.render_docs({**RUN_2026_11_26, "ott": float("nan"), "gaps": {},
                                    "jax_cache": "empty"})
    assert "OTT-JAX" not in bare and "POT" not in bare and "persistent cache empty" in bare
    assert "own shapes" not in block  # only a run with --exact-floor says it
    exact = bench_speed.render_docs({**RUN_2026_11_26,
                                     "floors": {**RUN_2026_11_26["floors"], "ragged_exact": 17.44}})
    assert "17.44 us per needed iteration, 8.0x the tutorial's." in exact


def test_bench_speed_rewrites_only_between_the_markers(bench_speed, tmp_path):
    path = tmp_path / "performance.md"
    shutil.copy(DOCS["performance"], path)
    before = path.read_text(encoding="utf-8")
    head, tail = before.split(bench_speed.BEGIN)[0], before.split(bench_speed.END)[1]
    bench_speed.write_docs(path, "new table\n")
    after = path.read_text(encoding="utf-8")
    assert after == f"{head}{bench_speed.BEGIN}\nnew table\n{bench_speed.END}{tail}"
    bench_speed.write_docs(path, "newer\n")  # the markers survive for the next run
    assert "newer\n" in path.read_text() and "new table" not in path.read_text()
    path.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench_speed:begin"):
        bench_speed.write_docs(path, "x\n")
