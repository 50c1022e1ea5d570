"""activator.criu's side of the swrk RPC and its spare `criu swrk`, against a
fake swrk: a thread on the other end of the socket that answers as CRIU would,
with a `sleep` process standing for CRIU's pid (the journal's, the timeout's)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from activator import criu as criu_module
from activator.criu import Criu, CriuError, CriuOptions, Externals, rpc

Answer = Callable[[Any], bytes]  # the request -> the bytes CRIU sends back


class FakeLauncher:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.started: list[tuple[int, tuple[int, ...]]] = []  # (pid, fds passed)
        self.requests: list[Any] = []
        self.ended: list[int] = []
        self.statuses: list[int] = []  # CRIU's (sleep's) return codes

    @contextmanager
    def _swrk(self, pass_fds: tuple[int, ...]) -> Iterator[tuple[socket.socket, int]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        criu = subprocess.Popen(["sleep", "60"])
        self.started.append((criu.pid, pass_fds))
        serving = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        serving.start()
        try:
            yield ours, criu.pid
        finally:
            ours.close()
            serving.join()
            self.ended.append(criu.pid)
            criu.terminate()  # SIGTERM: a SIGKILL was the timeout's
            self.statuses.append(criu.wait())

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            data = sock.recv(1 << 16)
            if not data:
                return  # closed unused (a spare that was not taken)
            request = rpc.criu_req()
            request.ParseFromString(data)
            self.requests.append(request)
            if answer := self.answer(request):  # else CRIU died: EOF
                sock.send(answer)
                sock.recv(1)  # until the client closes

    def swrk(self, pass_fds: tuple[int, ...]) -> AbstractContextManager[tuple[socket.socket, int]]:
        return self._swrk(pass_fds)

    def path(self, ours: Path) -> str:
        return str(ours)

    def credentials(self) -> int:
        return os.getpid()

    def reap(self, wait: bool = False) -> None:
        pass  # each fake CRIU is waited for when its call ends


def restored(pid: int) -> Answer:
    def answer(request: Any) -> bytes:
        response = rpc.criu_resp(type=request.type, success=True)
        response.restore.pid = pid
        return bytes(response.SerializeToString())

    return answer


@pytest.fixture
def pipe() -> Iterator[int]:
    """The write end of a pipe, as the pod's output."""
    r, w = os.pipe()
    yield w
    os.close(r)
    os.close(w)


@pytest.fixture
def ext(pipe: int) -> Externals:
    ns = Path(f"/proc/{os.getpid()}/ns")
    return Externals({"net": ns / "net", "pid": ns / "pid"}, output=pipe)


def test_a_restore_is_one_request_and_its_answer_names_the_app(
    tmp_path: Path, ext: Externals
) -> None:
    launcher = FakeLauncher(restored(4242))
    started: list[int] = []
    criu = Criu(Path("criu"), launcher=launcher)
    pid = asyncio.run(criu.restore(tmp_path, ext, on_start=started.append))
    assert pid == 4242
    assert started == [launcher.started[0][0]]  # the journal learns CRIU's pid
    (request,) = launcher.requests
    assert request.type == rpc.RESTORE
    assert request.opts.images_dir == str(tmp_path)
    assert request.opts.rst_sibling
    # The namespaces CRIU inherits are the fds it was given, at their numbers.
    given = {fd.key: fd.fd for fd in request.opts.inherit_fd}
    assert set(given) == {"pod-net", "pod-pid"}
    assert sorted(given.values()) == sorted(launcher.started[0][1][:2])


