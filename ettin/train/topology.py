"""Inside a Slurm job, before any work: the world SLURM started must be the one the config asks for
(every rank prints where it runs, so a missing or misplaced rank shows in the log)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional


class TopologyError(RuntimeError):
    """SLURM started a different world than the configuration expects."""


@dataclass
class Topology:
    job_id: str
    nodes: int
    nodelist: str
    world_size: int
    tasks_per_node: int
    rank: int
    local_rank: int
    node_rank: int
    host: str
    master_addr: str
    master_port: int

    def describe(self) -> str:
        return (f"topology: job {self.job_id}, {self.nodes} node(s) [{self.nodelist}] x "
                f"{self.tasks_per_node} task(s) = world size {self.world_size}; rendezvous "
                f"{self.master_addr}:{self.master_port}")

    def describe_rank(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: host {self.host}, node {self.node_rank}, "
                f"local rank {self.local_rank}")


def under_srun() -> bool:
    """True inside tasks started by srun (not in a bare salloc/sbatch shell, nor an interactive job)."""
    return "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and \
        os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def check_topology(expected_world_size: int, *, devices_per_node: Optional[int] = None,
                   num_nodes: Optional[int] = None, log=None) -> Optional[Topology]:
    """Before any work: the world SLURM started must be the one the config asks for.

    ``expected_world_size`` is ``trainer.num_nodes * trainer.devices``. Outside srun it returns None.
    Raises TopologyError naming both numbers and the fix; prints the topology (rank 0) and one line
    per rank (so a missing or misplaced rank shows in the log).
    """
    if not under_srun():
        return None
    import platform

    if log is None:
        def log(line: str) -> None:
            print(line, flush=True)

    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = os.environ
    ntasks = int(env["SLURM_NTASKS"])
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    per_node_text = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", str(ntasks)))
    per_node = int(re.match(r"\d+", per_node_text).group()) if re.match(r"\d+", per_node_text) else ntasks
    fix = ("submit with python -m ettin.launch (it sets trainer.num_nodes and trainer.devices from "
           "--nodes/--gpus-per-node), or make #SBATCH --nodes x --ntasks-per-node equal "
           "trainer.num_nodes x trainer.devices")
    if ntasks != expected_world_size:
        raise TopologyError(
            f"SLURM started {ntasks} task(s) ({nnodes} node(s) x {per_node_text}) but the config "
            f"expects a world size of {expected_world_size} (trainer.num_nodes x trainer.devices); "
            + fix)
    if num_nodes is not None and nnodes != num_nodes:
        raise TopologyError(f"SLURM gave {nnodes} node(s) but trainer.num_nodes={num_nodes}; " + fix)
    if devices_per_node is not None and per_node != devices_per_node:
        raise TopologyError(f"SLURM runs {per_node_text} task(s) per node but trainer.devices="
                            f"{devices_per_node}; " + fix)
    nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
    master_addr = env.get("MASTER_ADDR") or SLURMEnvironment.resolve_root_node_address(nodelist)
    job_id = env.get("SLURM_JOB_ID", "?")
    if "MASTER_PORT" in env:
        master_port = int(env["MASTER_PORT"])
    else:  # what Lightning's SLURMEnvironment uses
        master_port = int(job_id[-4:]) + 15000 if job_id.isdigit() else 12910
    topology = Topology(
        job_id=job_id, nodes=nnodes, nodelist=nodelist, world_size=ntasks, tasks_per_node=per_node,
        rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", "0")),
        node_rank=int(env.get("SLURM_NODEID", "0")), host=platform.node(), master_addr=master_addr,
        master_port=master_port,
    )
    if topology.rank == 0:
        log(topology.describe())
    log(topology.describe_rank())
    return topology
