"""Where a training runs: how many machines, which one this is, and where they meet (torchrun's flags).

The flags win; otherwise the `PET_*` variables that torchrun itself reads (and Kubernetes operators such as
the Kubeflow Trainer set in every pod) give the values, so the same command runs on a cluster unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmbox.errors import UserError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Topology:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def writes(self) -> bool:
        """Node 0 holds rank 0, which alone writes the adapter, checkpoints and logs."""
        return self.node_rank == 0

    def torchrun_args(self) -> list[str]:
        if not self.multi_node:
            return ["--standalone"]
        assert self.master_addr is not None  # topology() requires it
        return ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                "--master-addr", self.master_addr, "--master-port", str(self.master_port)]  # fmt: skip


def topology(values: Mapping[str, Any], environ: Mapping[str, str]) -> Topology:
    """From --nnodes, --node-rank, --master-addr, --master-port, else PET_NNODES, PET_NODE_RANK, ..."""

    def given(name: str, variable: str) -> Any:
        value = values.get(name)
        if value is not None:
            return value
        raw = environ.get(variable, "").strip()
        if raw and name != "master_addr":
            try:
                return int(raw)
            except ValueError:
                raise UserError(f"${variable}={raw!r}: expected a whole number") from None
        return raw or None

    nnodes = given("nnodes", "PET_NNODES") or 1
    node_rank = given("node_rank", "PET_NODE_RANK") or 0
    master_addr = given("master_addr", "PET_MASTER_ADDR")
    master_port = given("master_port", "PET_MASTER_PORT") or DEFAULT_MASTER_PORT
    if nnodes < 1:
        raise UserError(f"--nnodes must be at least 1 (got {nnodes})")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank {node_rank} is not one of the {nnodes} nodes (0 to {nnodes - 1})")
    if nnodes > 1 and not master_addr:
        raise UserError(f"--nnodes {nnodes}: give --master-addr, node 0's address that every node can reach")
    return Topology(nnodes, node_rank, master_addr, master_port)


def nproc_from_environment(environ: Mapping[str, str]) -> int | None:
    raw = environ.get("PET_NPROC_PER_NODE", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None
