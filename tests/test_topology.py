"""Which node this is and where the nodes meet: flags first, then the PET_* variables torchrun and Kubernetes
operators use (pure: no torch)."""

from __future__ import annotations

from typing import Any

import pytest

from llmbox.errors import UserError
from llmbox.topology import Topology, nproc_from_environment, topology

NONE: dict[str, Any] = {"nnodes": None, "node_rank": None, "master_addr": None, "master_port": None}


def test_one_node_by_default_runs_standalone() -> None:
    where = topology(NONE, {})
    assert where == Topology() and not where.multi_node and where.writes
    assert where.torchrun_args() == ["--standalone"]


def test_the_flags_win_over_the_environment() -> None:
    environ = {"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "trainer-0", "PET_MASTER_PORT": "23456"}
    from_env = topology(NONE, environ)
    assert from_env == Topology(4, 3, "trainer-0", 23456) and not from_env.writes
    assert from_env.torchrun_args() == ["--nnodes", "4", "--node-rank", "3", "--master-addr", "trainer-0",
                                        "--master-port", "23456"]  # fmt: skip
    flags = NONE | {"nnodes": 2, "node_rank": 0, "master_addr": "10.0.0.1"}
    assert topology(flags, environ) == Topology(2, 0, "10.0.0.1", 23456)
    assert nproc_from_environment({"PET_NPROC_PER_NODE": "8"}) == 8 and nproc_from_environment({}) is None


@pytest.mark.parametrize(
    ("values", "environ", "message"),
    [
        ({"nnodes": 2}, {}, "give --master-addr"),
        ({"nnodes": 2, "node_rank": 2, "master_addr": "h"}, {}, r"--node-rank 2 is not one of the 2 nodes \(0 to 1\)"),
        ({}, {"PET_NNODES": "two"}, r"\$PET_NNODES='two': expected a whole number"),
    ],
)
def test_an_impossible_topology_is_one_clear_error(
    values: dict[str, Any], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        topology(NONE | values, environ)
