"""The daemon end to end: exactly once, slow writers, bad files, control, restarts.

Most tests inject the fake analysis of ``test_daemon_fakes`` (frames carry their particles'
ECDs in their pixels), so every count is checked against what was written, and image
analysis speed does not matter; the last test runs the real analysis on simulated frames.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from particlewatch.daemon.pipeline import Daemon, request

sys.path.insert(0, str(Path(__file__).parent))  # importlib mode: make the fakes importable
from test_daemon_fakes import encode_frame, fake_analyze, truth_ecds

TESTS = str(Path(__file__).parent)
FAST = dict(workers=2, worker_mode="thread", analyze=fake_analyze,
            stats_endpoint="tcp://127.0.0.1:0", settle_s=0.05, stall_timeout_s=1.0,
            rescan_s=0.5, stats_interval_s=0.2, histogram_interval_s=0.5)


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class Subscriber:
    """Collects every message of a daemon's stream in a thread."""

    def __init__(self, endpoint):
        import zmq

        self.messages = []
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self._sock.poll(50):
                self.messages.append(json.loads(self._sock.recv()))

    def wait_for(self, kind, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m["type"] == kind for m in list(self.messages)):
                return True
            time.sleep(0.02)
        return False

    def close(self):
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def of(self, kind):
        return [m for m in list(self.messages) if m["type"] == kind]


@pytest.fixture
def dirs(tmp_path):
    folder, out = tmp_path / "frames", tmp_path / "out"
    folder.mkdir()
    return folder, out


def test_frames_dropped_at_once_are_each_processed_exactly_once(dirs, tmp_path):
    folder, out = dirs
    truth = truth_ecds(np.random.default_rng(1), 203)
    for i in range(3):  # frames already there at start are processed too
        encode_frame(folder / f"frame_{i:05d}.mrc", truth[i], index=i)
    staging = tmp_path / "staging"
    for i in range(3, 203):
        encode_frame(staging / f"frame_{i:05d}.mrc", truth[i], index=i)
    daemon = Daemon(folder, out, **FAST).start()
    sub = Subscriber(daemon.endpoints["stats"])
    try:
        assert sub.wait_for("stats")  # subscribed, and the first frames are done
        for path in sorted(staging.iterdir()):  # .mdoc first, as a writer would
            if path.suffix == ".mdoc":
                os.rename(path, folder / path.name)
        for path in sorted(staging.iterdir()):
            os.rename(path, folder / path.name)
        assert daemon.wait_idle(60, frames=203)
        time.sleep(0.3)  # let the last messages reach the subscriber
    finally:
        daemon.stop()
        sub.close()
    frames = rows(out / "frames.csv")
    assert sorted(r["frame"] for r in frames) == [f"frame_{i:05d}" for i in range(203)]
    assert all(r["status"] == "ok" for r in frames)
    assert {r["frame"]: int(r["particles"]) for r in frames} == {
        f"frame_{i:05d}": len(e) for i, e in enumerate(truth)}
    particles = rows(out / "particles.csv")
    assert len(particles) == sum(len(e) for e in truth)
    ecd = sorted(float(r["ecd_nm"]) for r in particles)
    np.testing.assert_allclose(ecd, sorted(np.concatenate(truth)), atol=0.006)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["frames_ok"], summary["particles"]) == (203, len(ecd))
    frame_msgs = [m["frame"] for m in sub.of("frame")]
    # every frame published once (the 3 first may predate the subscription)
    assert len(frame_msgs) == len(set(frame_msgs))
    assert set(frame_msgs) >= {f"frame_{i:05d}" for i in range(3, 203)}
    last = sub.of("stats")[-1]
    assert last["schema_version"] == 1 and isinstance(last["populations"], list)


class ScriptedVerdict:
    """Real running statistics whose converged verdict follows a script of frame counts,
    so that convergence can be undone by a later frame on purpose."""

    def __init__(self, converged_at):
        self.converged_at = converged_at

    def __call__(self, *, precision, seed):
        from particlewatch.analysis.statistics import RunningStatistics

        converged_at = self.converged_at

        class Scripted(RunningStatistics):
            def summary(self, **kwargs):
                s = super().summary(**kwargs)
                s["converged"] = self.n_frames in converged_at
                return s

        return Scripted(precision=precision, seed=seed)


