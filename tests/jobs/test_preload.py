"""`kondense run`'s preloaded interpreter (kondense_jobs.zygote, kondense.preload): a stage forked
from it is the command it replaces, in output, exit code, signals and artifact."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
from kondense import preload
from kondense.api import CompressionPipeline

PROBE = """
import atexit, json, os, sys, threading, time
import random
seeds = {"random": random.random()}
if "torch" in sys.modules:
    seeds["torch"] = sys.modules["torch"].initial_seed()
print(json.dumps({"argv": sys.argv[1:], "name": __name__, "torch": "torch" in sys.modules, "seeds": seeds}), flush=True)
atexit.register(lambda: print("atexit", flush=True))
def later():
    time.sleep(0.3)
    print("thread", flush=True)
if sys.argv[1] == "ctrl-c-in-start":  # Ctrl-C landing inside Thread.start(), as it can: the thread stays unstarted
    def interrupted(*args):
        raise KeyboardInterrupt
    threading._start_new_thread = interrupted
threading.Thread(target=later).start()  # not a daemon: the interpreter waits for it before atexit
if sys.argv[1] == "sleep":
    time.sleep(60)
if sys.argv[1] == "raise":
    raise ValueError("from the probe")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def probe_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    (folder / "kondense_probe.py").write_text(PROBE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def zygote(probe_env, tmp_path_factory):
    with open(tmp_path_factory.mktemp("zygote") / "zygote.log", "w") as log:
        z = preload.Zygote(sys.executable, probe_env, log)
    yield z
    z.close()


def _fresh(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kondense_probe", *args], check=False, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("args", [["7", "two words"], ["0"], ["raise"]])
def test_a_forked_module_runs_as_python_m_runs_it(zygote, probe_env, args):
    child = zygote.spawn("kondense_probe", args)
    forked = child.stdout.read().splitlines()
    code = child.wait(30)
    fresh = _fresh(probe_env, *args)
    assert code == fresh.returncode == {"7": 7, "0": 0, "raise": 1}[args[0]]
    first, fresh_first = json.loads(forked[0]), json.loads(fresh.stdout.splitlines()[0])
    assert first["argv"] == fresh_first["argv"] == args and first["name"] == fresh_first["name"] == "__main__"
    assert first["torch"] and not fresh_first["torch"]  # what the fork saves: torch is already imported
    # interpreter shutdown as python does it: the thread is joined, then atexit runs
    assert [line for line in forked if line in ("thread", "atexit")] == ["thread", "atexit"]
    assert fresh.stdout.splitlines()[1:] == ["thread", "atexit"]
    if args[0] == "0":  # each child seeds itself as a new interpreter does, not with the zygote's state
        again = json.loads(zygote.spawn("kondense_probe", ["0"]).stdout.readline())
        assert again["seeds"]["random"] != first["seeds"]["random"] and again["seeds"]["torch"] != first["seeds"]["torch"]
    if args[0] == "raise":  # the traceback on the child's stderr, which is the same pipe
        assert "ValueError: from the probe" in "\n".join(forked) and "ValueError: from the probe" in fresh.stderr


def test_ctrl_c_reaches_the_child_and_a_kill_is_reported_as_the_signal(zygote):
    child = zygote.spawn("kondense_probe", ["sleep"])
    assert json.loads(child.stdout.readline())["argv"] == ["sleep"]
    child.send_signal(signal.SIGINT)  # the zygote ignores SIGINT; the child raises KeyboardInterrupt
    assert child.wait(30) == 130
    assert "KeyboardInterrupt" in child.stdout.read()

    # a Ctrl-C that lands while the stage starts a thread: still 130, and atexit still runs
    child = zygote.spawn("kondense_probe", ["ctrl-c-in-start"])
    assert child.wait(30) == 130
    assert child.stdout.read().splitlines()[-1] == "atexit"

    child = zygote.spawn("kondense_probe", ["sleep"])
    child.stdout.readline()
    child.kill()
    assert child.wait(30) == -signal.SIGKILL
    child = zygote.spawn("kondense_probe", ["sleep"])
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    child.kill()
    assert child.wait(30) == -signal.SIGKILL


def test_children_of_a_zygote_that_died_fail_instead_of_hanging(probe_env, tmp_path):
    with open(tmp_path / "zygote.log", "w") as log:
        z = preload.Zygote(sys.executable, probe_env, log)
    child = z.spawn("kondense_probe", ["sleep"])
    child.stdout.readline()
    z.proc.kill()
    try:
        assert child.wait(30) == 1 and child.error == "the preloaded interpreter exited"
        assert z.spawn("kondense_probe", ["0"]) is None  # the runner starts a plain process instead
    finally:
        os.kill(child.pid, signal.SIGKILL)
        z.close()


def test_preloading_applies_on_linux_without_a_gpu_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(preload, "gpu_devices", lambda: False)
    assert preload.wanted({}) is True and preload.wanted({"KONDENSE_PRELOAD": "0"}) is False
    monkeypatch.setattr(preload, "gpu_devices", lambda: True)  # CUDA cannot be used in a forked child
    assert preload.wanted({}) is False
    assert preload.module_of(["py", "-m", "kondense_jobs", "distill", "--spec", "s"]) == ("kondense_jobs", ["distill", "--spec", "s"])
    assert preload.module_of(["py", "-m", "kondense_jobs.launch", "--nnodes", "1"]) is None  # torchrun's workers


def _pipeline(tmp_path, tiny_teacher, tiny_dataset, name: str) -> CompressionPipeline:
    return CompressionPipeline.model_validate({
        "apiVersion": "kondense.io/v1alpha1", "kind": "CompressionPipeline", "metadata": {"name": name},
        "spec": {
            "teacher": {"uri": f"file://{tiny_teacher}"}, "student": {"uri": f"file://{tiny_teacher}"},
            "dataset": {"uri": f"file://{tiny_dataset}"}, "storage": {"uri": f"file://{tmp_path}/store"},
            "resources": {"gpus": 0},
            "stages": [{"name": "nf4", "from": "teacher", "quantize": {"method": "bnb-nf4"}},
                       {"name": "bad", "from": "teacher", "quantize": {"method": "gptq", "ignore": ["no_such_module"]}}],
        },
    })


def test_the_runner_forks_its_stages_and_they_publish_what_a_plain_process_publishes(tmp_path, tiny_teacher, tiny_dataset, monkeypatch):
    from kondense.local import LocalRunner

    monkeypatch.setattr(preload, "gpu_devices", lambda: False)
    results = {}
    for mode in ("1", "0"):
        runner = LocalRunner(_pipeline(tmp_path / mode, tiny_teacher, tiny_dataset, "p"), tmp_path / mode / "state",
                             out=io.StringIO(), env={"KONDENSE_PRELOAD": mode})
        stages = {s.name: s for s in runner.run().stages}
        results[mode] = (runner.forked, stages)
    forked, stages = results["1"]
    plain, plain_stages = results["0"]
    assert sorted(forked) == ["bad", "nf4"] and plain == []
    # the same artifact, byte for byte, and the same failure, reason and message
    assert stages["nf4"].state == plain_stages["nf4"].state == "Succeeded"
    assert stages["nf4"].artifact.digest == plain_stages["nf4"].artifact.digest
    assert (stages["bad"].state, stages["bad"].reason) == (plain_stages["bad"].state, plain_stages["bad"].reason) == ("Failed", "InvalidSpec")
    assert stages["bad"].message == plain_stages["bad"].message
    assert (tmp_path / "1/state/logs/nf4.log").read_text().count('"kondense":"progress"') >= 2  # progress through the pipe
