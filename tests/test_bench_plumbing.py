"""Clean-up stack, QMP client against a fake server, alignfs stats parsing."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from alignfs.bench.cleanup import CleanupStack
from alignfs.bench.mount import STAT_KEYS, normalize_stats
from alignfs.bench.qmp import QmpClient, QmpError
from alignfs.bench.sysutil import process_cpu_seconds


def test_cleanup_stack_runs_newest_first_and_survives_failures() -> None:
    order: list[str] = []

    def fail() -> None:
        order.append("fail")
        raise OSError("busy")

    with pytest.raises(RuntimeError), CleanupStack("t") as stack:
        stack.push("a", lambda: order.append("a"))
        stack.push("fail", fail)
        token = stack.push("c", lambda: order.append("c"))
        stack.push("d", lambda: order.append("d"))
        stack.forget(token)
        raise RuntimeError("boom")
    assert order == ["d", "fail", "a"]
    assert stack.pending == []
    assert len(stack.errors) == 1 and "busy" in stack.errors[0]


def test_cleanup_run_single_step_once() -> None:
    calls: list[int] = []
    stack = CleanupStack()
    token = stack.push("x", lambda: calls.append(1))
    assert stack.run(token) and stack.run(token)
    assert calls == [1]


def fake_qmp_server(path: Path, replies: list[list[dict]]) -> threading.Thread:  # type: ignore[type-arg]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f = conn.makefile("rb")
            for batch in replies:
                if not f.readline():
                    return
                conn.sendall(b"".join(json.dumps(m).encode() + b"\r\n" for m in batch))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_qmp_client(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    thread = fake_qmp_server(
        sock,
        [
            [{"return": {}}],
            [{"event": "STOP", "timestamp": {}}, {"return": ""}],
            [{"error": {"class": "GenericError", "desc": "nope"}}],
        ],
    )
    with QmpClient(sock) as qmp:
        qmp.connect(timeout=5)
        assert qmp.hmp("savevm snap1", timeout=5) == ""
        assert [e["event"] for e in qmp.events] == ["STOP"]
        with pytest.raises(QmpError, match="GenericError: nope"):
            qmp.execute("quit", timeout=5)
    thread.join(5)


def test_qmp_connect_gives_up_when_qemu_died(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="exited"):
        QmpClient(tmp_path / "none.sock").connect(timeout=5, alive=lambda: False)


def test_normalize_stats_is_defensive() -> None:
    stats = normalize_stats({"write_requests": 5, "pid": 42, "new_counter": 1})
    assert stats["write_requests"] == 5 and stats["pid"] == 42 and stats["new_counter"] == 1
    assert all(key in stats for key in STAT_KEYS)
    assert stats["backing_writes"] is None
    assert normalize_stats(["not", "a", "dict"])["write_bytes"] is None


def test_process_cpu_seconds() -> None:
    import os

    assert (process_cpu_seconds(os.getpid()) or 0.0) >= 0.0
    assert process_cpu_seconds(2**22 + 12345) is None


def test_first_difference(tmp_path: Path) -> None:
    from alignfs.bench.scenarios import first_difference

    a, b = tmp_path / "a", tmp_path / "b"
    data = bytes(range(256)) * 1000
    a.write_bytes(data)
    b.write_bytes(data)
    assert first_difference(a, b, chunk=4096) is None
    b.write_bytes(data[:5000] + b"\xff" + data[5001:])
    assert first_difference(a, b, chunk=4096) == 5000
    b.write_bytes(data[:-1])
    assert first_difference(a, b, chunk=4096) == len(data) - 1
