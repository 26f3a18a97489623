"""Two distributions providing ``import braintrace`` (ours from etp-nn, the released one): one warning, at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import braintrace


def _fake_released(tmp_path: Path, version: str = "0.2.8") -> Path:
    """A directory holding only the metadata of a ``braintrace`` distribution (no package files)."""
    info = tmp_path / f"braintrace-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: braintrace\nVersion: {version}\n")
    return tmp_path


def _import_braintrace(extra_path: Path | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    code = "import warnings; warnings.simplefilter('always'); import braintrace; import braintrace; print('ok')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_warns_once_naming_both_distributions(tmp_path: Path) -> None:
    result = _import_braintrace(_fake_released(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert result.stderr.count("BraintraceDistributionWarning") == 1, result.stderr
    assert f"etp-nn {braintrace.__version__}" in result.stderr
    assert "braintrace 0.2.8 (the released library)" in result.stderr
    assert "The active one is etp-nn" in result.stderr
    assert "separate environments" in result.stderr


def test_no_warning_without_the_released_distribution() -> None:
    result = _import_braintrace(None)
    assert result.returncode == 0, result.stderr
    assert "BraintraceDistributionWarning" not in result.stderr
    assert braintrace._released_distribution() is None


def test_warns_only_once_in_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(braintrace, "_SHADOW_WARNED", False)
    with pytest.warns(braintrace.BraintraceDistributionWarning, match=r"braintrace 9\.9 \(the released library\)"):
        assert braintrace._warn_if_shadowed("braintrace 9.9")
    assert not braintrace._warn_if_shadowed("braintrace 9.9")  # no second warning