def test_convergence_undone_by_a_later_frame_is_withdrawn_and_announced_again(dirs):
    folder, out = dirs
    truth = truth_ecds(np.random.default_rng(3), 5)
    daemon = Daemon(folder, out, **{**FAST, "workers": 1},
                    statistics=ScriptedVerdict({2, 3, 5})).start()
    sub = Subscriber(daemon.endpoints["stats"])
    verdicts = []
    try:
        time.sleep(0.3)  # subscribed before the first frame (ZeroMQ's slow joiner)
        for i in range(5):
            encode_frame(folder / f"frame_{i:05d}.mrc", truth[i], index=i)
            assert daemon.wait_idle(20, frames=i + 1)
            verdicts.append(daemon.wait_converged(0))
        settled = daemon.settle(20)
        time.sleep(0.3)  # let the last messages reach the subscriber
    finally:
        daemon.stop()
        sub.close()
    assert verdicts == [False, True, True, False, True]
    announced = [m["frames_ok"] for m in sub.of("converged")]
    assert announced == [2, 5]  # once per convergence, again after it was undone
    # settle gives what stop writes: the canonical summary over every frame
    final = json.loads((out / "summary.json").read_text())
    assert settled["converged"] and final["converged"]
    assert settled["populations"] == final["populations"]


def test_settle_on_a_stopped_daemon_says_so_at_once(dirs):
    folder, out = dirs
    daemon = Daemon(folder, out, **FAST).start()
    daemon.stop()
    assert not daemon.running
    with pytest.raises(RuntimeError, match="not running"):
        daemon.settle(timeout=None)  # without the check this would wait forever


def _slow_write(path, data, *, chunks, pause_s):
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start:start + step])
            fh.flush()
            time.sleep(pause_s)


def test_a_frame_written_slowly_is_processed_once_when_whole(dirs, tmp_path):
    folder, out = dirs
    ecd = [12.5, 30.25, 9.0]
    # 256 x 256 uint16: half a megabyte in 8 chunks, each pause longer than settle_s
    source = encode_frame(tmp_path / "frame_00001.mrc", ecd, size=256)
    mdoc = Path(str(source) + ".mdoc")
    daemon = Daemon(folder, out, **FAST).start()
    try:
        (folder / mdoc.name).write_bytes(mdoc.read_bytes())
        _slow_write(folder / source.name, source.read_bytes(), chunks=8, pause_s=0.2)
        assert daemon.wait_idle(30, frames=1)
        time.sleep(0.5)  # a second look would show any double processing
        assert daemon.wait_idle(5, frames=1)
    finally:
        daemon.stop()
    (row,) = rows(out / "frames.csv")
    assert (row["status"], int(row["particles"])) == ("ok", 3)
    assert sorted(float(r["ecd_nm"]) for r in rows(out / "particles.csv")) == sorted(ecd)


def test_bad_files_are_recorded_failed_and_the_daemon_goes_on(dirs, tmp_path):
    folder, out = dirs
    good = encode_frame(tmp_path / "good.mrc", [10.0, 11.0])
    data = good.read_bytes()
    (folder / "empty.mrc").write_bytes(b"")
    (folder / "truncated.mrc").write_bytes(data[:len(data) // 2])
    (folder / "corrupt.mrc").write_bytes(b"\x13" * len(data))
    (folder / "notes.png").write_bytes(b"\x89PNG not really")
    (folder / "frame_00001.mrc.mdoc").write_text("a companion, never a frame")
    daemon = Daemon(folder, out, **FAST).start()
    try:
        assert daemon.wait_idle(30, frames=4)
        encode_frame(folder / "frame_00002.mrc", [10.0, 11.0, 12.0])
        assert daemon.wait_idle(30, frames=5)
    finally:
        daemon.stop()
    by_name = {r["frame"]: r for r in rows(out / "frames.csv")}
    assert set(by_name) == {"empty", "truncated", "corrupt", "notes", "frame_00002"}
    expect = {"empty": "empty file", "truncated": "truncated", "corrupt": "corrupt MRC header",
              "notes": "unsupported file type"}
    for name, fragment in expect.items():
        assert by_name[name]["status"] == "failed"
        assert fragment in by_name[name]["reason"] and name in by_name[name]["reason"]
    assert (by_name["frame_00002"]["status"], by_name["frame_00002"]["particles"]) == ("ok", "3")


def test_malformed_control_messages_get_an_error_reply(dirs, tmp_path):
    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0])
    (tmp_path / "outside.mrc").write_bytes(b"x")
    daemon = Daemon(folder, out, **FAST).start()
    control = daemon.endpoints["control"]
    bad = {
        b"{not json": "not JSON",
        json.dumps({"schema_version": 7, "type": "status"}).encode(): "schema_version",
        json.dumps({"type": "status"}).encode(): "schema_version",
        json.dumps({"schema_version": 1, "type": "status", "pad": "x" * 70000}).encode():
            "exceeds",
        json.dumps({"schema_version": 1, "type": "analyze",
                    "path": str(tmp_path / "outside.mrc")}).encode(): "outside",
        json.dumps({"schema_version": 1, "type": "analyze",
                    "path": "../outside.mrc"}).encode(): "outside",
        json.dumps({"schema_version": 1, "type": "analyze", "path": 42}).encode(): "must be str",
        json.dumps({"schema_version": 1, "type": "shutdown-everything"}).encode(): "unknown",
    }
    try:
        assert daemon.wait_idle(20, frames=1)
        for payload, fragment in bad.items():
            reply = request(control, payload)
            assert reply["type"] == "error" and reply["ok"] is False
            assert fragment in reply["error"]
        status = request(control, {"type": "status"})
        assert status["ok"] and status["frames_ok"] == 1
        again = request(control, {"type": "analyze", "path": "frame_00001.mrc"})
        assert again["ok"]
        assert daemon.wait_idle(20, frames=1)
        reply = request(control, {"type": "stop"})
        assert reply["ok"]
        daemon._thread.join(20)
        assert not daemon._thread.is_alive()
    finally:
        daemon.stop()
    (row,) = rows(out / "frames.csv")  # re-analysed, still counted once
    assert row["status"] == "ok"


