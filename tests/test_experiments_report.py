"""Result files are written atomically and never overwritten silently; tables, JSON conversion, checks."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from gradand.experiments import _report
from gradand.experiments._report import (
    Check,
    Report,
    ResultExistsError,
    check_writable,
    format_table,
    save_figure,
    to_jsonable,
    write_json_atomic,
)


def test_json_is_written_and_an_existing_result_is_kept_without_force(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"acc": 0.5})
    with pytest.raises(ResultExistsError, match="--force"):
        write_json_atomic(path, {"acc": 1.0})
    assert json.loads(path.read_text()) == {"acc": 0.5}
    write_json_atomic(path, {"acc": 1.0}, force=True)
    assert json.loads(path.read_text()) == {"acc": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left


def test_a_write_killed_before_the_rename_leaves_the_old_result_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"old": True})

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and renaming it

    monkeypatch.setattr(_report.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"new": True, "big": list(range(10000))}, force=True)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_an_unserialisable_result_fails_before_touching_the_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()}, force=True)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_result_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_json_atomic(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def test_non_finite_numbers_and_numpy_values_become_valid_json():
    doc = to_jsonable(
        {"a": np.float32(0.25), "b": [math.inf, -math.nan], "c": np.arange(3), 1: (np.int64(2),)}
    )
    assert doc == {"a": 0.25, "b": [None, None], "c": [0, 1, 2], "1": [2]}
    json.dumps(doc, allow_nan=False)


def test_unwritable_output_directories_raise_one_line_oserrors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="is a file, not a directory"):
        check_writable(blocker)
    with pytest.raises(OSError, match="not writable") as e:
        check_writable(blocker / "below")
    assert "\n" not in str(e.value)
    assert check_writable(tmp_path / "a" / "b").is_dir()


def test_plot_is_a_png_written_atomically(tmp_path):
    def draw(plt):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        return fig

    p = save_figure(tmp_path / "f.png", draw)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.png"]


def test_table_aligns_columns_and_report_says_whether_every_claim_reproduced():
    text = format_table(["method", "test acc"], [["mean", "0.5"], ["and_mask", "1.000"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[2].startswith("and_mask")
    good = Report("x", {}, {}, [Check("a", True, {}), Check("b", True, {})], "")
    bad = Report("x", {}, {}, [Check("a", True, {}), Check("b", False, {"v": 0.1})], "")
    assert good.as_dict()["reproduced"] is True
    assert bad.as_dict()["reproduced"] is False
    assert bad.as_dict()["checks"][1] == {"claim": "b", "passed": False, "measured": {"v": 0.1}}
