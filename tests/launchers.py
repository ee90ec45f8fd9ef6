"""Stand-in launchers for checking recipes and documented commands without GPUs or a cluster.

`dry_run_path(tmp)` writes `torchrun`, `srun`, `scontrol` and `python` executables into tmp/bin; put that
directory first on PATH and run a recipe unchanged:
  torchrun   reads its own options like torchrun (--nnodes, --nproc-per-node, --standalone, rendezvous
             and master options), requires rendezvous settings for multi-node launches, and runs the
             script once as `python SCRIPT ARGS --dry-run --world-size NNODES×NPROC` (one process plays
             every rank: megaflow's --dry-run builds all stages on the meta device)
  srun       drops its options and runs the command (the job's environment comes from the test)
  scontrol   `scontrol show hostnames LIST` prints LIST's first host
  python     `python pretrain_gpt.py ...` gets --dry-run; `python tools/X.py ...` checks that every flag is
             one the tool's --help lists, without running it; anything else runs as is
Each launch is appended to tmp/launches.log. $DRY_RUN_EXTRA (e.g. "--vocab-size 128256": tokenizer files
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
    sys.exit(subprocess.call([REAL, script, *args, "--dry-run", "--world-size", str(world), *extra]))


def check_tool_flags(script, args):
    helptext = subprocess.run([REAL, script, "--help"], capture_output=True, text=True).stdout
    known = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", helptext))
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
    if argv and argv[0].endswith("pretrain_gpt.py"):
        dry_run(argv[0], argv[1:], int(os.environ.get("WORLD_SIZE", "1")))
    if argv and argv[0].startswith("tools/"):
        check_tool_flags(argv[0], argv[1:])
    os.execv(REAL, [REAL, *argv])
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