def test_a_modified_frame_replaces_its_old_result(dirs):
    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0, 10.5])
    encode_frame(folder / "frame_00002.mrc", [20.0])
    daemon = Daemon(folder, out, **FAST).start()
    try:
        assert daemon.wait_idle(20, frames=2)
        time.sleep(0.05)  # a new mtime even on coarse-clock filesystems
        encode_frame(folder / "frame_00001.mrc", [30.0, 31.0, 32.0])
        deadline = time.monotonic() + 20
        while daemon.summary["particles"] != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        daemon.stop()
    by_name = {r["frame"]: r for r in rows(out / "frames.csv")}
    assert len(rows(out / "frames.csv")) == 2 and by_name["frame_00001"]["particles"] == "3"
    assert sorted(float(r["ecd_nm"]) for r in rows(out / "particles.csv")) == [20, 30, 31, 32]


def test_a_worker_dying_mid_frame_does_not_lose_the_frame(dirs, tmp_path, monkeypatch):
    folder, out = dirs
    marker = tmp_path / "crash-once"
    marker.write_text("the first worker to see frame_00002_crash dies")
    monkeypatch.setenv("PW_FAKE_CRASH_ONCE", str(marker))
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    truth = {"frame_00001": [10.0], "frame_00002_crash": [11.0, 12.0], "frame_00003": [13.0]}
    for name, ecd in truth.items():
        encode_frame(folder / f"{name}.mrc", ecd)
    options = {**FAST, "worker_mode": "process", "analyze": "test_daemon_fakes:fake_analyze",
               "task_timeout_s": 60.0}
    daemon = Daemon(folder, out, **options).start()
    try:
        assert daemon.wait_idle(60, frames=3)
    finally:
        daemon.stop()
    assert not marker.exists()  # a worker did die
    assert {r["frame"]: int(r["particles"]) for r in rows(out / "frames.csv")} == {
        name: len(ecd) for name, ecd in truth.items()}


def _bad_results(path, **options):
    """The fake analysis, but ``*_strings`` frames get a column of text (fails the daemon's
    message check) and ``*_notjson`` frames a value JSON cannot hold."""
    result = fake_analyze(path, **options)
    if Path(path).stem.endswith("_strings"):
        result["particles"]["ecd_nm"] = ["ten"] * len(result["particles"]["ecd_nm"])
    elif Path(path).stem.endswith("_notjson"):
        result["warnings"] = [object()]
    return result


def test_a_result_that_fails_the_message_check_is_recorded_failed(dirs):
    # Before: the result was dropped with an error and its frame waited for task_timeout_s
    # (then again, max_attempts times); a non-JSON result killed the worker thread.
    folder, out = dirs
    truth = {"frame_00001": [10.0], "frame_00002_strings": [11.0, 12.0],
             "frame_00003_notjson": [13.0], "frame_00004": [14.0, 15.0]}
    for name, ecd in truth.items():
        encode_frame(folder / f"{name}.mrc", ecd)
    daemon = Daemon(folder, out, **{**FAST, "analyze": _bad_results}).start()
    try:
        assert daemon.wait_idle(30, frames=4)
        encode_frame(folder / "frame_00005.mrc", [16.0])  # the daemon goes on
        assert daemon.wait_idle(30, frames=5)
    finally:
        daemon.stop()
    by_name = {r["frame"]: r for r in rows(out / "frames.csv")}
    assert {n: r["status"] for n, r in by_name.items()} == {
        "frame_00001": "ok", "frame_00002_strings": "failed", "frame_00003_notjson": "failed",
        "frame_00004": "ok", "frame_00005": "ok"}
    strings, notjson = by_name["frame_00002_strings"], by_name["frame_00003_notjson"]
    assert "frame_00002_strings.mrc" in strings["reason"] and "invalid result" in strings["reason"]
    assert "ecd_nm" in strings["reason"] and "\n" not in strings["reason"]
    assert "frame_00003_notjson.mrc" in notjson["reason"] and "not JSON" in notjson["reason"]
    assert sorted(float(r["ecd_nm"]) for r in rows(out / "particles.csv")) == [10, 14, 15, 16]


