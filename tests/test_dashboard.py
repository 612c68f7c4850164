"""The dashboard rendered to text from statistics messages, as a terminal would show it, and
the remote dashboard following a session's streams over ZeroMQ on 127.0.0.1."""

import json
import logging
import socket as pysocket
from pathlib import Path

import pytest
import zmq
from rich.console import Console

from particlewatch.daemon import messages
from particlewatch.dashboard import (DashboardState, StreamFollower, acquisition_endpoint_for,
                                     decode_message, endpoints_from_out, histogram_rows, render,
                                     resolve_endpoints)
from particlewatch.session import AcquisitionPublisher

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


# --- the remote dashboard: acquisition state and statistics over ZeroMQ ------------------

RUNNER_STATE = {"state": "recording", "stage_x_um": 12.5, "stage_y_um": -3.0,
                "defocus_um": 0.012, "tile": 7, "tiles": 40, "skipped_segments": 3,
                "frames_saved": 3, "focus_images": 21, "survey_images": 7, "clock_s": 412.0,
                "stop_reason": None}


def _screen(state, *, width=80, height=24, **options):
    console = Console(record=True, width=width, height=height, color_system=None)
    console.print(state.render(width=width, height=height, **options))
    return console.export_text()


def _pump(follower, done, *, polls=200):
    """Poll until ``done()``; the bound only keeps a broken test from hanging."""
    for _ in range(polls):
        if done():
            return True
        follower.poll(50)
    return done()


class _XPub:
    """A short-lived publisher that sends only once a subscriber has joined (XPUB sees the
    subscription), so the test needs no sleep to get past ZeroMQ's slow joiner."""

    def __init__(self):
        self.socket = zmq.Context.instance().socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def wait_for_subscriber(self):
        assert self.socket.poll(10_000), "no subscriber joined"
        assert self.socket.recv()[:1] == b"\x01"

    def send(self, payload: bytes):
        self.socket.send(payload)

    def close(self):
        self.socket.close(linger=0)


def _recorded_stats():
    return [m for m in _recorded_messages() if m["type"] in ("stats", "converged")][-1]


def test_remote_dashboard_renders_acquisition_state_received_over_zeromq():
    stats = _recorded_stats()
    stats_pub = _XPub()
    # the session's own publisher, updated before any dashboard exists: a late dashboard
    # must get the state on joining, not at the next change
    acquisition_pub = AcquisitionPublisher("tcp://127.0.0.1:0",
                                           extra={"sample": "ps-bimodal",
                                                  "backend": "simulated", "frames_earlier": 20})
    acquisition_pub.update(RUNNER_STATE)
    state = DashboardState(stale_after_s=60)
    follower = StreamFollower(state)
    try:
        assert acquisition_pub.endpoint.startswith("tcp://127.0.0.1:")
        follower.connect(stats=stats_pub.endpoint, acquisition=acquisition_pub.endpoint)
        stats_pub.wait_for_subscriber()
        stats_pub.send(messages.encode(stats))
        assert _pump(follower, lambda: state.stats is not None and state.acquisition)
    finally:
        follower.close()
        acquisition_pub.close()
        stats_pub.close()
    text = _screen(state)
    lines = text.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert "ps-bimodal (simulated)" in lines[0]
    for expected in ("recording", "tile 7 of 40", "stage 12.5, -3.0 µm", "focus +0.012 µm",
                     "skipped segments 3", "focus images 21", "acquired 3 (+20)",
                     f"analysed {stats['frames_ok']}", "microscope 6.9 min"):
        assert expected in text, expected
    for pop in stats["populations"]:
        assert f"P{pop['id']} " in text
        assert f"±{pop['ci95_rel'] * 100:.1f}% of ±1.0%, ~{round(pop['needed_more'] / 1000)}k more" in text
    assert "not heard" not in text and "no acquisition" not in text


