"""benchmarks/gpu_check.{sh,py}, the GPU check, run on this machine's CPU at
tiny sizes, and what it needs of raybary: ``raybary.solve`` and the problem
generator without Ray, Zarr or fsspec (the GPU machine has none of them)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "zarr", "fsspec")

#: A ``sitecustomize`` that makes importing Ray, Zarr or fsspec fail, and
#: records every attempt in $BLOCKED_LOG (a module that tries one and copes
#: would pass unnoticed otherwise).
BLOCKER = textwrap.dedent(f"""
    import os, sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                with open(os.environ["BLOCKED_LOG"], "a") as f:
                    f.write(name + "\\n")
                raise ImportError(f"{{name}} is blocked (tests/test_benchmarks.py)")
            return None

    sys.meta_path.insert(0, _Block())
""")


@pytest.fixture
def blocked_env(tmp_path):
    """An environment whose Python cannot import Ray, Zarr or fsspec; the
    attempts land in ``tmp_path / "blocked.log"``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{ROOT}", BLOCKED_LOG=str(log),
               JAX_PLATFORMS="cpu")
    return env, log


def test_solve_and_the_generator_need_no_ray_zarr_or_fsspec(blocked_env):
    env, log = blocked_env
    code = textwrap.dedent("""
        import sys
        try:
            import fsspec  # the blocker works
        except ImportError:
            pass
        else:
            raise SystemExit("fsspec imported")
        import raybary
        from raybary.storage.generate import tutorial_columns, tutorial_problems

        [r] = raybary.solve(tutorial_problems(1), bar_size=2, epsilon=0.5, max_iterations=2)
        assert r.status == "ok" and r.iterations >= 1, r
        assert tutorial_columns(3).n_problems == 3
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "zarr", "fsspec")))
    """)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]"
    assert log.read_text().split() == ["fsspec"]  # the test's own attempt only


@pytest.fixture(scope="module")
def gpu_check():
    """benchmarks/gpu_check.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HLO = """HloModule jit_run_batch, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_computation (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %exponential.1 = f32[8]{0} exponential(%param_0)
}

%inner_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %gte = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(2)
  ROOT %lt = pred[] compare(%gte, %c), direction=LT
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %f1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation
  %f2 = f32[8]{0} fusion(%f1), kind=kLoop, calls=%fused_computation
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %f2)
}

%chunk_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %gte = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%gte, %n), direction=LT
}

%chunk_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %g = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation
  %cc = f32[8]{0} custom-call(%g), custom_call_target="cusolver"
  %s = f32[8]{0} copy(%cc)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %s)
}

%outer_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  ROOT %any = pred[] fusion(%x), kind=kInput, calls=%fused_computation
}

%outer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %w1 = (s32[], f32[8]{0}) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"2"}}
  %w2 = (s32[], f32[8]{0}) while(%w1), condition=%chunk_cond, body=%chunk_body
  %y = f32[8]{0} get-tuple-element(%w2), index=1
  %h = f32[8]{0} fusion(%y), kind=kLoop, calls=%fused_computation
  %i = s32[] get-tuple-element(%w2), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %h)
}

