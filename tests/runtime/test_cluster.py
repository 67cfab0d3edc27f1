"""segtrain.runtime.cluster: SLURM layouts (a task per node or per GPU), ports, GPU shares."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from segtrain.errors import SegtrainError
from segtrain.runtime import cluster as C

SLURM_VARS = ("TF_CONFIG", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
              "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_LOCALID", "SLURM_NODEID")


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


def _step(procid, nodes="gpu[07-08]", tasks="2(x2)", num_tasks=4, localid=None, nodeid=None, **extra):
    """The variables srun gives task ``procid`` of a block-distributed step."""
    per_node = C.tasks_per_node(tasks)
    if nodeid is None:
        nodeid = next(i for i in range(len(per_node)) if sum(per_node[:i + 1]) > procid)
    if localid is None:
        localid = procid - sum(per_node[:nodeid])
    return {"SLURM_PROCID": str(procid), "SLURM_STEP_NUM_TASKS": str(num_tasks), "SLURM_STEP_NODELIST": nodes,
            "SLURM_STEP_TASKS_PER_NODE": tasks, "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            **extra}


def test_tasks_per_node_reads_slurms_compressed_counts():
    assert C.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert C.tasks_per_node("8") == [8]
    with pytest.raises(SegtrainError, match="SLURM_STEP_TASKS_PER_NODE='2x3'"):
        C.tasks_per_node("2x3")


@pytest.mark.parametrize("procid, visible, gpus_per_node, expected", [
    (0, "0,1", None, "0"),             # one task per GPU: SLURM showed both GPUs to both tasks
    (3, "0,1", None, "1"),             # second node, its second task
    (1, None, 2, "1"),                 # no CUDA_VISIBLE_DEVICES: the GPUs per node decide
    (1, "4,5,6,7", None, "6,7"),       # two GPUs each, and SLURM's own numbering kept
    (1, "1", 2, None),                 # SLURM bound each task already (--gpus-per-task=1)
    (1, None, None, None),             # CPU nodes: nothing to share
])
def test_each_task_of_a_node_takes_its_share_of_the_gpus(procid, visible, gpus_per_node, expected):
    env = _step(procid, **({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {}))
    assert C.slurm_task_gpus(env, gpus_per_node) == expected


def test_one_task_per_node_keeps_all_the_gpus():
    env = _step(1, tasks="1(x2)", num_tasks=2, CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert C.slurm_task_gpus(env) is None


def test_gpus_that_the_tasks_cannot_share_evenly_are_one_message():
    env = _step(0, tasks="3(x2)", num_tasks=6, SLURMD_NODENAME="gpu07", CUDA_VISIBLE_DEVICES="0,1,2,3")
    with pytest.raises(SegtrainError) as e:
        C.slurm_task_gpus(env)
    assert str(e.value).startswith(
        "3 tasks on node gpu07 (SLURM_STEP_TASKS_PER_NODE=3(x2)) cannot share 4 GPU(s) (CUDA_VISIBLE_DEVICES="
        "0,1,2,3) evenly, and every worker must drive as many GPUs as the others: ask sbatch for "
        "--ntasks-per-node equal to the GPUs per node")


def test_pinning_sets_cuda_visible_devices_before_tensorflow_sees_the_gpus():
    env = {k: v for k, v in _step(3, CUDA_VISIBLE_DEVICES="0,1").items()}
    code = ("import os; from segtrain.runtime import cluster; "
            "print(cluster.pin_slurm_task_gpus(), os.environ['CUDA_VISIBLE_DEVICES'])")
    import os
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["1", "1"]
    assert "segtrain: SLURM task 3 (local task 1 of its node) uses GPU(s) 1" in out.stderr


def _set(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_one_task_per_gpu_gives_the_tasks_of_a_node_distinct_ports(monkeypatch):
    _set(monkeypatch, _step(2))
    cluster = C.cluster_from_slurm(gpus_per_node=2, port_base=9000)
    assert cluster.spec == {"worker": ["gpu07:9000", "gpu07:9001", "gpu08:9000", "gpu08:9001"]}
    assert cluster.task_id == 2 and cluster.rank == 2
    assert cluster.resolver.num_accelerators() == {"GPU": 1}  # its share of the node's two


def test_job_ports_give_every_task_its_own_port(monkeypatch):
    # two node entries that are one host (launch/slurm/local_cluster.sh): 'node' ports collide
    _set(monkeypatch, _step(1, nodes="runsc,vm", tasks="1(x2)", num_tasks=2))
    cluster = C.cluster_from_slurm(gpus_per_node=0, port_base=9000, ports="job")
    assert cluster.spec == {"worker": ["runsc:9000", "vm:9001"]}
    assert cluster.resolver.cluster_spec().as_dict() == cluster.spec
    with pytest.raises(SegtrainError, match="distribute.slurm_ports='rank': use one of node, job."):
        C.cluster_from_slurm(ports="rank")


def test_uneven_tasks_per_node_on_gpus_are_refused(monkeypatch):
    _set(monkeypatch, _step(0, tasks="2,1", num_tasks=3))
    with pytest.raises(SegtrainError, match=r"placed 2,1 over its nodes .* \(sbatch --ntasks-per-node=N"):
        C.cluster_from_slurm(gpus_per_node=2)
    assert C.cluster_from_slurm(gpus_per_node=0).num_tasks == 3  # CPU workers need no equal share


def test_rank_puts_the_chief_first():
    spec = {"chief": ["h:1"], "worker": ["h:2", "h:3"]}
    assert [C.Cluster(spec, k, i, "TF_CONFIG").rank for k, i in (("chief", 0), ("worker", 0), ("worker", 1))] \
        == [0, 1, 2]


def test_the_local_launcher_gets_its_clusters_here():
    configs = [json.loads(c) for c in C.local_tf_configs(2)]
    assert configs[0]["cluster"] == configs[1]["cluster"] and len(set(configs[0]["cluster"]["worker"])) == 2
    assert [c["task"]["index"] for c in configs] == [0, 1]
