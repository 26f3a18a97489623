"""The examples run end to end in their ``--quick`` mode and print their summary tables.

Each runs in a fresh interpreter (``sys.executable``), as a user would run it; the plots go
to ``tmp_path``. Beyond "it ran", each test checks a claim of its example that can fail: the
online learners' update memory does not grow with the trial length while BPTT's does, every
learner of the spiking example reports an accuracy, the custom primitives' online gradients
equal BPTT.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "Agg"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[str, Path]]:
    """``quick_run(script) -> (stdout, results folder)``: ``script --quick`` with its defaults, run
    once per test process and shared by the tests that read its output (the example's own test
    and the learner guide's), all writing to one folder."""
    out = tmp_path_factory.mktemp("quick_runs")
    done: dict[str, str] = {}

    def run(script: str) -> tuple[str, Path]:
        if script not in done:
            done[script] = _run(script, "--out", str(out))
        return done[script], out

    return run


def _table_row(stdout: str, name: str) -> list[str]:
    """The cells of the summary-table row for ``name`` (cells are separated by two or more spaces)."""
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no table row {name!r} in:\n{stdout}")


def _bytes(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"KiB": 2**10, "MiB": 2**20}[unit]


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_train_online_quick(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    stdout = _run("train_online.py", "--out", str(out))
    header = _table_row(stdout, "learner")
    assert header[:4] == ["learner", "test acc", "test loss", "trace memory"]
    rows = {name: _table_row(stdout, name) for name in ("BPTT", "D_RTRL", "ES_D_RTRL")}
    for cells in rows.values():
        assert len(cells) == 7, cells
        assert re.fullmatch(r"\d+\.\d%", cells[1]), cells
        assert 0.0 <= float(cells[1].rstrip("%")) <= 100.0
        assert float(cells[2]) > 0, cells  # a finite, positive loss
        assert re.fullmatch(r"\d+\.\d s", cells[6]), cells
    # columns 4 and 5: XLA temporary memory of one update at T and with a 4x longer cue period
    bptt_short, bptt_long = _bytes(rows["BPTT"][4]), _bytes(rows["BPTT"][5])
    assert bptt_long > 2 * bptt_short, rows["BPTT"]  # BPTT stores the sequence
    for name in ("D_RTRL", "ES_D_RTRL"):
        assert rows[name][3] != "-" and _bytes(rows[name][3]) > 0, rows[name]
        assert _bytes(rows[name][5]) == _bytes(rows[name][4]), rows[name]  # online: independent of T
    assert rows["BPTT"][3] == "-"
    _assert_png(out)


def test_snn_online_quick(tmp_path: Path) -> None:
    out = tmp_path / "snn.png"
    stdout = _run("snn_online.py", "--out", str(out))
    assert _table_row(stdout, "learner")[:3] == ["learner", "acc before", "acc after"]
    for name in ("ES_D_RTRL", "D_RTRL", "readout only"):
        cells = _table_row(stdout, name)
        assert len(cells) == 6, cells
        assert all(re.fullmatch(r"\d+\.\d%", c) for c in cells[1:3]), cells
        assert float(cells[3]) > 0, cells
        assert _bytes(cells[4]) > 0, cells
    # ES_D_RTRL's traces are O(B (I + O)), D_RTRL's O(B * #params)
    assert _bytes(_table_row(stdout, "D_RTRL")[4]) > _bytes(_table_row(stdout, "ES_D_RTRL")[4])
    _assert_png(out)


def test_custom_primitive_quick() -> None:
    stdout = _run("custom_primitive.py")
    assert "without rules: ETP primitive 'etp_example_bare_mm' has no yw_to_w" in stdout
    for name in ("etp.matmul (built-in)", "scaled_mm", "gain_mm"):
        cells = _table_row(stdout, f"online D-RTRL vs BPTT, {name}")
        assert float(cells[1]) < 1e-9, cells
    for name in ("gain_mm under jit", "gain_mm grad (W, g) under jit", "gain_mm under vmap", "scaled_mm under vmap"):
        assert float(_table_row(stdout, name)[1]) < 1e-9
    assert stdout.rstrip().endswith("the online gradients equal BPTT.")


def test_forgetting_d_rtrl_quick() -> None:
    """The rule of "Writing a learning rule" trains; truncating to one step (lambda = 0) learns the delayed
    target worse than D-RTRL, which carries the whole past."""
    stdout = _run("forgetting_d_rtrl.py")
    rows = {name: _table_row(stdout, name) for name in ("D_RTRL", "forgetting 0.9", "forgetting 0.0")}
    first = {name: float(row[1]) for name, row in rows.items()}
    last = {name: float(row[2]) for name, row in rows.items()}
    assert all(last[name] < first[name] for name in rows), rows
    assert last["D_RTRL"] < last["forgetting 0.0"], rows


def _json(path: Path) -> dict:
    import json

    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def test_digits_rnn_quick(quick_run: Callable[[str], tuple[str, Path]]) -> None:
    """The real-data RNN example: every learner registered here gets a row, a held-out accuracy and its curves."""
    stdout, results = quick_run("digits_rnn.py")
    data = _json(results / "digits_rnn_rows.json")
    names = [r["name"] for r in data["results"]]
    assert names[:3] == ["BPTT", "D_RTRL", "ES_D_RTRL"]
    for r in data["results"]:
        cells = _table_row(stdout, r["name"])
        assert cells[1] == f"{r['test_acc']:.1%}" and 0.0 <= r["test_acc"] <= 1.0
        assert len(r["curve_test_acc"]) == data["meta"]["epochs"] and r["curve_test_acc"][-1] == r["test_acc"]
        assert (r["trace_bytes"] is None) == (r["name"] == "BPTT")
    _assert_png(results / "digits_rnn_rows.png")


def test_digits_snn_quick(tmp_path: Path) -> None:
    stdout = _run("digits_snn.py", "--out", str(tmp_path))
    data = _json(tmp_path / "digits_snn.json")
    assert data["meta"]["model"] == "recurrent ALIF" and data["meta"]["steps"] == 12
    for r in data["results"]:
        assert _table_row(stdout, r["name"])[1] == f"{r['test_acc']:.1%}"
    assert {"BPTT", "ES_D_RTRL", "D_RTRL"} <= {r["name"] for r in data["results"]}
    _assert_png(tmp_path / "digits_snn.png")


def test_copy_task_quick(quick_run: Callable[[str], tuple[str, Path]]) -> None:
    """Delayed recall at two delays: an online learner's trace memory is the same at both (it does not grow with T)."""
    stdout, results = quick_run("copy_task.py")
    data = _json(results / "copy_task.json")
    assert data["meta"]["delays"] == [1, 3]
    short, long = data["results"]["1"], data["results"]["3"]
    assert [r["name"] for r in short] == [r["name"] for r in long]
    for a, b in zip(short, long):
        assert a["trace_bytes"] == b["trace_bytes"]
        assert _table_row(stdout, a["name"])[1:3] == [f"{a['test_acc']:.1%}", f"{b['test_acc']:.1%}"]
    assert any(r["trace_bytes"] for r in short)
    _assert_png(results / "copy_task.png")


def test_learner_guide_is_written_from_the_examples_json(
    tmp_path: Path, quick_run: Callable[[str], tuple[str, Path]]
) -> None:
    """The guide's table holds every learner of the examples' JSON, with the accuracies they recorded."""
    import json

    quick_run("digits_rnn.py")
    _, results = quick_run("copy_task.py")
    page = tmp_path / "guide.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "learner_guide.py"), "--results", str(results), "--out", str(page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = page.read_text()
    digits = json.loads((results / "digits_rnn_rows.json").read_text())["results"]
    for r in digits:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['name']} |"))
        assert f"{r['test_acc']:.1%}" in row
    assert "delayed recall (GRU), delay 3" in text and "## Which learner to pick" in text
    assert "## The expensive learners" not in text  # no smaller-network runs: no second table

    # --readme quotes the headline rows (BPTT, D_RTRL, ES_D_RTRL, each task's best) inside the README's block
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from learner_guide import README_END, README_START
    finally:
        sys.path.pop(0)
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{README_START}\nold rows\n{README_END}\n\n## after\n")
    cmd = [sys.executable, str(ROOT / "examples" / "learner_guide.py"), "--results", str(results), "--out", str(page)]
    subprocess.run([*cmd, "--readme", str(readme)], capture_output=True, text=True, check=True)
    quoted = readme.read_text()
    assert quoted.startswith("# intro\n") and quoted.endswith("\n\n## after\n") and "old rows" not in quoted
    block = quoted[quoted.index(README_START) : quoted.index(README_END)]
    best = max((r for r in digits if r["name"] != "BPTT"), key=lambda r: r["test_acc"])
    for name in {"BPTT", "D_RTRL", "ES_D_RTRL", best["name"]}:
        assert any(line.startswith(f"| {name} |") for line in block.splitlines()), (name, block)
    readme.write_text("# no block\n")
    refused = subprocess.run([*cmd, "--readme", str(readme)], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "learner-guide" in refused.stderr, refused.stderr


def test_learner_guide_has_the_smaller_networks_table(tmp_path: Path) -> None:
    """The expensive learners' runs at H=16 (``digits_rnn_rows_h16.json``) get their own table with their numbers."""
    import json
    import shutil

    _run("digits_rnn.py", "--out", str(tmp_path), "--learners", "BPTT,D_RTRL,RTRL")
    shutil.copy(tmp_path / "digits_rnn_rows.json", tmp_path / "digits_rnn_rows_h16.json")
    page = tmp_path / "guide.md"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "learner_guide.py"), "--results", str(tmp_path), "--out", str(page)],
        capture_output=True,
        text=True,
        check=True,
    )
    text = page.read_text()
    small = text[text.index("## The expensive learners") : text.index("## Which learner to pick")]
    for r in json.loads((tmp_path / "digits_rnn_rows_h16.json").read_text())["results"]:
        row = next(line for line in small.splitlines() if line.startswith(f"| {r['name']} |"))
        assert f"{r['test_acc']:.1%}" in row and f"{r['ms_per_step']:.3f}" in row, row
    assert "digits, rows (GRU H=16, T=8)" in small
