"""README's two quickstart commands are what users and CI run: keep them true."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(path):
    with open(os.path.join(ROOT, path)) as fh:
        return fh.read()


def test_ci_runs_exactly_the_readme_test_command():
    readme, ci = _read("README.md"), _read(".ci/run")
    test_cmd = re.search(r"&& (python -m pytest[^\n]*)", readme).group(1).strip()
    ci_cmds = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert ci_cmds == [test_cmd]
    assert "pip install --quiet torch==2.13.0" in ci and '-e ".[dev]"' in ci


def test_quickstart_script_exists_and_is_referenced():
    readme = _read("README.md")
    script = re.search(r"bash (examples/\S+\.sh)", readme).group(1)
    assert os.path.exists(os.path.join(ROOT, script))
