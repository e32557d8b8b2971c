"""SLURM's variables mapped to torchrun's: the ranks every task of a 2-node x 8-GPU `srun` gets, checked against
the layout srun itself uses (block distribution: node n holds global ranks n*8 .. n*8+7)."""

from __future__ import annotations

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.training.launch import first_host, slurm_mapping, tasks_on_node, world_layout


def srun_task(rank: int, per_node: list[int], nodelist: str = "gpu[07-08]", job: str = "4242") -> dict[str, str]:
    """The variables srun gives task `rank` of a step with `per_node[n]` tasks on node n (block distribution)."""
    node = next(n for n in range(len(per_node)) if rank < sum(per_node[:n + 1]))
    counts = ",".join(f"{c}(x1)" for c in per_node)
    return {"SLURM_JOB_ID": job, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank - sum(per_node[:node])),
            "SLURM_NODEID": str(node), "SLURM_STEP_NUM_TASKS": str(sum(per_node)), "SLURM_STEP_NODELIST": nodelist,
            "SLURM_STEP_TASKS_PER_NODE": counts, "SLURM_NTASKS": str(sum(per_node))}


def test_two_nodes_of_eight_tasks_get_torchrun_ranks():
    seen = []
    for rank in range(16):
        env = srun_task(rank, [8, 8])
        got = slurm_mapping(env)
        assert got["RANK"] == str(rank) and got["WORLD_SIZE"] == "16" and got["LOCAL_WORLD_SIZE"] == "8"
        assert got["LOCAL_RANK"] == str(rank % 8) and got["GROUP_RANK"] == str(rank // 8)
        assert got["MASTER_ADDR"] == "gpu07"
        seen.append((got["MASTER_ADDR"], got["MASTER_PORT"]))
        assert world_layout(env) == (16, 8)
    assert len(set(seen)) == 1  # every task meets at the same address and port
    assert 1024 < int(seen[0][1]) < 65536


def test_uneven_nodes_and_compressed_counts():
    assert tasks_on_node("8(x2)", 1) == 8
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    env = srun_task(6, [2, 2, 2, 1])
    env["SLURM_STEP_TASKS_PER_NODE"] = "2(x3),1"
    got = slurm_mapping(env)
    assert (got["RANK"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"], got["WORLD_SIZE"]) == ("6", "0", "1", "7")
    with pytest.raises(CuteGPTError, match="SLURM_NODEID 4"):
        tasks_on_node("2(x3),1", 4)
    with pytest.raises(CuteGPTError, match="SLURM_STEP_TASKS_PER_NODE"):
        tasks_on_node("eight", 0)


@pytest.mark.parametrize("nodelist, first", [("gpu[07-08,11]", "gpu07"), ("node001", "node001"), ("a1,b2", "a1"),
                                             ("n[3,5-9],m1", "n3"), ("rack2-n[010-011]", "rack2-n010")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_what_is_already_set_wins_and_launchers_are_left_alone():
    env = srun_task(3, [2, 2])
    env.update(MASTER_ADDR="10.1.2.3", MASTER_PORT="29500")
    got = slurm_mapping(env)
    assert "MASTER_ADDR" not in got and "MASTER_PORT" not in got and got["RANK"] == "3"
    # torchrun started by srun (one task per node): torchrun's own RANK wins, nothing is mapped
    assert slurm_mapping({**srun_task(1, [1, 1]), "RANK": "9", "WORLD_SIZE": "16"}) == {}
    # the batch script itself (no job step) and a single task are not distributed jobs
    batch = {k: v for k, v in srun_task(0, [8, 8]).items() if not k.startswith("SLURM_STEP")}
    assert slurm_mapping(batch) == {}
    assert slurm_mapping(srun_task(0, [1])) == {}
    assert world_layout({}) == (1, 1)
    assert world_layout({"WORLD_SIZE": "16", "LOCAL_SIZE": "8", "RANK": "0"}) == (16, 8)  # the deepspeed launcher's name


def test_a_broken_variable_is_one_sentence():
    with pytest.raises(CuteGPTError, match="whole numbers"):
        slurm_mapping({**srun_task(0, [2]), "SLURM_PROCID": "x"})