def test_a_result_lost_on_the_way_fails_its_frame_when_the_worker_moves_on(dirs):
    # A worker whose result never arrives whole (here: bytes that are not JSON) and which
    # then starts its next task: the first frame is recorded failed at once, not waited for.
    import zmq

    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0])
    encode_frame(folder / "frame_00002.mrc", [11.0, 12.0])
    daemon = Daemon(folder, out, **{**FAST, "workers": 0}).start()
    ctx = zmq.Context.instance()
    tasks, results = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        tasks.connect(daemon.endpoints["tasks"])
        results.connect(daemon.endpoints["results"])
        hello = {"schema_version": 1, "worker": "hand:1:1"}
        results.send_json({**hello, "type": "hello"})
        seen = []
        for _ in range(2):
            assert tasks.poll(20_000)
            header = json.loads(tasks.recv_multipart()[0])
            seen.append(header["name"])
            results.send_json({**hello, "type": "started", "task_id": header["task_id"],
                               "name": header["name"]})
            if len(seen) == 1:
                results.send(b"\x00 half a result")  # dropped by the daemon's check
                continue
            result = fake_analyze(header["path"])
            results.send_json({**hello, "type": "result", "task_id": header["task_id"],
                               "name": header["name"], "sha256": header["sha256"],
                               "result": result})
        assert daemon.wait_idle(20, frames=2)
    finally:
        daemon.stop()
        tasks.close(0)
        results.close(0)
    by_name = {r["frame"]: r for r in rows(out / "frames.csv")}
    lost, kept = Path(seen[0]).stem, Path(seen[1]).stem
    assert by_name[lost]["status"] == "failed" and seen[0] in by_name[lost]["reason"]
    assert "without a valid result" in by_name[lost]["reason"]
    assert by_name[kept]["status"] == "ok"


class HandWorker:
    """A worker driven by the test, message by message, on the daemon's sockets."""

    def __init__(self, daemon, name):
        import zmq

        ctx = zmq.Context.instance()
        self.tasks, self.results = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        self.tasks.connect(daemon.endpoints["tasks"])
        self.results.connect(daemon.endpoints["results"])
        self.id = name
        self.send("hello")

    def send(self, kind, **fields):
        self.results.send_json({"schema_version": 1, "type": kind, "worker": self.id, **fields})

    def take(self, timeout_s):
        """The next task's header, or None after ``timeout_s``."""
        if not self.tasks.poll(int(timeout_s * 1000)):
            return None
        return json.loads(self.tasks.recv_multipart()[0])

    def answer(self, header):
        self.send("result", task_id=header["task_id"], name=header["name"],
                  sha256=header["sha256"], result=fake_analyze(header["path"]))

    def close(self):
        self.tasks.close(0)
        self.results.close(0)


@pytest.mark.parametrize("bye_first", [False, True])
def test_a_worker_leaving_mid_frame_has_its_frame_sent_again_at_once(dirs, bye_first):
    # A remote worker stopped with Ctrl-C says bye mid-frame; before, its frame waited
    # task_timeout_s (600 s by default) before anyone else got it. run_worker stops taking
    # tasks before its bye; a worker that says bye first keeps its task pipe open a moment,
    # and a task sent again at once went down it and was lost.
    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0, 11.0])
    daemon = Daemon(folder, out, **{**FAST, "workers": 0}).start()
    first = HandWorker(daemon, "hand:1:1")
    second = None
    try:
        header = first.take(20)
        first.send("started", task_id=header["task_id"], name=header["name"])
        if bye_first:
            first.send("bye")
            time.sleep(0.1)
            first.tasks.close(0)
        else:
            first.tasks.close(0)
            first.send("bye")
        first.close()
        second = HandWorker(daemon, "hand:2:1")
        again = second.take(10)
        assert again is not None and again["name"] == "frame_00001.mrc"
        second.answer(again)
        assert daemon.wait_idle(20, frames=1)
    finally:
        daemon.stop()
        first.close()
        if second is not None:
            second.close()
    assert [(r["frame"], r["status"], r["particles"]) for r in rows(out / "frames.csv")] == [
        ("frame_00001", "ok", "2")]


