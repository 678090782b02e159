"""Which part of the work a job does: flags, SLURM array, torchrun, or everything."""

from __future__ import annotations

import pytest

from dad.errors import ConfigError
from dad.pipeline.cache_teachers import resolve_work_split


def test_flags_win_over_the_array():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}
    s = resolve_work_split(3, 2, env)
    assert (s.num_parts, s.part_index, s.source) == (3, 2, "flags")
    assert [k for k in range(10) if s.owns(k)] == [2, 5, 8]


@pytest.mark.parametrize("part", [{"flags": (3, 2)}, {"env": {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}}])
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_the_processes_of_a_job_split_its_part_among_them(part, launcher):
    # an array task (or --num-shards part) running 4 processes: each takes its own shards of
    # the part, together exactly the part, and picks its GPU by its rank on the node
    owned = []
    for rank in range(4):
        env = dict(part.get("env", {}))
        env.update({"WORLD_SIZE": "4", "RANK": str(rank), "LOCAL_RANK": str(rank)} if launcher == "torchrun" else
                   {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "4"})
        s = resolve_work_split(*part.get("flags", (None, None)), environ=env)
        assert s.num_parts == 12 and s.local_rank == rank and s.source.endswith(launcher)
        owned.append([k for k in range(60) if s.owns(k)])
    assert sorted(k for mine in owned for k in mine) == [k for k in range(60) if k % 3 == 2]


def test_flags_naming_each_process_its_own_part_are_not_split_again():
    # the old recipe, `srun ... --num-shards $SLURM_NTASKS --shard-index $SLURM_PROCID`
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2"}
    s = resolve_work_split(4, 2, env)
    assert (s.num_parts, s.part_index, s.source) == (4, 2, "flags")
    with pytest.raises(ConfigError, match=r"--shard-index 1 is not this process's rank 2"):
        resolve_work_split(4, 1, env)  # every process the same part of as many parts as processes: ambiguous


def test_srun_tasks_split_alone_but_a_batch_scripts_ntasks_does_not():
    s = resolve_work_split(environ={"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"})
    assert (s.num_parts, s.part_index, s.source, s.local_rank) == (2, 1, "srun", 0)
    s = resolve_work_split(environ={"SLURM_NTASKS": "4", "SLURM_PROCID": "0"})  # sbatch --ntasks 4, no srun
    assert (s.num_parts, s.part_index, s.source) == (1, 0, "single")


def test_slurm_array_offsets_and_steps():
    s = resolve_work_split(environ={"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4",
                                    "SLURM_ARRAY_TASK_MIN": "10"})
    assert (s.num_parts, s.part_index, s.source) == (4, 2, "slurm-array")
    s = resolve_work_split(environ={"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4",
                                    "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"})
    assert (s.num_parts, s.part_index) == (4, 3)
    with pytest.raises(ConfigError, match="contiguous"):  # --array=0-9,20: task 20 of 11
        resolve_work_split(environ={"SLURM_ARRAY_TASK_ID": "20", "SLURM_ARRAY_TASK_COUNT": "11",
                                    "SLURM_ARRAY_TASK_MIN": "0"})


def test_torchrun_and_default():
    s = resolve_work_split(environ={"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"})
    assert (s.num_parts, s.part_index, s.source, s.local_rank) == (8, 5, "torchrun", 1)
    s = resolve_work_split(environ={})
    assert (s.num_parts, s.part_index, s.source) == (1, 0, "single")


def test_bad_flags_name_them():
    with pytest.raises(ConfigError, match="--num-shards and --shard-index"):
        resolve_work_split(4, None, {})
    with pytest.raises(ConfigError, match="--num-shards 2 --shard-index 2"):
        resolve_work_split(2, 2, {})
