"""The main job end to end: acquisition + daemon stop by themselves on convergence, and the
populations they report match the simulator's ground truth."""

import json
from pathlib import Path

import numpy as np
import pytest

from particlewatch import session
from particlewatch.session import run_session

# Issue 8 asks for means within 2% and fractions within 3 points of the truth over every
# particle (this run's frames: au10 -0.5%; PS50 +0.1%, PS100 +0.5%, PS50 fraction 0.492 vs
# 0.496 since crowded-frame recall was fixed; it was 3-4 points low before).
MEAN_TOLERANCE = 0.02
FRACTION_TOLERANCE = 0.03


@pytest.fixture(autouse=True)
def _ports_of_this_test(monkeypatch):
    """Each session looks for its ports from a random base, not from 5556: the suite runs in
    parallel (pytest-xdist), and two sessions starting at once would both find 5556 free."""
    first = int(np.random.default_rng().integers(20000, 60000))
    find_block = session._free_tcp_port_block
    monkeypatch.setattr(session, "_free_tcp_port_block",
                        lambda host="127.0.0.1", *, count=5, **_: find_block(host, first=first,
                                                                            count=count))


def _truth_populations(frames_dir: Path):
    """True mean ECD and number fraction per population over the frames acquired, counting
    every particle an analysis can measure (all but those cut by the frame edge)."""
    sizes: dict[int, list[float]] = {}
    for path in sorted((frames_dir / "truth").glob("frame_*.json")):
        for p in json.loads(path.read_text())["particles"]:
            if not p["touches_edge"]:
                sizes.setdefault(p["population"], []).append(p["ecd_nm"])
    total = sum(len(v) for v in sizes.values())
    return {k: (float(np.mean(v)), len(v) / total) for k, v in sizes.items()}


def _match(reported, truth):
    """Pair each true population with the reported one nearest in mean size."""
    pairs = []
    for true_id, (mean, fraction) in sorted(truth.items(), key=lambda kv: kv[1][0]):
        best = min(reported, key=lambda p: abs(p["mean_ecd_nm"] - mean))
        pairs.append((mean, fraction, best))
    return pairs


@pytest.mark.parametrize("sample, n_populations", [("au10", 1), ("ps-bimodal", 2)])
def test_session_stops_on_convergence_and_matches_truth(tmp_path, sample, n_populations):
    out = tmp_path / "session"
    result = run_session(out, sample=sample, precision=0.05, max_frames=25, seed=0,
                         workers=1, dashboard=False, size_px=1024)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["converged"], summary.get("convergence")
    assert result.acquisition.stop_reason == "converged"
    assert result.frames_saved < 25  # it stopped by itself, before the frame limit

    populations = summary["populations"]
    assert len(populations) == n_populations
    truth = _truth_populations(out / "frames")
    for true_mean, true_fraction, pop in _match(populations, truth):
        print(f"truth {true_mean:.2f} nm ({true_fraction:.3f}) reported "
              f"{pop['mean_ecd_nm']:.2f} nm ({pop['fraction']:.3f})")
    for true_mean, true_fraction, pop in _match(populations, truth):
        assert abs(pop["mean_ecd_nm"] - true_mean) <= MEAN_TOLERANCE * true_mean
        if n_populations > 1:
            assert abs(pop["fraction"] - true_fraction) <= FRACTION_TOLERANCE

    report = (out / "report.md").read_text()
    assert "stopped because: the statistics converged" in report
    for name in ("particles.csv", "frames.csv", "histogram.png"):
        assert (out / name).stat().st_size > 0
    assert list((out / "overlays").glob("frame_*.png"))
    assert (out / "frames" / "positions.nav").exists()
    # where a dashboard in another terminal finds the acquisition state (dashboard --out)
    endpoints = json.loads((out / "session.json").read_text())["endpoints"]
    assert endpoints["acquisition"].startswith("tcp://127.0.0.1:")
    assert endpoints["stats"] == json.loads((out / "daemon.json").read_text())["endpoints"]["stats"]


