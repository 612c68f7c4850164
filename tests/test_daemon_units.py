"""Unit tests of the daemon's parts: completeness checks, message validation, the ledger."""

import json
from pathlib import Path

import numpy as np
import pytest

from particlewatch.daemon import messages
from particlewatch.daemon.ledger import Ledger, LedgerError
from particlewatch.daemon.watcher import (Arrivals, check_complete, classify_name,
                                          mrc_expected_size)
from particlewatch.frames import write_frame


def _frame(tmp_path, name="frame_00001.mrc", shape=(40, 56), dtype=np.uint16):
    image = np.arange(np.prod(shape), dtype=dtype).reshape(shape) % 1000
    return write_frame(tmp_path / name, image, pixel_nm=0.5, section={"Defocus": -1})


def test_mrc_expected_size_matches_files_mrcfile_writes(tmp_path):
    for shape, dtype, bytes_per in (((40, 56), np.uint16, 2), ((33, 17), np.float32, 4)):
        path = _frame(tmp_path, f"f_{bytes_per}.mrc", shape, dtype)
        header = path.read_bytes()[:1024]
        assert mrc_expected_size(header) == path.stat().st_size
        assert path.stat().st_size >= 1024 + shape[0] * shape[1] * bytes_per


def test_check_complete_sees_truncation_bad_header_and_missing_mdoc_section(tmp_path):
    path = _frame(tmp_path)
    data = path.read_bytes()
    assert check_complete(path, len(data)).state == "complete"
    path.write_bytes(data[:-10])
    check = check_complete(path, len(data) - 10)
    assert check.state == "waiting" and "truncated" in check.reason
    path.write_bytes(data + b"xx")
    assert check_complete(path, len(data) + 2).state == "invalid"
    path.write_bytes(b"\x07" * len(data))  # garbage header of the right size
    assert check_complete(path, len(data)).state == "invalid"
    path.write_bytes(data)
    mdoc = Path(str(path) + ".mdoc")
    mdoc.write_text("PixelSpacing = 5\n")  # the writer has not added its section yet
    check = check_complete(path, len(data))
    assert check.state == "waiting" and "ZValue" in check.reason
    empty = tmp_path / "empty.mrc"
    empty.write_bytes(b"")
    assert check_complete(empty, 0).state == "waiting"


def test_classify_name():
    assert classify_name("a/frame_00001.mrc") == "frame"
    assert classify_name("x.TIF") == "frame"
    assert classify_name(".frame_00001.mrc.part") == "ignore"
    assert classify_name("frame_00001.mrc.mdoc") == "ignore"
    assert classify_name("picture.png") == "unsupported"


def test_arrivals_wait_for_two_equal_looks_and_give_up_on_a_stalled_file(tmp_path):
    path = _frame(tmp_path)
    arrivals = Arrivals(settle_s=0.5, stall_timeout_s=10)
    arrivals.nominate(path, 0.0)
    assert arrivals.look(0.0) == []  # first look: nothing to compare with
    assert arrivals.look(0.2) == []  # not due yet
    (done,) = arrivals.look(0.6)
    assert done.path == path and done.reason == ""
    stalled = tmp_path / "frame_00002.mrc"
    stalled.write_bytes(path.read_bytes()[:2000])
    arrivals.nominate(stalled, 0.0)
    for t in (0.0, 0.6, 1.6, 5.0):
        assert arrivals.look(t) == []
    (given_up,) = arrivals.look(10.5)
    assert "truncated" in given_up.reason and "incomplete after" in given_up.reason


@pytest.mark.parametrize("payload, fragment", [
    (b"not json{", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"schema_version": 2, "type": "status"}).encode(), "schema_version"),
    (json.dumps({"schema_version": True, "type": "status"}).encode(), "schema_version"),
    (json.dumps({"schema_version": 1}).encode(), "type"),
    (b"x" * (messages.MAX_CONTROL_BYTES + 1), "exceeds"),
    (b"\xff\xfe", "not JSON"),
])
def test_decode_rejects_bad_envelopes(payload, fragment):
    with pytest.raises(messages.MessageError, match=fragment):
        messages.decode(payload, max_bytes=messages.MAX_CONTROL_BYTES)


def test_validate_control_paths_must_stay_inside_the_folder(tmp_path):
    inside = tmp_path / "frames"
    inside.mkdir()
    (tmp_path / "secret.mrc").write_bytes(b"x")
    (inside / "link.mrc").symlink_to(tmp_path / "secret.mrc")
    ok = messages.validate_control({"type": "analyze", "path": "a.mrc"}, folder=inside)
    assert ok["path"] == inside.resolve() / "a.mrc"
    for bad in ("../secret.mrc", str(tmp_path / "secret.mrc"), "link.mrc", "", "a\x00b"):
        with pytest.raises(messages.MessageError):
            messages.validate_control({"type": "analyze", "path": bad}, folder=inside)
    for bad in ({"type": "analyze", "path": 3}, {"type": "analyze"},
                {"type": "status", "extra": 1}, {"type": "format-disk"}):
        with pytest.raises(messages.MessageError):
            messages.validate_control(bad, folder=inside)


