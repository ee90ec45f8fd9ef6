"""Benchmarks that need several processes start torchrun on themselves, so the user types one command."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_or_torchrun(script: str, nproc: int, worker, args) -> None:
    """Under torchrun: worker(args). Otherwise run `script` again with this process's arguments under
    torchrun, nproc processes on this host, one thread each (OMP_NUM_THREADS=1, as torchrun's
    default), and exit with its exit code."""
    if "WORLD_SIZE" in os.environ:
        worker(args)
        return
    sys.path.insert(0, ROOT)
    from tests.launch import free_port
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", os.path.abspath(script), *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env, cwd=ROOT))
