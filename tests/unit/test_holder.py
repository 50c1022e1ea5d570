"""The holder (holder/holder.c, built by scripts/setup) and its client, on this host."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from activator.holder import Holder

HOLDER = Path(sys.prefix) / "bin" / "pod-activator-holder"

if not HOLDER.exists():  # pragma: no cover - a set-up problem, not a test
    pytest.skip("no holder binary: run scripts/setup", allow_module_level=True)


@asynccontextmanager
async def holding(
    tmp_path: Path, *app: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Holder, list[tuple[int, int]]]]:
    """A holder running `app`, and a client connected to it; the exits it reported."""
    exits: list[tuple[int, int]] = []
    proc = subprocess.Popen(
        [str(HOLDER), "--name", "app", "--control", str(tmp_path), "--", *app],
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    holder = Holder(tmp_path / "app.sock", lambda pid, status: exits.append((pid, status)))
    try:
        await holder.connect(10)
        yield proc, holder, exits
    finally:
        holder.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def until(check: Callable[[], object], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_unmanaged_it_exits_with_the_apps_status(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with holding(tmp_path, "sh", "-c", "sleep 0.3; exit 7") as (proc, _, _):
            await until(lambda: proc.poll() is not None)
            assert proc.returncode == 7

    asyncio.run(scenario())


def test_managed_it_outlives_the_app_reports_its_end_and_starts_it_again(tmp_path: Path) -> None:
    """What a checkpoint looks like to the holder: the app killed, the
    container's first process staying; then a cold start on request."""

    async def scenario() -> None:
        async with holding(tmp_path, "sleep", "30") as (proc, holder, exits):
            pid = await holder.manage()
            assert pid is not None and holder.pid == proc.pid
            os.kill(pid, signal.SIGKILL)
            await until(lambda: exits)
            assert exits == [(pid, signal.SIGKILL)]
            assert proc.poll() is None
            again = await holder.start()
            assert again != pid and Path(f"/proc/{again}").exists()

    asyncio.run(scenario())


def test_a_restored_app_is_adopted_even_when_it_ended_first(tmp_path: Path) -> None:
    """CRIU restores the app as the holder's child; the holder learns its pid
    from the sidecar, possibly after it ended: the end is reported then."""

    async def scenario() -> None:
        async with holding(tmp_path, "sleep", "30") as (_, holder, exits):
            first = await holder.manage()
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await until(lambda: exits)
            # A child of the holder that is not the app: what CRIU restores.
            child = await holder.execute(["sh", "-c", "exit 3"], [])
            await asyncio.sleep(0.3)  # it ends before we adopt it
            await holder.adopt(child)
            await until(lambda: len(exits) == 2)
            assert exits[1] == (child, 3 << 8)

    asyncio.run(scenario())


def write_to(*fds: int) -> list[str]:
    """A command writing its fd number to each of `fds` (sh's redirections
    stop at fd 9)."""
    code = "import os\n" + "".join(f"os.write({fd}, b'{fd}')\n" for fd in fds)
    return [sys.executable, "-c", code]


def test_exec_passes_fds_at_the_same_numbers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with holding(tmp_path, "sleep", "30") as (_, holder, _):
            await holder.manage()
            read_end, write_end = os.pipe()
            await holder.execute(write_to(write_end), [write_end])
            os.close(write_end)
            assert os.read(read_end, 100) == str(write_end).encode()
            os.close(read_end)

    asyncio.run(scenario())


def test_exec_places_fds_whose_numbers_collide(tmp_path: Path) -> None:
    """Two fds swapped: each lands at the number asked for."""

    async def scenario() -> None:
        async with holding(tmp_path, "sleep", "30") as (_, holder, _):
            await holder.manage()
            a_read, a_write = os.pipe()
            b_read, b_write = os.pipe()
            # a's write end goes to number b_write, b's to number a_write
            targets = f"{b_write},{a_write}"
            await holder.request("exec", targets, *write_to(b_write), fds=[a_write, b_write])
            os.close(a_write)
            os.close(b_write)
            assert os.read(a_read, 10) == str(b_write).encode()
            assert os.read(b_read, 10) == b""  # nothing was written to number a_write
            os.close(a_read)
            os.close(b_read)

    asyncio.run(scenario())


