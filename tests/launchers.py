"""Stand-in launchers for checking recipes and documented commands without GPUs or a cluster.

`dry_run_path(tmp)` writes `torchrun`, `srun`, `scontrol` and `python` executables into tmp/bin; put that
directory first on PATH and run a recipe unchanged:
  torchrun   reads its own options like torchrun (--nnodes, --nproc-per-node, --standalone, rendezvous
             and master options), requires rendezvous settings for multi-node launches, and runs the
             script once as `python SCRIPT ARGS --dry-run --world-size NNODES×NPROC` (one process plays
             every rank: megaflow's --dry-run builds all stages on the meta device)
  srun       drops its options and runs the command (the job's environment comes from the test)
  scontrol   `scontrol show hostnames LIST` prints LIST's first host
  python     `python pretrain_gpt.py ...` and `python -m megaflow ...` get --dry-run; `python -m pytest
             PATHS` checks the paths exist; any other `python SCRIPT.py ...` or `python -m MODULE ...` is
             not run: every flag it uses must be one its --help lists; anything else is refused
Each launch is appended to tmp/launches.log; $HELP_CACHE (a directory) keeps each tool's --help text. $DRY_RUN_EXTRA (e.g. "--vocab-size 128256": tokenizer files
are not here) is added to every dry run.
"""
import os
import sys

SHIM = r'''#!{python}
import os, re, shlex, subprocess, sys
ROLE = {role!r}
REAL = {python!r}
LOG = {log!r}
extra = shlex.split(os.environ.get("DRY_RUN_EXTRA", ""))


def log(line):
    with open(LOG, "a") as fh:
        fh.write(line + "\n")


def dry_run(script, args, world):
    log(f"dry-run world={{world}} {{script}} {{' '.join(args)}}")
    added = [] if "--dry-run" in args else ["--dry-run", "--world-size", str(world)]  # a documented dry run
    sys.exit(subprocess.call([REAL, script, *args, *added, *extra]))


def check_tool_flags(target, args):
    script = " ".join(target)
    cache = os.environ.get("HELP_CACHE")  # a directory shared by one test session: --help once per tool
    cached = os.path.join(cache, re.sub(r"[^A-Za-z0-9]", "_", script)) if cache else None
    if cached and os.path.exists(cached):
        helptext = open(cached).read()
    else:
        done = subprocess.run([REAL, *target, "--help"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or "usage:" not in done.stdout:
            print(f"{{script}} --help did not print a usage: {{done.stderr[-500:]}}", file=sys.stderr)
            sys.exit(2)
        helptext = done.stdout
        if cached:
            with open(cached, "w") as fh:
                fh.write(helptext)
    known = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", helptext))
    if "--" in args:  # what follows goes to another program (tools/serve.py passes it to vLLM)
        args = args[:args.index("--")]
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
    log(f"tool {{script}} flags={{' '.join(a for a in args if a.startswith('--'))}} unknown={{unknown}}")
    if unknown:
        print(f"{{script}}: unknown flag(s) {{unknown}}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


argv = sys.argv[1:]
if ROLE == "torchrun":
    opts, i = {{}}, 0
    with_value = ("--nnodes", "--nproc-per-node", "--nproc_per_node", "--rdzv-backend", "--rdzv-endpoint",
                  "--rdzv-id", "--max-restarts", "--master-addr", "--master-port", "--node-rank",
                  "--monitor-interval", "--rdzv-conf", "--log-dir", "--redirects", "--tee")
    while i < len(argv) and argv[i].startswith("-"):
        key, _, value = argv[i].partition("=")
        if key in with_value:
            if not value:
                i += 1
                value = argv[i]
            opts[key.replace("_", "-")] = value
        elif key in ("--standalone", "--no-python"):
            opts[key] = True
        else:
            print(f"torchrun stand-in: unknown option {{key}}", file=sys.stderr)
            sys.exit(2)
        i += 1
    nnodes = int(str(opts.get("--nnodes", "1")).split(":")[-1])
    if nnodes > 1 and not ("--rdzv-endpoint" in opts or "--master-addr" in opts):
        print("torchrun stand-in: a multi-node launch needs --rdzv-endpoint or --master-addr", file=sys.stderr)
        sys.exit(2)
    if opts.get("--rdzv-backend") == "c10d" and not opts.get("--rdzv-id"):
        print("torchrun stand-in: c10d rendezvous needs --rdzv-id", file=sys.stderr)
        sys.exit(2)
    log("torchrun " + " ".join(f"{{k}}={{v}}" for k, v in opts.items()))
    dry_run(argv[i], argv[i + 1:], nnodes * int(opts.get("--nproc-per-node", "1")))
elif ROLE == "srun":
    while argv and argv[0].startswith("-"):
        argv = argv[1:]
    log("srun " + " ".join(argv[:1]))
    os.execvp(argv[0], argv)
elif ROLE == "scontrol":
    assert argv[:2] == ["show", "hostnames"], argv
    print(argv[2].split(",")[0].split("[")[0] + "1")
else:  # python
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if argv and argv[0].endswith("pretrain_gpt.py"):
        dry_run(argv[0], argv[1:], world)
    if argv[:2] == ["-m", "megaflow"]:
        dry_run("pretrain_gpt.py", argv[2:], world)
    if argv[:2] == ["-m", "pytest"]:
        paths = [a.split("::")[0] for a in argv[2:]
                 if not a.startswith("-") and (a.startswith("tests") or "/" in a or a.endswith(".py"))]
        missing = [p for p in paths if not os.path.exists(p)]
        log(f"pytest {{paths}} missing={{missing}}")
        sys.exit(2 if missing or not paths else 0)
    if argv and argv[0] == "-m":
        check_tool_flags(["-m", argv[1]], argv[2:])
    if argv and argv[0].endswith(".py"):
        check_tool_flags([argv[0]], argv[1:])
    print(f"python stand-in: not a documented kind of command: {{argv}}", file=sys.stderr)
    sys.exit(3)
'''


def dry_run_path(tmp) -> str:
    """Write the stand-ins into tmp/bin and return that directory."""
    bin_dir = os.path.join(str(tmp), "bin")
    os.makedirs(bin_dir, exist_ok=True)
    log = os.path.join(str(tmp), "launches.log")
    for role in ("torchrun", "srun", "scontrol", "python"):
        path = os.path.join(bin_dir, role)
        with open(path, "w") as fh:
            fh.write(SHIM.format(python=sys.executable, role=role, log=log))
        os.chmod(path, 0o755)
    return bin_dir
