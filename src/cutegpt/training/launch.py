"""The launcher's process-group variables: torchrun and deepspeed set them; SLURM's `srun` sets its own.

    launcher           rank       world size     local rank      processes on this node   rendezvous
    torchrun/deepspeed RANK       WORLD_SIZE     LOCAL_RANK      LOCAL_WORLD_SIZE         MASTER_ADDR/PORT
    srun (one task     SLURM_     SLURM_STEP_    SLURM_LOCALID   SLURM_STEP_TASKS_        first host of SLURM_STEP_NODELIST,
    per process)       PROCID     NUM_TASKS                      PER_NODE[node]           a port from SLURM_JOB_ID

`cutegpt train` started by `srun` with one task per GPU (no torchrun) gets the left column filled from the
right (`slurm_env`), once, before anything reads them: accelerate, DeepSpeed and our own code then see an
ordinary torchrun-style job. Variables the user or a launcher already set are never replaced.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping

from cutegpt.errors import CuteGPTError

log = logging.getLogger("cutegpt.training")

# a port every task of one job derives alike, away from the well-known and the usual ephemeral ranges
_PORT_BASE, _PORT_SPAN = 15000, 20000


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: 'gpu[07-08,11],cpu3' -> 'gpu07' (zero padding kept)."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1).strip():
        raise CuteGPTError(f"SLURM_STEP_NODELIST {nodelist!r}: not a SLURM node list.")
    prefix, ranges = m.group(1).strip(), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0].strip()


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node `node` from SLURM's compressed count: '8(x2)' -> 8 on nodes 0 and 1; '2(x3),1' -> 1 on node 3."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise CuteGPTError(f"SLURM_STEP_TASKS_PER_NODE {tasks_per_node!r}: not a SLURM task count.")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise CuteGPTError(f"SLURM_NODEID {node} is outside SLURM_STEP_TASKS_PER_NODE {tasks_per_node!r}.")
    return counts[node]


def slurm_mapping(env: Mapping[str, str]) -> dict[str, str]:
    """The torchrun-style variables an `srun` task lacks, from SLURM's own; {} outside srun, under a launcher
    or for a single task.

    Only a job step started by srun counts (SLURM_STEP_NUM_TASKS): the batch script itself also carries
    SLURM_PROCID=0, and treating it as rank 0 of N would wait forever for the other N-1.
    """
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    try:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        rank = int(env["SLURM_PROCID"])
        local = int(env.get("SLURM_LOCALID", "0"))
        node = int(env.get("SLURM_NODEID", "0"))
    except ValueError:
        raise CuteGPTError("SLURM_STEP_NUM_TASKS, SLURM_PROCID, SLURM_LOCALID and SLURM_NODEID must be whole numbers.") from None
    if world == 1:  # one task needs no process group (and `srun pytest` must not turn the test run into rank 0 of 1)
        return {}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
           "LOCAL_WORLD_SIZE": str(tasks_on_node(per_node, node)), "GROUP_RANK": str(node)}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1")
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(_PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % _PORT_SPAN)
    return {k: v for k, v in out.items() if k not in env}


def slurm_env() -> dict[str, str]:
    """Fill in the launcher variables of an `srun` task (see `slurm_mapping`); returns what was set."""
    added = slurm_mapping(os.environ)
    os.environ.update(added)
    if added and added.get("RANK") == "0":
        log.info("started by srun: %s processes, rendezvous at %s:%s", added["WORLD_SIZE"],
                 os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    return added


def world_layout(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(processes in the job, processes on each node) as the launcher set them; (1, 1) without one."""
    env = os.environ if env is None else env
    env = {**env, **slurm_mapping(env)}
    world = int(env.get("WORLD_SIZE", "1"))
    # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    return world, int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