def test_the_stop_signal_goes_to_the_app_and_its_status_out(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with holding(tmp_path, "sleep", "30") as (proc, holder, _):
            await holder.manage()
            proc.send_signal(signal.SIGTERM)
            await until(lambda: proc.poll() is not None)
            assert proc.returncode == 128 + signal.SIGTERM

    asyncio.run(scenario())


def test_the_apps_output_is_relayed_through_its_fifo(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with holding(tmp_path, "sh", "-c", "echo hello; sleep 30") as (proc, holder, _):
            assert (tmp_path / "app.out").is_fifo()
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line == b"hello\n"
            assert os.readlink(f"/proc/{await holder.manage()}/fd/1").endswith("app.out")

    asyncio.run(scenario())


# linux/capability.h
CAP_KILL, CAP_SETPCAP, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 5, 8, 19, 21


def capabilities(pid: int) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of a process, as bit sets."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(value, 16)
        for key, value in (line.split(":\t") for line in status.splitlines())
        if key.startswith("Cap")
    }


def running(pid: int, *argv: str) -> Callable[[], bool]:
    """Whether pid execs argv now (after the fork, before the exec, it is still the holder)."""
    return lambda: (
        Path(f"/proc/{pid}/cmdline").read_bytes() == b"".join(a.encode() + b"\0" for a in argv)
    )


def test_the_app_starts_without_the_capabilities_named_and_criu_keeps_them(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """POD_ACTIVATOR_APP_DROP_CAPS: gone from every set of the app, at its
    first start and at a cold start; kept by the holder and what it execs
    for the sidecar (CRIU). An unknown name is logged, the rest still dropped."""
    gone = 1 << CAP_SETPCAP | 1 << CAP_SYS_PTRACE | 1 << CAP_SYS_ADMIN
    if capabilities(os.getpid())["CapEff"] & gone != gone:
        pytest.skip("needs CAP_SETPCAP, CAP_SYS_PTRACE and CAP_SYS_ADMIN (root)")
    env = {"POD_ACTIVATOR_APP_DROP_CAPS": "SYS_PTRACE,cap_sys_admin,NO_SUCH_CAP,SETPCAP"}

    def assert_dropped(app: int) -> None:
        app_caps = capabilities(app)
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert app_caps[key] & gone == 0, key
        assert app_caps["CapEff"] & 1 << CAP_KILL  # the others stay
        assert b"POD_ACTIVATOR_APP_DROP_CAPS" not in Path(f"/proc/{app}/environ").read_bytes()

    async def scenario() -> None:
        async with holding(tmp_path, "sleep", "30", env=env) as (proc, holder, exits):
            first = await holder.manage()  # started while unmanaged, as a plain init
            assert first is not None
            await until(running(first, "sleep", "30"))
            assert_dropped(first)
            assert capabilities(proc.pid)["CapEff"] & gone == gone
            criu = await holder.execute(["sleep", "31"], [])
            try:
                await until(running(criu, "sleep", "31"))
                assert capabilities(criu)["CapEff"] & gone == gone
                assert capabilities(criu)["CapBnd"] & gone == gone
            finally:
                os.kill(criu, signal.SIGKILL)
            os.kill(first, signal.SIGKILL)
            await until(lambda: exits)
            again = await holder.start()  # a cold start, as after a failed restore
            assert again is not None
            try:
                await until(running(again, "sleep", "30"))
                assert_dropped(again)
            finally:
                os.kill(again, signal.SIGKILL)

    asyncio.run(scenario())
    assert "unknown capability NO_SUCH_CAP" in capfd.readouterr().err