def test_an_invalid_result_naming_another_frame_fails_no_frame(dirs):
    # A malformed result is believed only for the frame it names, as a valid one is: a
    # buggy worker's garbage must not fail a frame that another result then finishes.
    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0, 11.0])
    daemon = Daemon(folder, out, **{**FAST, "workers": 0}).start()
    worker = HandWorker(daemon, "hand:1:1")
    try:
        header = worker.take(20)
        worker.send("started", task_id=header["task_id"], name=header["name"])
        worker.send("result", task_id=header["task_id"], name="frame_09999.mrc",
                    sha256=header["sha256"], result={"status": "ok", "particles": "none"})
        time.sleep(0.5)  # the bad message is handled before the good one either way
        worker.answer(header)
        assert daemon.wait_idle(20, frames=1)
    finally:
        daemon.stop()
        worker.close()
    assert [(r["frame"], r["status"], r["particles"]) for r in rows(out / "frames.csv")] == [
        ("frame_00001", "ok", "2")]


def test_a_task_the_worker_cannot_read_is_answered_failed_not_waited_for(dirs):
    # A worker of another version refuses the task: it now says so, and the frame is
    # recorded failed with the worker's reason (before: no answer, task_timeout_s x 3).
    import zmq

    from particlewatch.daemon import worker as worker_module

    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0])
    daemon = Daemon(folder, out, **{**FAST, "workers": 0}).start()
    stop = threading.Event()
    original = worker_module.validate_strip_task

    def refuse(header):  # as a worker that knows no such task would
        raise worker_module.messages.MessageError("unknown field(s): sha256")

    worker_module.validate_strip_task = refuse
    thread = threading.Thread(target=worker_module.run_worker,
                              args=(daemon.endpoints["tasks"], daemon.endpoints["results"]),
                              kwargs={"stop": stop, "context": zmq.Context.instance(),
                                      "poll_ms": 50}, daemon=True)
    thread.start()
    try:
        assert daemon.wait_idle(20, frames=1)
    finally:
        worker_module.validate_strip_task = original
        stop.set()
        thread.join(10)
        daemon.stop()
    (row,) = rows(out / "frames.csv")
    assert row["status"] == "failed" and "frame_00001.mrc" in row["reason"]
    assert "cannot take the task: unknown field(s): sha256" in row["reason"]


def test_workers_that_cannot_start_are_reported_not_respawned_in_a_loop(dirs):
    folder, out = dirs
    options = {**FAST, "workers": 1, "worker_mode": "process",
               "analyze": "particlewatch_no_such_module:analyze"}
    daemon = Daemon(folder, out, **options).start()
    sub = Subscriber(daemon.endpoints["stats"])
    try:
        assert sub.wait_for("error", timeout=30)
        errors = [m["error"] for m in sub.of("error")]
        assert any("exited with code" in e and "before taking work" in e for e in errors)
        time.sleep(2.0)
        # the respawn delay doubles: a few attempts, not one every supervision tick (0.5 s)
        assert daemon._failed_starts <= 5
    finally:
        sub.close()
        daemon.stop()


