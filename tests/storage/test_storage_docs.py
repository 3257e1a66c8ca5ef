"""docs/storage.md: the worked example runs as written.

Every ```python block (except ```python notest) is executed in order in one
namespace, in a temporary working directory; in ```console blocks, the
``$ raybary generate|convert|show ...`` lines are run through the CLI and must
succeed (other commands, such as ``raybary run``, belong to other layers and
are skipped here).

It runs twice: with NumPy stand-ins for ``raybary.solve`` and
``raybary.log_density_grid`` (the storage layer alone, no JAX), and with the
real solver.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from docs_blocks import blocks as doc_blocks
from docs_blocks import fenced, shell_commands

from raybary.types import Result

DOC = Path(__file__).resolve().parents[2] / "docs" / "storage.md"
STORAGE_COMMANDS = {"generate", "convert", "show"}


def blocks() -> list[tuple[str, str]]:
    return doc_blocks(DOC)


def test_doc_names_every_format():
    text = DOC.read_text()
    for name in ("raybary.problems.parquet/1", "raybary.problems.zarr/1", "raybary.results/1",
                 "raybary.grids/1"):
        assert name in text


def fake_solve(problems, *, bar_size, **_):
    """The ``bar_size`` heaviest components of the GMM with the largest lambda."""
    out = []
    for p in problems:
        g = p.gmms[int(np.argmax(p.lambdas))]
        idx = np.argsort(-g.weights)[:bar_size]
        out.append(Result(g.weights[idx] / g.weights[idx].sum(), g.means[idx], g.covs[idx],
                          objective=1.0, converged=True, iterations=1, marginal_error=0.0))
    return out


def fake_log_density_grid(gmm, shape=(50, 50), bounds=None, **_):
    w, m, c = gmm.weights, gmm.means, gmm.covs
    sd = np.sqrt(np.diagonal(c, axis1=1, axis2=2))
    lo, hi = (m - 3 * sd).min(axis=0), (m + 3 * sd).max(axis=0)
    b = np.array([lo[0], hi[0], lo[1], hi[1]]) if bounds is None else np.asarray(bounds)
    gx, gy = np.meshgrid(np.linspace(b[0], b[1], shape[1]), np.linspace(b[2], b[3], shape[0]))
    x = np.stack([gx.ravel(), gy.ravel()], axis=1)
    diff = x[None] - m[:, None]
    sol = np.linalg.solve(c[:, None], diff[..., None])[..., 0]
    maha = (diff * sol).sum(-1)
    logn = -0.5 * maha - 0.5 * np.log(np.linalg.det(c))[:, None] - np.log(2 * np.pi)
    top = logn.max(axis=0)
    dens = top + np.log((w[:, None] * np.exp(logn - top)).sum(axis=0))
    return dens.reshape(shape).astype(np.float32), b


@pytest.mark.parametrize("solver", ["numpy-stand-in", pytest.param("jax", marks=pytest.mark.slow)])
def test_worked_example_runs(tmp_path, monkeypatch, solver):
    import raybary
    from raybary.cli import main

    if solver == "numpy-stand-in":
        monkeypatch.setattr(raybary, "solve", fake_solve, raising=False)
        monkeypatch.setattr(raybary, "log_density_grid", fake_log_density_grid, raising=False)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_storage"}
    outputs = []
    ran_python = ran_cli = 0
    for lang, code in blocks():
        if lang == "python":
            exec(compile(code, f"{DOC.name}:python-block-{ran_python}", "exec"), namespace)
            ran_python += 1
        elif lang == "console":
            for line in code.splitlines():
                if not line.startswith("$ raybary "):
                    continue
                args = shlex.split(line[2:])[1:]
                if args[0] not in STORAGE_COMMANDS:
                    continue
                result = CliRunner().invoke(main, args)
                assert result.exit_code == 0, f"{line}\n{result.output}"
                outputs.append(result.output)
                ran_cli += 1
    assert ran_python >= 5 and ran_cli >= 4
    joined = "\n".join(outputs)
    assert "all 4 problems: 1 invalid" in joined
    assert "problem 3, gmm 1, component 2: weight is negative (-0.2)" in joined
    assert "status: ok 3, invalid 1, failed 0" in joined
    assert "covariance_type: diag" in joined  # the diagonal store of the covariance forms


@pytest.mark.parametrize("lang", ["python notest"])
def test_notest_blocks_at_least_compile(lang):
    for got, code in blocks():
        if got == lang:
            compile(code, DOC.name, "exec")


def _on_the_test_server(code: str, server, root: str) -> str:
    """An object-storage example with the test server's endpoint, keys and a fresh prefix."""
    return (code.replace("http://localhost:9000", server.endpoint)
            .replace("MY_KEY_ID", server.key).replace("MY_SECRET", server.secret)
            .replace("s3://my-bucket/", f"{root}/"))


def test_object_storage_examples_run_against_an_s3_server(s3, tmp_path, monkeypatch):
    """The MinIO / S3-compatible examples (```bash s3, ```python s3) against the S3
    server on loopback: the storage commands run, ``raybary run``'s options parse
    (it runs in tests/runner/test_runner_s3.py); no secret is printed."""
    from raybary.cli import main
    from raybary.cli.run_cmds import run_cmd

    server, root = s3
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAYBARY_STORAGE_OPTIONS", raising=False)
    env: dict[str, str] = {}
    outputs, namespace, ran = [], {"__name__": "docs_storage_s3"}, 0
    for block in fenced(DOC):
        if block.tags != ("s3",):
            continue
        code = _on_the_test_server(block.code, server, root)
        if block.lang == "python":
            exec(compile(code, f"{DOC.name}:{block.line}", "exec"), namespace)
            ran += 1
            continue
        for args in shell_commands(code):
            if args[0] == "export":
                name, _, value = args[1].partition("=")
                env[name] = value
            elif args[:2] == ["raybary", "run"]:
                with run_cmd.make_context("run", args[2:]) as ctx:
                    assert ctx.params["output_url"].startswith(root)
            else:
                assert args[0] == "raybary" and args[1] in STORAGE_COMMANDS, args
                result = CliRunner().invoke(main, args[1:], env=env)
                assert result.exit_code == 0, f"{block.where(DOC)}: {args}\n{result.output}"
                outputs.append(result.output)
                ran += 1
    assert ran >= 4
    assert "n_problems: 40" in outputs[-1] and "all 40 problems: 0 invalid" in outputs[-1]
    assert server.secret not in "".join(outputs)
    assert namespace["store"].n_problems == 40


@pytest.mark.parametrize("tag", ["notest-aws", "notest-run", "notest-gcs", "notest-azure"])
def test_examples_for_other_stores_compile_and_parse(tag):
    """Examples that need AWS, GCS, Azure or a Ray run: the Python compiles, every
    ``raybary`` command parses with its options."""
    from raybary.cli import main

    seen = 0
    for block in fenced(DOC):
        if tag not in block.tags:
            continue
        seen += 1
        if block.lang == "python":
            compile(block.code, f"{DOC.name}:{block.line}", "exec")
            continue
        for args in shell_commands(block.code):
            if args[0] == "pip":
                continue
            assert args[0] == "raybary", args
            command = main.commands[args[1]]
            with command.make_context(args[1], args[2:]) as ctx:
                assert ctx.params  # parsed: every option is one of the command's
    assert seen >= 2