def test_acquisition_stream_takes_a_free_port_when_stats_port_plus_4_is_taken():
    import socket

    from particlewatch.dashboard import DashboardState, StreamFollower
    from particlewatch.session import _open_publisher

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        stats_port = blocker.getsockname()[1] - 4  # so that stats port + 4 is taken
        publisher = _open_publisher(f"tcp://127.0.0.1:{stats_port}", allow_remote=False,
                                    extra={"sample": "au10", "backend": "simulated"})
    state = DashboardState()
    follower = StreamFollower(state)
    try:
        assert publisher.endpoint.startswith("tcp://127.0.0.1:")
        assert publisher.endpoint != f"tcp://127.0.0.1:{stats_port + 4}"
        publisher.update({"state": "focusing", "tile": 1, "tiles": 9})
        follower.connect(acquisition=publisher.endpoint)
        for _ in range(200):  # a bound against hanging, not a timing check
            if state.acquisition is not None:
                break
            follower.poll(50)
    finally:
        follower.close()
        publisher.close()
    assert state.acquisition["state"] == "focusing" and state.acquisition["sample"] == "au10"
    with pytest.raises(ValueError, match="allow-remote"):
        _open_publisher("tcp://0.0.0.0:0", allow_remote=False, extra={})


def test_session_resumes_when_frames_analysed_late_undo_convergence(tmp_path, monkeypatch):
    """Frames saved while the converged message travels are analysed too and may undo it
    (a frame unlike the others widens a fraction's interval). The session then acquires on
    until the verdict over every saved frame is converged, so the report never says
    "stopped because converged" next to "converged: False"."""
    import particlewatch.daemon.pipeline as pipeline
    from particlewatch.analysis.statistics import RunningStatistics

    instances = []

    class LenientWhileRunning(RunningStatistics):
        # the daemon's first statistics (built at start) converge at 2 frames; every
        # rebuild over all saved frames (settle, stop) asks for 8 (the first round stops
        # with at most ~5 saved: analysis may lag by n_workers + 1 frames)
        def summary(self, **kwargs):
            s = super().summary(**kwargs)
            s["converged"] = self.n_frames >= (2 if self is instances[0] else 8)
            return s

    def statistics(*, precision, seed):
        instances.append(LenientWhileRunning(precision=precision, seed=seed))
        return instances[-1]

    monkeypatch.setattr(pipeline, "_default_statistics", statistics)
    out = tmp_path / "session"
    result = run_session(out, sample="au10", precision=0.05, max_frames=16, seed=0,
                         workers=1, dashboard=False, size_px=512)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["converged"] and summary["frames_ok"] >= 8
    assert result.acquisition.stop_reason == "converged"
    assert "resumed 1 time(s)" in result.stop_reason
    # one numbering across the rounds: nothing overwritten, nothing counted twice
    frames = sorted(p.name for p in (out / "frames").glob("frame_*.mrc"))
    assert len(frames) == result.frames_saved == summary["frames_ok"]
    assert len({p.name for p in result.acquisition.frames}) == len(frames)
    report = (out / "report.md").read_text()
    assert "converged: True" in report


class _CtrlCConsole:
    """A console whose third progress line is interrupted, as Ctrl-C would be."""

    width, height = 80, 24

    def __init__(self):
        self.lines = 0

    def print(self, *args, **kwargs):
        self.lines += 1
        if self.lines == 3:
            raise KeyboardInterrupt


def test_ctrl_c_reports_what_was_done_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "session"
    first = run_session(out, sample="au10", precision=0.001, max_frames=20, seed=0, workers=1,
                        dashboard=False, size_px=512, console=_CtrlCConsole())
    assert first.stop_reason == "interrupted by the user (Ctrl-C)"
    report = (out / "report.md").read_text()
    assert "stopped because: interrupted by the user (Ctrl-C)" in report
    done = sorted(p.name for p in (out / "frames").glob("frame_*.mrc"))
    assert done and json.loads((out / "summary.json").read_text())["frames_ok"] == len(done)

    again = run_session(out, sample="au10", precision=0.001, max_frames=2, seed=0, workers=1,
                        dashboard=False, size_px=512)
    assert again.frames_saved == 2
    frames = sorted(p.name for p in (out / "frames").glob("frame_*.mrc"))
    # numbering goes on, nothing overwritten, every frame analysed once
    assert frames[:len(done)] == done and len(frames) == len(done) + 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_ok"] == len(frames)
    rows = (out / "frames.csv").read_text().splitlines()[1:]
    assert len(rows) == len(frames) == len({r.split(",")[0] for r in rows})