def test_dashboard_started_before_the_session_picks_it_up():
    with pysocket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    state = DashboardState()
    follower = StreamFollower(state)
    follower.connect(acquisition=endpoint)
    try:
        follower.poll(0)
        assert "no acquisition heard yet on " + endpoint in _screen(
            state, waiting=f"no acquisition heard yet on {endpoint}")
        publisher = AcquisitionPublisher(endpoint)
        try:
            publisher.update(RUNNER_STATE, state="focusing")
            assert _pump(follower, lambda: state.acquisition is not None)
        finally:
            publisher.close()
    finally:
        follower.close()
    assert state.acquisition["state"] == "focusing"
    assert "focusing  tile 7 of 40" in _screen(state)


def test_statistics_without_acquisition_say_so():
    stats_pub = _XPub()
    state = DashboardState(stale_after_s=5)
    follower = StreamFollower(state)
    try:
        follower.connect(stats=stats_pub.endpoint)  # a plain `watch`: no acquisition stream
        stats_pub.wait_for_subscriber()
        stats_pub.send(messages.encode(_recorded_stats()))
        assert _pump(follower, lambda: state.stats is not None)
    finally:
        follower.close()
        stats_pub.close()
    text = _screen(state)
    assert "no acquisition (statistics only)" in text
    assert "acquired" not in text and "tile" not in text
    assert f"analysed {_recorded_stats()['frames_ok']}" in text


def test_malformed_messages_are_ignored_with_a_logged_line(caplog):
    stats_pub, acquisition_pub = _XPub(), _XPub()
    state = DashboardState()
    follower = StreamFollower(state)
    good = messages.acquisition_message(RUNNER_STATE)
    try:
        follower.connect(stats=stats_pub.endpoint, acquisition=acquisition_pub.endpoint)
        stats_pub.wait_for_subscriber()
        acquisition_pub.wait_for_subscriber()
        with caplog.at_level(logging.WARNING, logger="particlewatch.dashboard"):
            acquisition_pub.send(b"\x80not json")
            acquisition_pub.send(messages.encode({**good, "tile": "7"}))
            acquisition_pub.send(messages.encode({**good, "path": "/etc/passwd"}))
            acquisition_pub.send(messages.encode(_recorded_stats()))  # wrong stream
            stats_pub.send(messages.encode({"type": "stats", "populations": "all of them"}))
            stats_pub.send(messages.encode({**_recorded_stats(), "histogram": {
                "edges_nm": [1, 2], "counts": {"x": [1]}}}))
            acquisition_pub.send(messages.encode(good))
            assert _pump(follower, lambda: state.acquisition is not None and state.ignored >= 6)
    finally:
        follower.close()
        stats_pub.close()
        acquisition_pub.close()
    assert state.ignored == 6
    assert state.stats is None  # neither bad stats message was taken
    assert state.acquisition["tile"] == 7
    logged = [r.getMessage() for r in caplog.records if "ignored a malformed" in r.getMessage()]
    assert len(logged) == 6
    assert any("'tile' must be int" in line for line in logged)
    assert any("unknown field(s): path" in line for line in logged)
    text = _screen(state)
    assert "ignored 6 malformed message(s)" in text and "tile 7 of 40" in text


@pytest.mark.parametrize("change, reason", [
    ({"tile": "7"}, "'tile' must be int"),
    ({"tile": True}, "'tile' must be int"),
    ({"stage_x_um": "12.5"}, "'stage_x_um' must be float"),
    ({"stage_x_um": float("inf")}, "finite"),
    ({"frames_saved": -1}, "count from 0"),
    ({"tile": 41}, "beyond tiles"),
    ({"state": "recording\x1b[2J"}, "control characters"),
    ({"state": "x" * 201}, "longer than 200"),
    ({"state": ""}, "empty"),
    ({"state": None}, "'state' must be str"),
    ({"path": "/data/frame_00001.mrc"}, "unknown field"),
])
def test_messages_reject_a_malformed_acquisition_message(change, reason):
    message = {**messages.acquisition_message(RUNNER_STATE), **change}
    payload = json.dumps({"schema_version": 1, **message}).encode()  # NaN/inf survive here
    with pytest.raises(messages.MessageError, match=reason):
        messages.validate_acquisition(
            messages.decode(payload, max_bytes=messages.MAX_ACQUISITION_BYTES))


