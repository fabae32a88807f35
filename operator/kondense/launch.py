"""The command that runs a stage: one process, or torch's launcher around it.

Pure. The operator's Jobs and `kondense run` both take their command from `stage_command`, so
a stage runs the same way in a pod and on a laptop. A stage with more than one worker runs
under `python -m kondense_jobs.launch`, a thin wrapper of torch.distributed.run that keeps the
stage's exit code (torchrun itself exits 1 for any failed worker) and its termination message:

- one node: `--standalone` (torchrun picks a free local port, so parallel stages never collide);
- several nodes (an Indexed Job): c10d rendezvous at the pod of index 0, reached by its stable
  name `<job>-0.<service>` through the Job's headless Service.
"""

from __future__ import annotations

from kondense.api import Resources

RDZV_PORT = 29400
ENTRY = ["-m", "kondense_jobs"]
LAUNCHER = ["-m", "kondense_jobs.launch"]


def distributed(kind: str, resources: Resources, sharded: bool = False) -> bool:
    """Whether a stage runs under the launcher: a distill stage with more than one worker in all, or
    one sharded with FSDP (a world of one writes the same checkpoints as eight, so either resumes)."""
    return kind == "distill" and (resources.world_size > 1 or sharded)


def rendezvous_endpoint(job: str, service: str, port: int = RDZV_PORT) -> str:
    """The c10d store at the pod of completion index 0 (its hostname is `<job>-0` in the Service's subdomain)."""
    return f"{job}-0.{service}:{port}"


def stage_command(
    kind: str,
    stage_args: list[str],
    resources: Resources,
    python: str = "python",
    rendezvous: tuple[str, str] | None = None,
    sharded: bool = False,
) -> list[str]:
    """argv of a stage process. `rendezvous` is (endpoint, run id) for multi-node stages; `sharded`:
    the stage's student is sharded with FSDP (StageRun.sharded)."""
    if not distributed(kind, resources, sharded):
        return [python, *ENTRY, kind, *stage_args]
    launcher = [
        python, *LAUNCHER,
        "--nnodes", str(resources.nodes),
        "--nproc-per-node", str(resources.workers_per_node),
    ]
    if resources.nodes == 1:
        launcher.append("--standalone")
    else:
        if rendezvous is None:
            raise ValueError("a multi-node stage needs a rendezvous endpoint and id")
        endpoint, run_id = rendezvous
        launcher += ["--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    return [*launcher, "--", kind, *stage_args]