def _start_subprocess(folder, out, port):
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PW_FAKE_DELAY_S": "0.1"}
    cmd = [sys.executable, "-m", "particlewatch.daemon.cli", "watch", str(folder), "--out",
           str(out), "--workers", "2", "--worker-mode", "thread", "--stats",
           f"tcp://127.0.0.1:{port}", "--analyze", "test_daemon_fakes:fake_analyze",
           "--settle-s", "0.05", "--stall-timeout-s", "1", "--rescan-s", "0.5",
           "--histogram-interval-s", "0.5"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port_block():
    import socket

    for _ in range(50):
        base = int(np.random.default_rng().integers(20000, 60000))
        try:
            socks = []
            for p in range(base, base + 4):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of 4 ports")


def test_kill_9_at_random_moments_then_restart_equals_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(7)
    truth = truth_ecds(rng, 60)
    ref_folder, ref_out = tmp_path / "ref", tmp_path / "ref_out"
    folder, out = tmp_path / "frames", tmp_path / "out"
    for i, ecd in enumerate(truth):
        encode_frame(ref_folder / f"frame_{i:05d}.mrc", ecd, index=i)
    reference = Daemon(ref_folder, ref_out, **FAST).start()
    assert reference.wait_idle(60, frames=60)
    reference.stop()

    folder.mkdir()
    port = _free_port_block()
    written = 0
    for kill in range(4):
        for i in range(written, written + 15):  # frames keep arriving between crashes
            encode_frame(folder / f"frame_{i:05d}.mrc", truth[i], index=i)
        written += 15
        (out / "daemon.json").unlink(missing_ok=True)
        proc = _start_subprocess(folder, out, port)
        deadline = time.monotonic() + 60
        while not (out / "daemon.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # bound and recovered: from now on it ingests and analyses
        time.sleep(float(rng.uniform(0.05, 1.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = _start_subprocess(folder, out, port)
    try:
        control = f"tcp://127.0.0.1:{port + 1}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = request(control, {"type": "status"}, timeout_s=1, retries=1)
            except TimeoutError:
                continue
            if status["idle"] and status["frames_ok"] == 60:
                break
            time.sleep(0.1)
        assert request(control, {"type": "stop"})["ok"]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "frames.csv").read_text().replace(str(folder), "F") == \
        (ref_out / "frames.csv").read_text().replace(str(ref_folder), "F")
    assert (out / "particles.csv").read_text() == (ref_out / "particles.csv").read_text()
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref_out))
    assert summary == ref_summary
    assert summary["frames_ok"] == 60 and summary["particles"] == sum(map(len, truth))


def test_real_analysis_of_simulated_frames_end_to_end(dirs):
    from particlewatch.analysis.pipeline import analyze_frame
    from particlewatch.frames import write_frame
    from particlewatch.simulators.scope import SimScope

    folder, out = dirs
    scope = SimScope("au10", seed=3, size_px=512)
    x0, y0, x1, y1 = scope.stage_limits_um
    for i in range(2):
        scope.move_stage(x0 + (x1 - x0) * (0.3 + 0.2 * i), y0 + (y1 - y0) * 0.5)
        snap = scope.snap()
        write_frame(folder / f"frame_{i:05d}.mrc", snap.image, pixel_nm=snap.pixel_nm,
                    section={"StagePosition": (snap.stage_x_um, snap.stage_y_um),
                             "Defocus": snap.defocus_um})
    daemon = Daemon(folder, out, workers=1, worker_mode="thread",
                    stats_endpoint="tcp://127.0.0.1:0", settle_s=0.05).start()
    try:
        assert daemon.wait_idle(300, frames=2)
    finally:
        daemon.stop()
    frames = {r["frame"]: r for r in rows(out / "frames.csv")}
    assert set(frames) == {"frame_00000", "frame_00001"}
    assert all(r["status"] == "ok" and int(r["particles"]) > 0 for r in frames.values())
    # what the daemon reports for a frame is what the analysis says about it
    direct = analyze_frame(folder / "frame_00000.mrc")
    particles = rows(out / "particles.csv")
    mine = sorted(float(r["ecd_nm"]) for r in particles if r["frame"] == "frame_00000")
    np.testing.assert_allclose(mine, sorted(direct.particles["ecd_nm"]), rtol=1e-6)
    assert frames["frame_00000"]["stage_x_um"] != ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["particles"] == len(particles) == sum(int(r["particles"])
                                                         for r in frames.values())
    assert all(r["population"] != "" for r in particles)  # final labels written at stop
    assert 5 < max(summary["populations"], key=lambda p: p["n"])["mean_ecd_nm"] < 15  # au10
    assert (out / "histogram.png").stat().st_size > 1000


# --- large frames analysed as strips -----------------------------------------------------

SPLIT = dict(strip_min_px=256 * 256, strip_when="always", strip_margin_px=48)


def _simulated_frames(folder, n, *, size, seed):
    from particlewatch.frames import write_frame
    from particlewatch.simulators.scope import SimScope

    scope = SimScope("au10", seed=seed, size_px=size)
    x0, y0, x1, y1 = scope.stage_limits_um
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scope.move_stage(float(rng.uniform(x0 + 5, x1 - 5)), float(rng.uniform(y0 + 5, y1 - 5)))
        snap = scope.snap()
        write_frame(folder / f"frame_{i:05d}.mrc", snap.image, pixel_nm=snap.pixel_nm,
                    section={"StagePosition": (snap.stage_x_um, snap.stage_y_um),
                             "Defocus": snap.defocus_um})


def _split_directly(path, workers):
    """What the daemon must report for ``path``: its merged strips, or, where a margin was
    too small, the whole frame's analysis; and whether it was split."""
    from particlewatch.analysis.pipeline import analyze_frame
    from particlewatch.analysis.strips import analyze_strip, merge_strips, plan_strips

    plan = plan_strips((768, 768), workers, margin_px=SPLIT["strip_margin_px"])
    assert len(plan) == workers
    merged, fallback = merge_strips([analyze_strip(path, s) for s in plan])
    if fallback is not None:
        return analyze_frame(path), False
    return merged, True


def test_large_frames_are_analysed_in_strips_and_merged(dirs):
    from particlewatch.analysis.pipeline import analyze_frame

    folder, out = dirs
    _simulated_frames(folder, 2, size=768, seed=5)
    daemon = Daemon(folder, out, workers=2, worker_mode="thread",
                    stats_endpoint="tcp://127.0.0.1:0", settle_s=0.05, **SPLIT).start()
    try:
        assert daemon.wait_idle(300, frames=2)
    finally:
        daemon.stop()
    frames = {r["frame"]: r for r in rows(out / "frames.csv")}
    particles = rows(out / "particles.csv")
    split = []
    for name in ("frame_00000", "frame_00001"):
        assert frames[name]["status"] == "ok"
        merged, was_split = _split_directly(folder / f"{name}.mrc", 2)
        split.append(was_split)
        mine = sorted(float(r["ecd_nm"]) for r in particles if r["frame"] == name)
        # the daemon's result is the merge of the strips, each particle once ...
        np.testing.assert_allclose(mine, sorted(merged.particles["ecd_nm"]), rtol=1e-6)
        assert int(frames[name]["particles"]) == merged.n_particles
        ids = [int(r["particle_id"]) for r in particles if r["frame"] == name]
        assert sorted(ids) == list(range(1, len(ids) + 1))
        # ... and about as many particles as the whole frame's analysis finds: each strip fits
        # its own background and threshold and judges thick (merged) pieces against its own
        # isolated particles, so a few borderline particles or agglomerates may go either way
        whole = analyze_frame(folder / f"{name}.mrc").n_particles
        assert abs(merged.n_particles - whole) <= max(3, 0.03 * whole), (merged.n_particles, whole)
    assert any(split)  # at least one frame went through strips (a fallback is fine too)


def test_a_worker_dying_mid_strip_does_not_lose_the_strip(dirs):
    folder, out = dirs
    _simulated_frames(folder, 1, size=768, seed=6)
    daemon = Daemon(folder, out, workers=2, worker_mode="process",
                    stats_endpoint="tcp://127.0.0.1:0", settle_s=0.05, **SPLIT).start()
    try:
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline:  # a worker has started a strip
            busy = [w for w in list(daemon._workers_seen.values()) if w.task]
            if busy:
                pid = int(next(wid for wid, w in list(daemon._workers_seen.items())
                               if w.task).split(":")[1])
                victim = next(p for p in daemon._procs if p.pid == pid)
            time.sleep(0.01)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)  # one of the daemon's own worker processes
        assert daemon.wait_idle(300, frames=1)
    finally:
        daemon.stop()
    frame = rows(out / "frames.csv")
    assert len(frame) == 1 and frame[0]["status"] == "ok"
    merged, _ = _split_directly(folder / "frame_00000.mrc", 2)
    assert int(frame[0]["particles"]) == merged.n_particles


_SPLIT_DAEMON = """
import sys
from particlewatch.daemon.pipeline import Daemon
folder, out, port = sys.argv[1], sys.argv[2], sys.argv[3]
Daemon(folder, out, workers=2, worker_mode="thread", stats_endpoint=f"tcp://127.0.0.1:{port}",
       settle_s=0.05, rescan_s=0.5, histogram_interval_s=0.5, strip_min_px=256 * 256,
       strip_when="always", strip_margin_px=48).run()
"""


def test_kill_9_with_split_frames_then_restart_equals_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(11)
    source = tmp_path / "source"
    _simulated_frames(source, 8, size=512, seed=8)
    names = sorted(p.name for p in source.glob("*.mrc"))
    ref_folder, ref_out = tmp_path / "ref", tmp_path / "ref_out"
    folder, out = tmp_path / "frames", tmp_path / "out"
    ref_folder.mkdir()
    folder.mkdir()
    for name in names:
        for suffix in ("", ".mdoc"):
            (ref_folder / (name + suffix)).write_bytes((source / (name + suffix)).read_bytes())
    reference = Daemon(ref_folder, ref_out, workers=2, worker_mode="thread",
                       stats_endpoint="tcp://127.0.0.1:0", settle_s=0.05,
                       strip_min_px=256 * 256, strip_when="always", strip_margin_px=48).start()
    assert reference.wait_idle(300, frames=8)
    reference.stop()

    port = _free_port_block()
    cmd = [sys.executable, "-c", _SPLIT_DAEMON, str(folder), str(out), str(port)]
    written = 0
    for kill in range(3):
        for name in names[written:written + 3]:  # frames keep arriving between crashes
            for suffix in (".mdoc", ""):
                (folder / (name + suffix)).write_bytes((source / (name + suffix)).read_bytes())
        written += 3
        (out / "daemon.json").unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (out / "daemon.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.2, 2.0)))  # mid-strip, mid-merge or between frames
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        control = f"tcp://127.0.0.1:{port + 1}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                status = request(control, {"type": "status"}, timeout_s=1, retries=1)
            except TimeoutError:
                continue
            if status["idle"] and status["frames_ok"] == 8:
                break
            time.sleep(0.1)
        assert request(control, {"type": "stop"})["ok"]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    def frame_rows(d):  # analysis seconds differ from run to run; everything else may not
        return [{k: v for k, v in r.items() if k not in ("seconds", "path")}
                for r in rows(d / "frames.csv")]

    assert frame_rows(out) == frame_rows(ref_out) and len(frame_rows(out)) == 8
    assert (out / "particles.csv").read_text() == (ref_out / "particles.csv").read_text()
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref_out))
    assert summary == ref_summary and summary["frames_ok"] == 8