def test_acquisition_message_round_trip_and_missing_state():
    built = messages.acquisition_message({**RUNNER_STATE, "focus": [1, 2]}, sample="au10",
                                         elapsed_s=3)
    assert "focus" not in built  # the runner's other keys are not sent
    decoded = messages.decode(messages.encode(built), max_bytes=messages.MAX_ACQUISITION_BYTES)
    checked = messages.validate_acquisition(decoded)
    expected = {"tile": 7, "sample": "au10", "elapsed_s": 3.0}
    assert {key: checked[key] for key in expected} == expected
    with pytest.raises(messages.MessageError, match="lacks 'state'"):
        messages.validate_acquisition({"type": "acquisition", "tile": 1})
    big = {"schema_version": 1, "type": "acquisition", "state": "x" * 9000}
    with pytest.raises(messages.MessageError, match="exceeds"):
        messages.decode(json.dumps(big).encode(), max_bytes=messages.MAX_ACQUISITION_BYTES)


def test_endpoints_are_found_from_the_out_folder(tmp_path):
    assert resolve_endpoints(out_dir=tmp_path) == {"stats": None, "acquisition": None}
    (tmp_path / "daemon.json").write_text(json.dumps(
        {"schema_version": 1, "endpoints": {"stats": "tcp://0.0.0.0:6000",
                                            "control": "tcp://0.0.0.0:6001"}}))
    # a plain `watch`: statistics, no acquisition
    assert resolve_endpoints(out_dir=tmp_path) == {"stats": "tcp://127.0.0.1:6000",
                                                   "acquisition": None}
    (tmp_path / "session.json").write_text(json.dumps(
        {"schema_version": 1, "endpoints": {"acquisition": "tcp://127.0.0.1:40123"}}))
    assert endpoints_from_out(tmp_path)["acquisition"] == "tcp://127.0.0.1:40123"
    assert resolve_endpoints(out_dir=tmp_path, connect="tcp://127.0.0.1:7000") == {
        "stats": "tcp://127.0.0.1:7000", "acquisition": "tcp://127.0.0.1:40123"}
    for bad in ("not json", json.dumps({"schema_version": 1, "endpoints": {
            "acquisition": "file:///etc/passwd"}}), json.dumps([1])):
        (tmp_path / "session.json").write_text(bad)
        assert endpoints_from_out(tmp_path)["acquisition"] is None


def test_default_endpoints_keep_connect_working():
    assert acquisition_endpoint_for("tcp://127.0.0.1:5556") == "tcp://127.0.0.1:5560"
    assert acquisition_endpoint_for("tcp://127.0.0.1:0") is None
    assert acquisition_endpoint_for("ipc:///tmp/stats") is None
    assert resolve_endpoints() == {"stats": "tcp://127.0.0.1:5556",
                                   "acquisition": "tcp://127.0.0.1:5560"}
    assert resolve_endpoints(connect="tcp://127.0.0.1:6000")["acquisition"] == \
        "tcp://127.0.0.1:6004"


# --- layout: 80×24 and a large terminal -------------------------------------------------

def _six_populations():
    edges = [float(e) for e in range(0, 121, 2)]
    means = [9.8, 21.0, 38.5, 52.3, 77.0, 104.0]
    pops, counts = [], {}
    for i, mean in enumerate(means):
        pops.append({"id": i, "n": 1234 * (i + 1), "fraction": 1 / 6, "mean_ecd_nm": mean,
                     "ci95_nm": [mean * 0.985, mean * 1.015], "ci95_rel": 0.015,
                     "z_average_nm": mean * 1.04, "cv": 0.1, "shape": "sphere",
                     "converged": i == 0, "needed_more": 0 if i == 0 else 900 * i})
        counts[str(i)] = [float(max(0, 50 - abs(e + 1 - mean) * 5)) for e in edges[:-1]]
    counts["-1"] = [1.0 if k % 17 == 0 else 0.0 for k in range(len(edges) - 1)]
    return {"schema_version": 1, "type": "stats", "precision": 0.01, "frames_ok": 123,
            "frames_failed": 4, "particles": sum(p["n"] for p in pops), "converged": False,
            "populations": pops, "histogram": {"edges_nm": edges, "counts": counts}}


