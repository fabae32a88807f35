"""runtime.cpu_budget: a pod's CPU limit (a CFS quota) caps the threads a stage starts."""

from __future__ import annotations

import os

import pytest

from kondense_jobs.runtime import cpu_budget

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, AFFINITY),  # no cgroup files: the affinity mask
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # no limit
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, min(AFFINITY, 2)),  # 1.5 CPUs: 2 threads
        ({"cpu.max": "50000 100000\n"}, 1),  # below one CPU: still one thread
        ({"cpu.max": "6400000 100000\n"}, AFFINITY),  # a quota above the affinity changes nothing
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),  # v1, no limit
        ({"cpu.max": "garbage\n"}, AFFINITY),
    ],
)
def test_cpu_budget(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_budget(tmp_path) == expected
