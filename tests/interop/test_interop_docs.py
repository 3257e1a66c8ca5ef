"""docs/interop.md: every ```python block runs as written, in order, in one namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from docs_blocks import blocks as doc_blocks

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"


def blocks() -> list[tuple[str, str]]:
    return doc_blocks(DOC)


def test_doc_examples_run(tmp_path, monkeypatch, capsys):
    for module in ("sklearn", "ot", "ott"):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_interop"}
    ran = 0
    for lang, code in blocks():
        if lang == "python":
            exec(compile(code, f"{DOC.name}:python-block-{ran}", "exec"), namespace)
            ran += 1
    assert ran >= 6
    out = capsys.readouterr().out
    assert "(3, 2, 2)" in out and "7 3" in out
    assert "problem 8 has no barycenter: its status is 'invalid': problem 8, gmm 0" in out


def test_doc_names_every_conversion_and_covariance_type():
    text = DOC.read_text()
    for name in ("from_sklearn", "to_sklearn", "from_pot", "to_pot", "from_ott", "to_ott",
                 "barycenter(", "barycenter_arrays(", "iter_barycenters(",
                 '"full"', '"tied"', '"diag"', '"spherical"', "raybary[sklearn]"):
        assert name in text, name


@pytest.mark.parametrize("lang", ["python notest"])
def test_notest_blocks_at_least_compile(lang):
    for got, code in blocks():
        if got == lang:
            compile(code, DOC.name, "exec")