def test_a_restore_after_our_dump_knows_its_output_pipes_without_reading_the_record(
    tmp_path: Path, ext: Externals, pipe: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = FakeLauncher(restored(7))
    criu = Criu(Path("criu"), launcher=launcher)
    app = subprocess.Popen(["sleep", "60"], stdout=pipe)
    try:
        criu.dump(app.pid, tmp_path / "images.new", ext)
    finally:
        app.kill()
        app.wait()
    (tmp_path / "images.new").rename(tmp_path / "images")  # as the pod keeps an image

    def unread(images: Path) -> list[str]:
        raise AssertionError(f"{images}: the record was read")

    monkeypatch.setattr(criu_module, "recorded_output_pipes", unread)
    asyncio.run(criu.restore(tmp_path / "images", ext))
    keys = {fd.key for fd in launcher.requests[-1].opts.inherit_fd}
    assert f"pipe:[{os.fstat(pipe).st_ino}]" in keys
    # Another record there (a sealed image's, unsealed anew): it is read.
    monkeypatch.undo()
    (tmp_path / "images" / "output-pipes.json").write_text('["pipe:[1]"]')
    asyncio.run(criu.restore(tmp_path / "images", ext))
    keys = {fd.key for fd in launcher.requests[-1].opts.inherit_fd}
    assert "pipe:[1]" in keys and f"pipe:[{os.fstat(pipe).st_ino}]" not in keys


def test_a_failed_call_says_what_criu_said(tmp_path: Path, ext: Externals) -> None:
    def refuse(request: Any) -> bytes:
        response = rpc.criu_resp(type=request.type, success=False, cr_errno=3)
        return bytes(response.SerializeToString())

    (tmp_path / "restore.log").write_text("(00.01) Error (criu/cr-restore.c:1): no such task\n")
    with pytest.raises(CriuError, match=r"(?s)criu restore failed: No such process.*no such task"):
        asyncio.run(Criu(Path("criu"), launcher=FakeLauncher(refuse)).restore(tmp_path, ext))


def test_a_criu_that_ends_without_answering_is_a_failure(tmp_path: Path, ext: Externals) -> None:
    with pytest.raises(CriuError, match="ended without an answer"):
        criu = Criu(Path("criu"), launcher=FakeLauncher(lambda request: b""))
        asyncio.run(criu.restore(tmp_path, ext))


@pytest.mark.parametrize("call", ["restore", "dump"])  # from the loop, from a thread
def test_a_criu_that_hangs_is_ended_after_the_timeout(
    tmp_path: Path, ext: Externals, call: str
) -> None:
    launcher = FakeLauncher(lambda request: b"")

    def hang(sock: socket.socket) -> None:
        with sock:
            sock.recv(1 << 16)
            sock.recv(1)

    launcher._serve = hang  # type: ignore[method-assign]
    criu = Criu(Path("criu"), CriuOptions(timeout=0.2), launcher)
    with pytest.raises(CriuError, match=r"did not finish within 0\.2 s and was ended"):
        if call == "restore":
            asyncio.run(criu.restore(tmp_path, ext))
        else:
            criu.dump(os.getpid(), tmp_path / "images", ext)
    assert launcher.statuses == [-9]  # killed by the timeout, not the fake's SIGTERM


def test_ahead_the_restore_after_a_dump_gets_the_swrk_started_for_it(
    tmp_path: Path, ext: Externals
) -> None:
    asyncio.run(_restore_after_a_dump(tmp_path, ext))


async def _restore_after_a_dump(tmp_path: Path, ext: Externals) -> None:
    launcher = FakeLauncher(restored(7))
    criu = Criu(Path("criu"), CriuOptions(spares=1), launcher).ahead()
    try:
        criu._spare.prepare(ext)  # type: ignore[union-attr]  # as a dump does at its end
        while not launcher.started:
            await asyncio.sleep(0.01)
        while criu._spare._swrk is None:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
        spare_pid = launcher.started[0][0]
        started: list[int] = []
        assert await criu.restore(tmp_path, ext, started.append) == 7
        assert started == [spare_pid]  # the spare served it: no new swrk on the wake's path
        given = {fd.key: fd.fd for fd in launcher.requests[0].opts.inherit_fd}
        assert sorted(given.values()) == sorted(launcher.started[0][1][:2])
    finally:
        criu.close()


def test_ahead_a_spare_for_another_output_pipe_is_ended_not_used(
    tmp_path: Path, ext: Externals
) -> None:
    asyncio.run(_spare_for_another_pipe(tmp_path, ext))


async def _spare_for_another_pipe(tmp_path: Path, ext: Externals) -> None:
    launcher = FakeLauncher(restored(7))
    criu = Criu(Path("criu"), CriuOptions(spares=1), launcher).ahead()
    try:
        criu._spare.prepare(ext)  # type: ignore[union-attr]
        while criu._spare._swrk is None:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
        r, other_output = os.pipe()  # the pod's output pipe is another one now
        other = Externals(ext.namespaces, output=other_output)
        started: list[int] = []
        await criu.restore(tmp_path, other, started.append)
        spare_pid = launcher.started[0][0]
        assert spare_pid in launcher.ended
        assert started == [launcher.started[1][0]] and started[0] != spare_pid
        assert other_output in launcher.started[1][1]
        os.close(r)
        os.close(other_output)
    finally:
        criu.close()


def test_ahead_close_ends_the_spare() -> None:
    asyncio.run(_close_ends_the_spare())


async def _close_ends_the_spare() -> None:
    launcher = FakeLauncher(restored(7))
    criu = Criu(Path("criu"), CriuOptions(spares=1), launcher).ahead()
    criu._spare.prepare(None)  # type: ignore[union-attr]
    while criu._spare._swrk is None:  # type: ignore[union-attr]
        await asyncio.sleep(0.01)
    criu.close()
    assert launcher.ended == [launcher.started[0][0]]


async def _held_spares(
    limit: int, pods: int, one_by_one: bool
) -> tuple[FakeLauncher, list[Criu], list[bool]]:
    """`pods` pods of one node with `limit` spares each ask for a spare, one
    after the other (each once the last has its own) or all at once, as
    many pods scaled down at the same moment; which pods hold one then."""
    launcher = FakeLauncher(restored(7))
    node = Criu(Path("criu"), CriuOptions(spares=limit), launcher)
    criu = [node.ahead() for _ in range(pods)]
    for pod in criu:
        pod._spare.prepare(None)  # type: ignore[union-attr]
        while one_by_one and pod._spare._swrk is None:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
    while sum(pod._spare._swrk is not None for pod in criu) < limit:  # type: ignore[union-attr]
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # any start still under way ends
    return launcher, criu, [pod._spare._swrk is not None for pod in criu]  # type: ignore[union-attr]


def test_ahead_beyond_the_limit_the_spare_held_longest_is_ended() -> None:
    asyncio.run(_spares_beyond_the_limit())


async def _spares_beyond_the_limit() -> None:
    launcher, pods, held = await _held_spares(limit=2, pods=3, one_by_one=True)
    try:
        assert held == [False, True, True]
        assert launcher.ended == [launcher.started[0][0]]  # ended, not left idle
        started: list[int] = []
        await pods[0].restore(Path("/nonexistent"), Externals({}), started.append)
        assert started == [launcher.started[3][0]]  # the first pod starts its own again
    finally:
        for pod in pods:
            pod.close()


def test_ahead_a_burst_of_calls_leaves_the_last_spares_and_ends_the_others() -> None:
    asyncio.run(_burst_of_calls())


async def _burst_of_calls() -> None:
    launcher, pods, held = await _held_spares(limit=2, pods=6, one_by_one=False)
    try:
        assert held == [False] * 4 + [True] * 2
        idle = {pid for pid, _ in launcher.started} - set(launcher.ended)
        assert idle == {pod._spare._swrk.pid for pod in pods[-2:]}  # type: ignore[union-attr]
    finally:
        for pod in pods:
            pod.close()
