"""The dashboard rendered to text from statistics messages, as a terminal would show it."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from particlewatch.dashboard import decode_message, histogram_rows, render

RECORDED = Path(__file__).parent / "data" / "stats_stream.jsonl"


def _text(stats, acquisition=None, *, width=80, errors=()):
    console = Console(record=True, width=width, color_system=None)
    console.print(render(stats, acquisition, errors=errors, width=width))
    return console.export_text()


def _recorded_messages():
    return [decode_message(line.encode()) for line in RECORDED.read_text().splitlines()
            if line.strip()]


def test_recorded_stream_renders_every_population_with_its_progress():
    messages = _recorded_messages()
    stats = [m for m in messages if m["type"] in ("stats", "converged")]
    assert len(stats) >= 2
    last = stats[-1]
    text = _text(last, {"stage_x_um": 12.5, "stage_y_um": -3.0, "defocus_um": 0.012,
                        "tile": 7, "tiles": 40, "skipped_segments": 3,
                        "frames_saved": last["frames_ok"] + 1, "state": "acquiring"})
    for pop in last["populations"]:
        assert f"P{pop['id']}" in text
        mean = pop["mean_ecd_nm"]
        assert (f"{mean:.1f}" if mean < 100 else f"{mean:.0f}") in text
        assert str(pop["n"]) in text
    assert f"analysed {last['frames_ok']}" in text
    assert "tile 7 of 40" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text  # nothing important truncated on an 80-column terminal


def test_every_recorded_message_renders_on_small_and_large_terminals():
    for message in _recorded_messages():
        if message["type"] in ("stats", "converged"):
            for width in (80, 160):
                assert "particlewatch" in _text(message, width=width)


def test_progress_towards_precision_and_convergence_are_shown():
    stats = {"schema_version": 1, "type": "stats", "precision": 0.01, "frames_ok": 3,
             "frames_failed": 0, "particles": 500,
             "populations": [
                 {"id": 0, "n": 300, "fraction": 0.6, "mean_ecd_nm": 56.8,
                  "ci95_nm": [56.0, 57.6], "z_average_nm": 58.1, "cv": 0.09,
                  "converged": False, "needed_more": 900},
                 {"id": 1, "n": 200, "fraction": 0.4, "mean_ecd_nm": 110.9,
                  "ci95_nm": [110.0, 111.8], "z_average_nm": 112.0, "cv": 0.05,
                  "converged": True, "needed_more": 0}]}
    text = _text(stats, width=120)
    assert "±1.4% of ±1.0%, ~900 more" in text
    assert "±0.8% ✓" in text
    assert "56.8 ± 0.8" in text


def test_empty_state_and_errors():
    text = _text(None, errors=["frame_00003.mrc: truncated MRC (2048x2048 needs 8 MiB)"])
    assert "no particles yet" in text
    assert "frame_00003.mrc: truncated MRC" in text


def test_histogram_rows_scale_to_the_shared_peak():
    rows = histogram_rows([0, 4, 8], peak=8, height=2)
    assert rows == ["  █", " ██"]


@pytest.mark.parametrize("payload, reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"schema_version": 2, "type": "stats"}).encode(), "schema_version"),
    (json.dumps({"schema_version": 1}).encode(), "no string 'type'"),
])
def test_bad_messages_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(ValueError, match=reason):
        decode_message(payload)