def test_validate_worker_result_checks_columns():
    good = {"type": "result", "task_id": "1", "worker": "w", "name": "a.mrc", "sha256": "ab",
            "result": {"status": "ok", "reason": None,
                       "particles": {"ecd_nm": [1.0, 2.0], "separated": [True, False]}}}
    assert messages.validate_worker_message(good)["name"] == "a.mrc"
    for change in ({"name": "../a.mrc"}, {"result": {"status": "maybe"}},
                   {"result": {"status": "ok", "particles": {"a": [1], "b": [1, 2]}}},
                   {"result": {"status": "ok", "particles": {"a": ["x"]}}},
                   {"task_id": 5}):
        with pytest.raises(messages.MessageError):
            messages.validate_worker_message({**good, **change})


def test_encode_refuses_nothing_json_cannot_carry():
    raw = messages.encode({"type": "stats", "x": np.float32(1.5), "nan": float("nan"),
                           "arr": np.arange(3)})
    assert json.loads(raw) == {"schema_version": 1, "type": "stats", "x": 1.5, "nan": None,
                               "arr": [0, 1, 2]}


def test_ledger_exactly_once_and_modification(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    ledger = Ledger(tmp_path / "l.sqlite", folder=folder)
    assert ledger.admit("a.mrc", size=10, mtime_ns=1, sha256="h1") == "new"
    assert ledger.admit("a.mrc", size=10, mtime_ns=2, sha256="h1") == "same"
    (entry,) = ledger.pending(10)
    ledger.mark_running("a.mrc", task_id="t1")
    assert ledger.finish("a.mrc", sha256="h1", status="ok", reason=None,
                         result={"frame": "a"}) == 1
    # a second result for the same frame (a re-sent task) is ignored
    assert ledger.finish("a.mrc", sha256="h1", status="ok", reason=None, result={}) is None
    assert ledger.admit("a.mrc", size=11, mtime_ns=3, sha256="h2") == "modified"
    # the old content's late result is stale
    assert ledger.finish("a.mrc", sha256="h1", status="ok", reason=None, result={}) is None
    assert ledger.finish("a.mrc", sha256="h2", status="ok", reason=None,
                         result={"frame": "a2"}) == 2
    assert [e.result["frame"] for e in ledger.done()] == ["a2"]
    ledger.close()
    # a restart: the same file, same state; running frames become pending again
    ledger = Ledger(tmp_path / "l.sqlite", folder=folder)
    assert ledger.counts()["ok"] == 1
    ledger.admit("b.mrc", size=1, mtime_ns=1, sha256="h3")
    ledger.mark_running("b.mrc", task_id="t")
    ledger.close()
    ledger = Ledger(tmp_path / "l.sqlite", folder=folder)
    assert ledger.requeue_all_running() == 1
    assert [e.name for e in ledger.pending(5)] == ["b.mrc"]
    assert ledger.pending(5)[0].attempts == 0  # the daemon stopped, not the frame
    ledger.close()
    with pytest.raises(LedgerError, match="belongs to folder"):
        Ledger(tmp_path / "l.sqlite", folder=tmp_path)


def test_a_result_too_large_to_send_goes_as_a_failed_result_naming_the_frame(monkeypatch):
    from particlewatch.daemon.worker import result_payload

    task = {"task_id": "7.1.ab", "name": "frame_00001.mrc", "path": "/data/frame_00001.mrc",
            "sha256": "0" * 64}
    result = {"frame": "frame_00001", "path": task["path"], "status": "ok", "reason": None,
              "seconds": 1.5, "particles": {"ecd_nm": [10.0] * 200}}
    sent = messages.validate_worker_message(
        messages.decode(result_payload(task, "w", result), max_bytes=1 << 20))
    assert sent["result"]["status"] == "ok"  # small enough: sent as it is
    monkeypatch.setattr(messages, "MAX_RESULT_BYTES", 1000)
    payload = result_payload(task, "w", result)
    assert len(payload) <= 1000
    sent = messages.validate_worker_message(messages.decode(payload, max_bytes=1000))
    assert (sent["task_id"], sent["sha256"]) == (task["task_id"], task["sha256"])
    assert sent["result"]["status"] == "failed" and sent["result"]["seconds"] == 1.5
    assert sent["result"]["reason"].startswith("/data/frame_00001.mrc: result of ")


def test_heartbeat_messages_are_checked():
    from particlewatch.daemon.messages import MessageError, validate_worker_message

    ok = validate_worker_message({"type": "heartbeat", "worker": "h:1:1", "heartbeat_s": 1})
    assert ok == {"type": "heartbeat", "worker": "h:1:1", "heartbeat_s": 1.0}
    assert validate_worker_message({"type": "hello", "worker": "h:1:1"}) == {
        "type": "hello", "worker": "h:1:1"}  # a worker that promises none
    for bad in (0, -1.0, float("inf"), float("nan"), 1e9, True, "1"):
        with pytest.raises(MessageError):
            validate_worker_message({"type": "hello", "worker": "h:1:1", "heartbeat_s": bad})
    with pytest.raises(MessageError):  # a bye promises nothing
        validate_worker_message({"type": "bye", "worker": "h:1:1", "heartbeat_s": 1.0})
