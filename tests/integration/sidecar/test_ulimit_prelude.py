"""The control-group entry script sets the run's rlimits itself (``limits.ulimit_script``) instead
of exec'ing ``prlimit``: the user process must end up with exactly the limits prlimit gives."""

from __future__ import annotations

import subprocess

import pytest

from sidecar import limits
from sidecar.cgroups import SH

pytestmark = pytest.mark.integration

CASES = [
    limits.Limits(cpu_seconds=31, address_space_mb=1536, nproc=64, file_size_mb=10, open_files=256),
    limits.Limits(cpu_seconds=2, address_space_mb=512, nproc=1024 + 16, file_size_mb=100),
    limits.Limits(open_files=64),
]


def _limits_seen(argv: list[str]) -> str:
    return subprocess.run(argv + ["cat", "/proc/self/limits"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("wanted", CASES)
def test_the_entry_script_sets_exactly_what_prlimit_sets(wanted: limits.Limits) -> None:
    script = limits.ulimit_script(wanted)
    if script is None or not limits.PRLIMIT:
        pytest.skip("sh is not dash here, or no prlimit to compare with")
    by_shell = _limits_seen([SH, "-c", script + 'exec "$@"', "kcr"])
    by_prlimit = _limits_seen(limits._prlimit_argv(wanted))
    assert by_shell == by_prlimit
    assert "Max file size" in by_shell  # the comparison did read the table