def test_six_populations_errors_and_acquisition_fit_80x24_with_nothing_cut():
    stats = _six_populations()
    state = DashboardState()
    state.on_message(stats)
    state.on_acquisition_state({**RUNNER_STATE, "frames_earlier": 12})
    for line in ("frame_00003.mrc: truncated MRC", "frame_00007.mrc: no pixel size",
                 "worker w1 died"):
        state.on_message({"type": "error", "error": line})
    text = _screen(state, width=80, height=24)
    lines = text.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    table = [line for line in lines if line.startswith("│ P") and "±" in line]
    assert len(table) == 6 and not any("…" in line for line in table)
    assert "±1.5% ✓" in text  # P0 converged
    assert "±1.5% of ±1.0%, ~900 more" in text  # the wording fits 80 columns
    for name in ("P0 10 nm", "P5 104 nm", "outliers"):
        assert name in text
    for expected in ("acquired 3 (+12)", "analysed 123", "failed 4", "tile 7 of 40",
                     "worker w1 died", "frame_00003.mrc: truncated MRC"):
        assert expected in text, expected


def test_large_terminal_draws_taller_wider_histograms_and_full_names():
    stats = _six_populations()
    state = DashboardState()
    state.on_message(stats)
    state.on_acquisition_state(RUNNER_STATE)
    small, large = _screen(state, width=80, height=24), _screen(state, width=160, height=60)
    bar_cells = lambda text: sum(text.count(c) for c in "▁▂▃▄▅▆▇█")  # noqa: E731
    assert bar_cells(large) > 2 * bar_cells(small)
    assert "P3 sphere 52 nm" in large and "±1.5% of ±1.0%, ~2700 more" in large
    assert len(large.splitlines()) <= 60 and all(len(line) <= 160 for line in large.splitlines())


def test_particles_per_minute_and_a_silent_acquisition():
    now = [100.0]
    state = DashboardState(clock=lambda: now[0], stale_after_s=5)
    stats = _six_populations()
    state.on_message({**stats, "particles": 1000})
    state.on_message(messages.acquisition_message(RUNNER_STATE))
    assert state.rate_per_min() is None  # one sample is no rate
    now[0] = 130.0
    state.on_message({**stats, "particles": 1600})
    assert state.rate_per_min() == pytest.approx(1200)
    text = _screen(state)
    assert "particles 1,600 (1200/min)" in text
    assert "not heard for 30 s" in text
    state.on_message(messages.acquisition_message({**RUNNER_STATE, "state": "done"}))
    now[0] = 200.0
    assert "not heard" not in _screen(state)  # a finished acquisition is silent, not lost


@pytest.mark.parametrize("change, reason", [
    ({"populations": [{"id": i} for i in range(65)]}, "more than 64"),
    ({"populations": [{"id": 0, "mean_ecd_nm": "54"}]}, "'mean_ecd_nm' must be a number"),
    ({"populations": [{"id": 0, "ci95_nm": [1]}]}, "ci95_nm"),
    ({"populations": [{"id": "0"}]}, "'id' must be an integer"),
    ({"histogram": {"edges_nm": [1, 2, 3], "counts": {"0": [1]}}}, "must be 2 numbers"),
    ({"frames_ok": "3"}, "'frames_ok' must be a number"),
])
def test_stats_the_dashboard_cannot_draw_are_refused(change, reason):
    from particlewatch.dashboard import check_stats

    check_stats(_recorded_stats())  # the daemon's own pass
    with pytest.raises(ValueError, match=reason):
        check_stats({**_recorded_stats(), **change})
