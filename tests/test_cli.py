"""python -m klanneal schedule: writes a PNG, clear errors."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from klanneal._cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_schedule_command_writes_a_png(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    argv = ["schedule", "--shape", "cyclical", "--n-cycles", "4", "--ratio", "0.5"]
    assert main([*argv, "--steps", "4000", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "Cyclical(total_steps=4000, n_cycles=4, ratio=0.5" in printed
    assert f"wrote {out}" in printed


def test_schedule_command_plots_several_schedules(tmp_path, capsys):
    out = tmp_path / "compare.png"
    argv = ["schedule", "--shape", "cyclical", "--ramp", "linear", "--ramp", "cosine"]
    argv += ["--shape", "monotonic", "--shape", "capacity", "--shape", "constant"]
    assert main([*argv, "--steps", "100000", "--zero-ratio", "0.25", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    for fragment in ("shape='linear'", "shape='cosine'", "Monotonic(", "Capacity(", "Constant("):
        assert fragment in printed


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "schedule.png"
    command = [sys.executable, "-m", "klanneal", "schedule", "--steps", "400", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_missing_matplotlib_gives_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    out = tmp_path / "schedule.png"
    assert main(["schedule", "--steps", "100", "--out", str(out)]) == 2
    assert "plotting needs matplotlib" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["schedule", "--ratio", "1.5"], "ratio must be in (0, 1]"),
        (["schedule", "--steps", "0"], "--steps must be >= 1"),
        (["schedule", "--shape", "cyclical", "--n-cycles", "0"], "n_cycles must be >= 1"),
        (["schedule", "--ramp", "exp"], "invalid choice: 'exp'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_with_status_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_plot_schedules_example_prints_a_table_and_writes_a_png(tmp_path, capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "plot_schedules.py"
    namespace = runpy.run_path(str(example), run_name="example")
    out = tmp_path / "demo" / "schedules.png"
    assert namespace["main"](["--steps", "800", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "cyclical", "monotonic"]
    # Step 200 starts the second of 4 cycles: cyclical is back at 0 while the
    # monotonic schedule (100 warm-up steps) has reached 1.
    assert lines[4].split() == ["200", "0.0000", "1.0000"]
