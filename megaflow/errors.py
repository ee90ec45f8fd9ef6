"""Mistakes a user can fix, and how the entry points report them.

A `UserError` is a problem with a flag or a file (a missing dataset, a foreign checkpoint, a layout the
model cannot take): its message names the flag and the file and says what to do. Entry points print it
as one line, `prog: <kind>: <message>`, without a Python traceback (`--debug` or MEGAFLOW_DEBUG=1 adds
it), and exit with status 2. ConfigError, TokenizerError, CheckpointError and DataError are UserErrors.

Under torchrun every rank runs the same start-up checks and fails the same way. Rank 0 prints; the
other ranks exit quietly with the same status. torchrun stops the remaining workers (SIGTERM) as soon
as one of them exits, so the failing ranks meet on torchrun's own key-value store (the agent's, which
exists before any process group, see _Meeting): a rank other than 0 leaves once rank 0 has printed, or
prints the message itself if rank 0 never does (a file missing on one node only), and rank 0 leaves
once every rank has arrived. This module imports nothing from megaflow: every layer may use it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

EXIT_USER_ERROR = 2
DEBUG_ENV = "MEGAFLOW_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message names the flag/file and the fix."""
    kind = "error"  # how the entry point labels it: "configuration error", "data error", ...


class DataError(UserError, ValueError):
    """A dataset that cannot be read: missing, unreadable, truncated or foreign files."""
    kind = "data error"


def debug_requested(argv=None) -> bool:
    """--debug on the command line or MEGAFLOW_DEBUG=1 in the environment: show tracebacks."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def launch_rank() -> int:
    """This process's rank as the launcher set it (no process group is needed)."""
    return int(os.environ.get("RANK", "0"))


def report(error: BaseException, prog: str = "megaflow", debug: bool = False, wait_seconds: float = 60.0) -> int:
    """Print a UserError once for the whole launch and return the exit status (see the module doc)."""
    rank = launch_rank()
    kind = getattr(error, "kind", "error")
    meeting = _Meeting.join(rank)
    if rank == 0:
        if debug:
            traceback.print_exception(error)
        print(f"{prog}: {kind}: {error}", file=sys.stderr, flush=True)
        if meeting is not None:
            meeting.rank_0_reported(wait_seconds)
    elif meeting is not None and not meeting.wait_for_rank_0(wait_seconds):
        print(f"{prog}: {kind} (rank {rank}): {error}", file=sys.stderr, flush=True)
    elif debug:
        traceback.print_exception(error)
    if meeting is not None:  # leave now: interpreter shutdown is long enough for torchrun's SIGTERM to land
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_USER_ERROR)
    return EXIT_USER_ERROR


class _Meeting:
    """Failing ranks meet on torchrun's agent store (it exists before and without any process group).
    Rank 0 prints, then waits until every rank has arrived, so that torchrun, which stops the remaining
    workers with SIGTERM as soon as one exits, finds them all leaving with the same status."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # keys of an earlier attempt stay
        self.arrived, self.reported = f"megaflow/{attempt}/user_error_arrived", f"megaflow/{attempt}/user_error"

    @classmethod
    def join(cls, rank: int):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or world < 2:
            return None  # no torchrun agent: nobody kills the other ranks, each exits on its own
        import signal
        # Once rank 0 has left, torchrun sends SIGTERM to the others: leave with the same status.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_USER_ERROR))
        try:
            from datetime import timedelta

            from torch.distributed import TCPStore
            store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=10), wait_for_workers=False)
            meeting = cls(store, rank, world)
            store.add(meeting.arrived, 1)
        except Exception:  # no store: no coordination, every rank simply exits
            return None
        return meeting

    def rank_0_reported(self, seconds: float) -> None:
        try:
            self.store.set(self.reported, "1")
            deadline = time.monotonic() + seconds
            while self.store.add(self.arrived, 0) < self.world and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:
            pass

    def wait_for_rank_0(self, seconds: float) -> bool:
        """True once rank 0 has printed; False after `seconds` (rank 0 did not fail: this rank reports)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.store.check([self.reported]):
                    return True
            except Exception:
                return True
            time.sleep(0.05)
        return False


def run_tool(main, argv=None, prog: str | None = None) -> int:
    """Run a tool's main(argv): a UserError (or a missing file) becomes one message and status 2."""
    prog = prog or os.path.basename(sys.argv[0] or "megaflow")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]  # every tool accepts it
    try:
        return main(argv)
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        return report(e, prog, debug)


@contextlib.contextmanager
def naming(flag: str, value):
    """Prefix a UserError raised inside with the flag (and its value) it concerns: the layers below know
    the file, the tool knows which of its flags named it."""
    try:
        yield
    except (UserError, FileNotFoundError) as e:
        message = str(e)
        if message.startswith(flag):
            raise
        if message.startswith(f"{value}: "):  # "DIR: no such directory" -> "--load DIR: no such directory"
            message = message[len(f"{value}: "):]
        raise type(e)(f"{flag} {value}: {message}") from e  # the chain shows with --debug
