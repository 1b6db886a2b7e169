"""tests/parity/conftest.py's rule, on a throwaway test directory run by a real pytest: under CI=true a
parity test that skips (a missing reference at import, or a skip inside the test) fails; elsewhere it skips."""

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def run_pytest(directory: Path, ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", "-rfE", "."],
                          capture_output=True, text=True, env=env, cwd=directory, timeout=120)


def test_a_skipping_parity_test_fails_in_ci_only(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('parity_conftest', {str(CONFTEST)!r})\n"
        "rules = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(rules)\n"
        "pytest_make_collect_report = rules.pytest_make_collect_report\n"
        "pytest_runtest_makereport = rules.pytest_runtest_makereport\n")
    (tmp_path / "test_missing_reference.py").write_text(
        "import pytest\nreference = pytest.importorskip('no_such_reference_package')\n\n"
        "def test_against_it():\n    pass\n")
    (tmp_path / "test_skips_inside.py").write_text(
        "import pytest\n\ndef test_skips():\n    pytest.skip('no reference')\n\ndef test_runs():\n    pass\n")

    out = run_pytest(tmp_path, ci="")
    assert out.returncode == 0 and "1 passed, 2 skipped" in out.stdout, out.stdout

    out = run_pytest(tmp_path, ci="true")
    assert out.returncode != 0 and "1 failed, 1 passed, 1 error" in out.stdout, out.stdout
    assert ("ERROR test_missing_reference.py - a parity test skipped in CI (Skipped: could not import "
            "'no_such_reference_package'") in out.stdout, out.stdout
    assert ("FAILED test_skips_inside.py::test_skips - a parity test skipped in CI (Skipped: no reference)"
            in out.stdout), out.stdout
