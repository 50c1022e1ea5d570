"""The command line: bad flags fail with one line naming the flag, exit 2, create nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from activator.cli import _pod_settings, build_parser, main
from activator.config import pod_config


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


def test_annotations_fill_in_what_no_flag_gives(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    path.write_text(
        'zeropod.ctrox.dev/ports-map="web=8080,8443"\n'
        'zeropod.ctrox.dev/scaledown-duration="10s"\n'
        'zeropod.ctrox.dev/disable-probe-detection="true"\n'
    )
    args = build_parser().parse_args(["run", "--annotations", str(path), "--scaledown-after", "1m"])
    config = pod_config(**_pod_settings(args, ["app"]))
    assert config.ports == (8080, 8443)
    assert config.scaledown_after == 60.0  # the flag wins
    assert not config.probe_detection


def test_bad_annotations_file_names_the_annotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "annotations"
    path.write_text('zeropod.ctrox.dev/ports-map="web=http"\n')
    assert main(["run", "--annotations", str(path), "--", "app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zeropod.ctrox.dev/ports-map" in err
    assert main(["run", "--annotations", str(tmp_path / "missing"), "--", "app"]) == 2
    assert "--annotations: cannot read" in capsys.readouterr().err
