"""The command line: bad flags fail with one line naming the flag, exit 2, create nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from activator.cli import main


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run", "--port", "http", "--", "true"], "--port"),
        (["run", "--port", "99999", "--", "true"], "--port"),
        (["run", "--port", "80", "--scaledown-after=-5s", "--", "true"], "--scaledown-after"),
        (["run", "--port", "80", "--scaledown-after", "soon", "--", "true"], "--scaledown-after"),
        (["run", "--port", "80"], "COMMAND"),
        (["run", "--", "true"], "--port"),
        (["run", "--name", "Not Valid", "--port", "80", "--", "true"], "--name"),
        (["run", "--bogus", "--port", "80", "--", "true"], "--bogus"),
        (["status", "--", "true"], "status"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag_and_exit_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert named in err


def test_bad_flags_through_the_installed_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "activator", "run", "--port", "0", "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("activator: error: --port: '0' is not a TCP port")