class BeatingHandWorker(HandWorker):
    """A hand worker that promises heartbeats, and sends them when the test says."""

    def __init__(self, daemon, name, heartbeat_s):
        self.heartbeat_s = heartbeat_s
        super().__init__(daemon, name)

    def send(self, kind, **fields):
        if kind == "hello":
            fields["heartbeat_s"] = self.heartbeat_s
        super().send(kind, **fields)

    def take_beating(self, timeout_s):
        """Wait for a task, sending heartbeats meanwhile."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.send("heartbeat", heartbeat_s=self.heartbeat_s)
            header = self.take(self.heartbeat_s)
            if header is not None:
                return header
        return None


def test_a_worker_killed_mid_frame_has_its_frame_sent_again_long_before_the_timeout(dirs):
    # A remote worker killed with kill -9 (or whose host vanished) says no bye: before,
    # its frame waited task_timeout_s (600 s by default). A worker that promised heartbeats
    # and misses heartbeat_liveness of them is taken for dead and its frame goes to another.
    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0, 11.0])
    daemon = Daemon(folder, out, **{**FAST, "workers": 0, "task_timeout_s": 600.0,
                                    "heartbeat_liveness": 5}).start()
    killed = BeatingHandWorker(daemon, "hand:1:1", heartbeat_s=0.2)
    second = None
    try:
        header = killed.take_beating(20)
        assert header is not None
        killed.send("started", task_id=header["task_id"], name=header["name"])
        killed.close()  # dies: no bye, no more heartbeats, its pipes closed by the OS
        second = BeatingHandWorker(daemon, "hand:2:1", heartbeat_s=0.2)
        t0 = time.monotonic()
        again = second.take_beating(15)
        assert again is not None and again["name"] == "frame_00001.mrc"
        assert time.monotonic() - t0 < 10  # 5 × 0.2 s of silence, checked every 0.5 s
        second.answer(again)
        assert daemon.wait_idle(20, frames=1)
    finally:
        daemon.stop()
        killed.close()
        if second is not None:
            second.close()
    assert [(r["frame"], r["status"], r["particles"]) for r in rows(out / "frames.csv")] == [
        ("frame_00001", "ok", "2")]


def test_a_slow_worker_that_keeps_beating_is_not_taken_for_dead(dirs, monkeypatch, caplog):
    # The heartbeats come from their own thread, so a frame that takes many heartbeat
    # intervals to analyse keeps its worker alive: analysed once, never sent again.
    import logging

    monkeypatch.setenv("PW_FAKE_DELAY_S", "2.0")
    folder, out = dirs
    encode_frame(folder / "frame_00001.mrc", [10.0, 11.0])
    caplog.set_level(logging.WARNING, logger="particlewatch")
    daemon = Daemon(folder, out, **{**FAST, "workers": 1, "task_timeout_s": 600.0,
                                    "heartbeat_liveness": 3, "worker_heartbeat_s": 0.2}).start()
    try:
        assert daemon.wait_idle(30, frames=1)
    finally:
        daemon.stop()
    assert not [r for r in caplog.records if "taken for dead" in r.getMessage()]
    assert [(r["frame"], r["status"], r["particles"]) for r in rows(out / "frames.csv")] == [
        ("frame_00001", "ok", "2")]
