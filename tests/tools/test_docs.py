"""Every command shown in the documentation (```bash blocks of docs/*.md and README.md) is exercised:
  pretrain_gpt.py / python -m megaflow / torchrun   run with --dry-run at the launch's world size
                                                    (tests/launchers.py), so the configuration is valid
  python SCRIPT.py / python -m MODULE               every flag must be listed by its --help
  python -m pytest PATHS                            the paths exist
  bash examples/X, sbatch examples/X                run by tests/tools/test_examples.py
  pip install                                       only this project, its extras (setup.py), the CPU torch
  curl http://.../v1/...                            an endpoint tests/e2e/test_vllm_serving.py calls
                                                    (itself or through tests/hf_helpers.py)
Anything else fails here: add a rule (and a way to check it) before documenting a new kind of command.
Placeholders (CKPT_DIR, [--optional N]) are fine where the command is not run."""
import os
import re
import shlex
import subprocess
import pytest

from tests.launch import ROOT
from tests.launchers import dry_run_path
from tests.tools.test_examples import COVERED

DOCS = sorted(f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")) + ["README.md"]


def _unbracket(token):
    """`[--iteration` / `N]` (optional parts in usage lines) lose their brackets; `.[dev]` keeps them."""
    token = token[1:] if token.startswith("[") else token
    return token[:-1] if token.endswith("]") and "[" not in token else token


def commands(path):
    text = open(os.path.join(ROOT, path)).read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"\s&&\s", line):
                tokens = [_unbracket(t) for t in shlex.split(part, comments=True)]
                tokens = [t for t in tokens if t]
                if tokens:
                    yield tokens


ALL = [(path, tokens) for path in DOCS for tokens in commands(path)]


def test_the_docs_show_commands():
    assert len(ALL) >= 30 and all(any(p == path for p, _ in ALL) for path in
                                  ("docs/quickstart.md", "docs/launching.md", "docs/planning.md",
                                   "docs/troubleshooting.md", "docs/migrating.md"))


def _env_and_argv(tokens):
    env = {}
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        key, _, value = tokens[0].partition("=")
        env[key] = value
        tokens = tokens[1:]
    return env, tokens


def _pip(argv):
    setup = open(os.path.join(ROOT, "setup.py")).read()
    extras = set(re.findall(r'"([a-z]+)": \[', setup[setup.index("extras_require"):]))
    specs = [a for a in argv[2:] if not a.startswith("-") or a == "-e"]
    for spec in specs:
        if spec == "-e":
            continue
        m = re.fullmatch(r"\.(?:\[([a-z,]+)\])?", spec)
        assert spec == "torch==2.13.0" or (m and set(filter(None, (m.group(1) or "").split(","))) <= extras), spec


@pytest.fixture(scope="module")
def help_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("help"))


@pytest.mark.parametrize("path,tokens", ALL, ids=[f"{p}:{' '.join(t)[:60]}" for p, t in ALL])
def test_documented_command(tmp_path, help_cache, path, tokens):
    env, argv = _env_and_argv(tokens)
    tool = argv[0]
    if tool == "pip":
        return _pip(argv)
    if tool in ("bash", "sbatch"):
        script = next(a for a in argv[1:] if not a.startswith("-"))
        assert script.startswith("examples/") and os.path.basename(script) in COVERED, script
        return
    if tool == "curl":
        url = next(a for a in argv[1:] if "/v1/" in a)
        endpoint = url[url.index("/v1/"):]
        called = "".join(open(os.path.join(ROOT, f)).read() for f in ("tests/e2e/test_vllm_serving.py",
                                                                       "tests/hf_helpers.py"))
        assert endpoint in called, endpoint
        return
    assert tool in ("python", "torchrun"), f"{path}: no rule to check `{' '.join(tokens)}`"
    bin_dir = dry_run_path(tmp_path)
    extra = "" if "--vocab-size" in argv else "--vocab-size 32000"  # tokenizer files are not here
    full_env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], DRY_RUN_EXTRA=extra,
                    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                    HELP_CACHE=help_cache)
    full_env.update(env)  # the command's own VAR=value prefixes (run from the repository's root)
    proc = subprocess.run([os.path.join(bin_dir, tool), *argv[1:]], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=240)
    assert proc.returncode == 0, f"{path}: `{' '.join(tokens)}` failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"


def _table_flags(path, heading):
    text = open(os.path.join(ROOT, path)).read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(--[a-z0-9-]+)`", section, re.M)


def test_migration_guide_lists_only_flags_megaflow_has_or_refuses():
    from megaflow.config import FIELDS, ConfigError, parse_args
    own = _table_flags("docs/migrating.md", "## megaflow's own flags")
    same_name = _table_flags("docs/migrating.md", "## Same name, different meaning")
    refused = _table_flags("docs/migrating.md", "## Megatron-LM flags megaflow does not accept")
    assert len(own) >= 10 and len(refused) >= 10 and len(same_name) >= 4
    assert [f for f in own + same_name if f not in FIELDS] == []
    for flag in refused:
        with pytest.raises(ConfigError, match="unknown flag"):
            parse_args([flag, "1"])