ENTRY %main.1 (Arg_0.1: f32[8]) -> f32[8] {
  %Arg_0.1 = f32[8]{0} parameter(0)
  %pre = f32[8]{0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_computation
  %z = s32[] constant(0)
  %t = (s32[], f32[8]{0}) tuple(%z, %pre)
  %loop = (s32[], f32[8]{0}) while(%t), condition=%outer_cond, body=%outer_body
  ROOT %out = f32[8]{0} get-tuple-element(%loop), index=1
}
"""


def test_loop_kernels_counts_the_main_loops_launches(gpu_check):
    """Per block: the outer condition (1 fusion), the inner loop of known trip
    count 2 (its body's 2 fusions and its condition's compare, each trip,
    and one last condition: 2 * 3 + 1), the chunk loop's condition once
    (its trip count is not known: its body and condition, 3 + 1, are the
    per-chunk count) and the body's own fusion: 1 + 7 + 1 + 1 = 10."""
    computations, entry = gpu_check.parse_hlo(HLO)
    assert entry == "main.1" and "fused_computation" in computations
    assert [op for op, _ in computations["inner_body"]] == [
        "parameter", "get-tuple-element", "fusion", "fusion", "get-tuple-element", "tuple"]
    counts = gpu_check.loop_kernels(HLO)
    assert counts == {"block": 10, "update_chunk": 4, "dynamic_loops": 1, "per_call": 1,
                      "instructions": counts["instructions"]}
    with pytest.raises(ValueError, match="no while loop"):
        gpu_check.loop_kernels(HLO.replace("while(%t)", "copy(%t)"))


def test_help_documents_the_options():
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for option in ("--sizes", "--budget-s", "--check", "--quick", "--seed", "--json"):
        assert option in p.stdout
    assert "gpu_check.sh" in p.stdout and "problems/s" in p.stdout


def test_gpu_check_runs_on_the_cpu_at_tiny_sizes(blocked_env, tmp_path):
    """The shell script as the GPU machine runs it (repository not installed:
    only the blocker is on PYTHONPATH; Ray, Zarr and fsspec blocked), at 2^10
    and 2^11 problems on the CPU: every line has its fields and sane values,
    the check passes, the output lands in $OUT."""
    env, log = blocked_env
    env["PYTHONPATH"] = env["PYTHONPATH"].split(os.pathsep)[0]
    out = tmp_path / "out"
    env.update(OUT=str(out), PYTHON=sys.executable)
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--sizes", "10", "11", "--quick"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    lines = p.stdout.splitlines()
    assert not log.exists(), log.read_text()  # nothing tried to import them
    assert any(line.startswith("device: [") and "JAX " in line for line in lines)
    assert any(line.startswith("engine: LaneRule(slots=1024") for line in lines)
    results = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
    assert [r["problems"] for r in results] == [1024, 2048]
    for r in results:
        assert r["problems_per_s"] > 0 and r["engine_problems_per_s"] >= r["problems_per_s"]
        assert 20 < r["plan_iterations_mean"] < 1000 and r["converged"] > 0.95
        assert r["failed"] == 0 and r["objective_finite"]
        assert r["calls"] >= 1 and r["blocks"] >= r["calls"]
        assert 0 < r["round_trips_per_lane_iteration"] <= 1
        assert r["wall_per_needed_iteration_us"] > 0 and r["wall_per_problem_iteration_us"] > 0
        assert r["wall_per_lane_iteration_us"] > 0 and 0 <= r["idle_share"] < 1
        assert r["kernels_per_plan_iteration_est"] > 0
        assert 0 <= r["compile_s"] <= r["wall_s"]
    [check] = [line for line in lines if line.startswith("CHECK ")]
    assert check.startswith("CHECK OK: objectives of the first 1024 problems"), check
    assert any(line.startswith("kernels (compiled HLO of run_batch") for line in lines)
    assert lines[-1].startswith("# exit status 0")
    [text] = out.glob("gpu_check-*.txt")
    assert text.read_text().splitlines()[-len(results) - 3:] == lines[-len(results) - 3:]
    [saved] = out.glob("gpu_check-*.json")
    run = json.loads(saved.read_text())
    assert run["check"]["ok"] and len(run["sizes"]) == 2 and run["kernels"]["block"] > 0
    [mw2] = [json.loads(line[len("MW2 "):]) for line in lines if line.startswith("MW2 ")]
    assert mw2 == run["mw2"] and mw2["pairs"] == 512 and mw2["pairs_per_s"] > 0
    assert 20 < mw2["plan_iterations_mean"] < 200 and mw2["converged"] > 0.99


def test_mw2_speed_benchmark_runs_small(capsys):
    """benchmarks/bench_mw2_speed.py at 64 pairs, one repeat: a row per
    method, rates positive, every pair solved within 1e-3 of POT."""
    pytest.importorskip("ot")
    spec = importlib.util.spec_from_file_location("bench_mw2_speed",
                                                  ROOT / "benchmarks" / "bench_mw2_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--pairs", "64", "--pot-pairs", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| method | pairs/s (median) |" in out
    assert set(rows) == {"mw2_batch", "mw2_batch workers=1", "fixed batch, workers=1",
                         "POT loop"}
    for name, row in rows.items():
        assert row["rate"] > 0 and row["low"] <= row["rate"] <= row["high"]
        if name != "POT loop":
            assert row["error"] < 1e-3 and 20 < row["iterations"] < 200
            assert 0 <= row["idle"] < 1 and row["us"] > 0
    assert f"| {rows['POT loop']['x_pot']:.1f} |" in out


def test_distances_benchmark_runs_small(ray_local, tmp_path, capsys):
    """benchmarks/bench_distances.py on 12 GMMs (66 pairs, tiles of 5): the job
    completes, every pair once, the matrix full, the table printed."""
    spec = importlib.util.spec_from_file_location("bench_distances",
                                                  ROOT / "benchmarks" / "bench_distances.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m = bench.main(["--gmms", "12", "--tile", "5", "--actors", "1", "--address", ray_local,
                    "--out", str(tmp_path), "--json", str(tmp_path / "m.json")])
    assert m["pairs"] == m["rows"] == m["ok"] == 66 and m["shards"] == 6 and m["ids"] == 12
    assert m["pairs_per_s"] > 0 and m["output_mb"] > 0
    out = capsys.readouterr().out
    assert "| pairs | 66 in 6 tiles (66 `ok`" in out
    assert json.loads((tmp_path / "m.json").read_text())["pairs"] == 66
