"""Training on several devices: torchrun, run in this process, starts one worker per device.

The process that calls `launch` is torchrun's agent: it keeps the model directory's lock and llmbox's
lifeline, and each worker is `python -m llmbox_engine train` with the same options, which finds RANK and
WORLD_SIZE in its environment and joins the process group (`distributed.py`). torchrun passes each signal the
agent gets to every worker once, and gives them `SHUTDOWN_SECONDS` to finish the step and save. It then
reports the signal as a failure; the workers know better: rank 0 writes the run's result to a file when it
has published, so a stop that saved ends with exit 0, and one that did not says so. A worker that fails
makes torchrun stop the others, and the agent names the rank in one `error:` line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmbox.errors import UserError
from llmbox.topology import Topology

RESULT_ENV = "LLMBOX_RESULT_FILE"  # where rank 0 writes the result of a finished run
SHUTDOWN_SECONDS = 300  # after a signal: time to finish the step and save before torchrun kills the workers
PEER_LOST_EXIT = 75  # a worker's exit when another worker went away: a consequence, not the cause


def under_torchrun() -> bool:
    """This process is a worker that torchrun started (its rank, and the world's size, in the environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(nproc_per_node: int, worker_argv: list[str], where: Topology | None = None) -> None:
    """Run `python -m llmbox_engine train WORKER_ARGV` in `nproc_per_node` processes on this node of `where`
    (one node by default), until rank 0 has published; on the other nodes, until their processes end."""
    where = where or Topology()
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # the cores shared out (torchrun would set 1 and say so in a banner)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    quiet_agent()
    with tempfile.TemporaryDirectory(prefix="llmbox-launch-") as scratch:
        result = Path(scratch) / "result.json"
        os.environ[RESULT_ENV] = str(result)
        args = [
            *where.torchrun_args(), "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0",
            "--monitor-interval", "0.5", "--shutdown-timeout", str(SHUTDOWN_SECONDS),
            "-m", "llmbox_engine", "train", *worker_argv,
        ]  # fmt: skip
        try:
            torchrun.main(args)
        except SignalException as exc:
            if not where.writes:
                raise UserError(f"stopped by {signal.Signals(exc.sigval).name} (node 0 saves the adapter)") from None
            if not result.is_file():
                name = signal.Signals(exc.sigval).name
                raise UserError(f"stopped by {name} before rank 0 had saved the adapter") from None
        except ChildFailedError as exc:
            raise UserError(failure_message(exc.failures)) from None
        if where.writes and not result.is_file():
            raise UserError("the training processes ended without a result from rank 0")


def quiet_agent() -> None:
    """The agent's own log stays quiet: the workers say what happens, and a failure is one error line here.

    torch's elastic loggers each set their own level when their module is imported, so each is turned down.
    A race in torch's rendezvous keep-alive timer at exit ("cannot join current thread", raised in a
    finalizer and only printed) is not shown either.
    """
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    shown = sys.unraisablehook

    def unraisable(report: Any) -> None:
        if not (isinstance(report.exc_value, RuntimeError) and "cannot join current thread" in str(report.exc_value)):
            shown(report)

    sys.unraisablehook = unraisable


def failure_message(failures: dict[int, Any]) -> str:
    """The rank that failed first and how. The others' ends are consequences: ending because a peer went
    away (PEER_LOST_EXIT), or the SIGTERM torchrun sends the rest when one fails."""

    def cause_first(item: tuple[int, Any]) -> tuple[bool, int, int]:
        rank, failure = item
        consequence = failure.exitcode in (PEER_LOST_EXIT, -signal.SIGTERM, -signal.SIGINT)
        return consequence, failure.timestamp, rank

    rank, failure = min(failures.items(), key=cause_first)
    code = failure.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    others = " (its error is above); the other processes were stopped" if code > 0 else "; the others were stopped"
    return f"training process of rank {rank} {how}{others}"


def write_result(result: dict[str, Any]) -> None:
    """Rank 0, after publishing: tells the agent the run finished (see the module's docstring)."""
    path = os.environ.get(RESULT_ENV)
    if path:
        Path(path).write_text(json.dumps(result))
