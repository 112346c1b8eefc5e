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
        # inf / 1e308 crashed computing the default warm-up (OverflowError).
        (["schedule", "--ratio", "inf"], "--ratio must be in (0, 1], got inf"),
        (["schedule", "--ratio", "1e308"], "--ratio must be in (0, 1]"),
        (["schedule", "--ratio", "nan"], "--ratio must be in (0, 1], got nan"),
        (["schedule", "--steps", "0"], "--steps must be >= 1"),
        (["schedule", "--shape", "cyclical", "--n-cycles", "0"], "n_cycles must be >= 1"),
        (["schedule", "--ramp", "exp"], "invalid choice: 'exp'"),
        ([], "the following arguments are required: COMMAND"),
        (
            ["schedule", "--shape", "monotonic", "--n-cycles", "3"],
            "--n-cycles applies only to --shape cyclical, but the schedules plotted are: monotonic",
        ),
        (["schedule", "--beta", "0.5"], "--beta applies only to --shape constant"),
        (["schedule", "--shape", "constant", "--ramp", "cosine"], "--ramp applies only to"),
        (["schedule", "--shape", "capacity", "--stop", "2"], "--stop applies only to"),
        (["schedule", "--shape", "cyclical", "--warmup", "10"], "--warmup applies only to"),
        (["schedule", "--shape", "monotonic", "--c-max", "3"], "--c-max applies only to"),
        (["schedule", "--zero-ratio", "0.2", "--shape", "capacity"], "--zero-ratio applies"),
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


def test_options_for_any_of_the_plotted_shapes_are_accepted(tmp_path, capsys):
    out = tmp_path / "mixed.png"
    argv = ["schedule", "--shape", "constant", "--shape", "capacity", "--beta", "0.3"]
    assert main([*argv, "--c-max", "5", "--warmup", "50", "--steps", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Constant(beta=0.3)" in printed and "Capacity(c_max=5.0, warmup_steps=50)" in printed


def test_out_in_a_missing_directory_creates_it(tmp_path, capsys):
    out = tmp_path / "new" / "nested" / "schedule.png"
    assert main(["schedule", "--steps", "100", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_out_that_cannot_be_written_is_a_usage_error(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "schedule.png" if where == "under_a_file" else tmp_path
    with pytest.raises(SystemExit) as info:
        main(["schedule", "--steps", "100", "--out", str(out)])
    assert info.value.code == 2
    fragment = "cannot create the directory" if where == "under_a_file" else "is a directory"
    assert fragment in capsys.readouterr().err


def _lines_by_axis(fig):
    return [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]


def test_capacity_is_drawn_on_its_own_axis():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from klanneal._cli import plot_schedules
    from klanneal.schedules import Capacity, Cyclical

    mixed = plot_schedules([("cyc", Cyclical(400)), ("cap", Capacity(25.0, 100))], 400)
    beta_ax, capacity_ax = mixed.axes
    assert _lines_by_axis(mixed) == [["cyc"], ["cap"]]
    assert beta_ax.get_ylabel() == "beta" and "nats" in capacity_ax.get_ylabel()
    assert capacity_ax.get_ylim()[1] >= 25.0 > beta_ax.get_ylim()[1]
    assert [t.get_text() for t in beta_ax.get_legend().get_texts()] == ["cyc", "cap"]
    alone = plot_schedules([("cap", Capacity(25.0, 100))], 400)
    assert _lines_by_axis(alone) == [["cap"]] and "nats" in alone.axes[0].get_ylabel()
    betas = plot_schedules([("cyc", Cyclical(400))], 400)
    assert len(betas.axes) == 1 and betas.axes[0].get_ylabel() == "beta"
    for fig in (mixed, alone, betas):
        plt.close(fig)
