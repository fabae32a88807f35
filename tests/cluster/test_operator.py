"""The operator end to end against a real kube-apiserver, etcd and kube-controller-manager.

The operator runs with the chart's RBAC as its ServiceAccount; the fake kubelet runs each Job
pod's real command (`python -m kondense_jobs ...`) as a local process; artifacts go to a local
S3 server. Jobs, pods, garbage collection and the Job controller are Kubernetes' own.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from controlplane import wait_for
from operator_harness import (
    RELEASE_NAMESPACE,
    apply,
    chart_rbac,
    install_crd,
    operator_service_account,
    running_operator,
    tools,
    wait_for_rbac,
)

from kondense import api, events, metrics
from kondense.manifests import LABEL_PIPELINE
from kondense.settings import Settings
from kondense.store import S3Store, join

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GROUP, VERSION, PLURAL = api.GROUP, api.VERSION, api.PLURAL
ALLOWED_IMAGES = ("registry.example/ml/",)  # besides the operator's own jobs image


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> Path:
    """A tokenizer, an (untrained) teacher and a smaller student, and a dataset: seconds to build."""
    from kondense_jobs import tiny

    root = tmp_path_factory.mktemp("inputs")
    texts = tiny.corpus(max_docs=300)
    tok = tiny.train_tokenizer(texts, vocab_size=512)
    tiny.build_model(root / "teacher", tok, "llama", layers=2, hidden=64, heads=4, seed=1)
    tiny.build_model(root / "student", tok, "llama", layers=1, hidden=64, heads=4, seed=2)
    tiny.write_jsonl(root / "dataset.jsonl", [{"text": t} for t in texts])
    return root


@pytest.fixture(scope="module")
def operator(control_plane, api_client):
    """CRD + chart RBAC installed; the operator running as the chart's ServiceAccount."""
    install_crd(api_client)
    rbac = chart_rbac()
    client.CoreV1Api(api_client).create_namespace({"metadata": {"name": RELEASE_NAMESPACE}}) if not any(
        n.metadata.name == RELEASE_NAMESPACE for n in client.CoreV1Api(api_client).list_namespace().items
    ) else None
    apply(api_client, rbac)
    account = operator_service_account(rbac)
    wait_for_rbac(api_client, f"system:serviceaccount:{RELEASE_NAMESPACE}:{account}", "default", [
        ("batch", "jobs", "create"), ("", "services", "create"),
        ("kondense.io", "compressionpipelines/finalizers", "update"),
        ("kondense.io", "compressionpipelines/status", "patch"), ("", "events", "create")])
    token = control_plane.service_account_token(RELEASE_NAMESPACE, account)
    settings = Settings(
        jobs_image="kondense-jobs:test", ttl_seconds_after_finished=3600, allowed_images=ALLOWED_IMAGES
    )
    with running_operator(control_plane, token, settings) as operator_client:
        yield operator_client


@pytest.fixture(scope="module")
def metrics_url(operator):
    """The in-process operator's /metrics endpoint, as the chart's Service reaches it."""
    server = metrics.serve("127.0.0.1", 0, lambda: (True, "test"))
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much the samples called `name` whose labels include `labels` grew between two scrapes."""
    def total(samples: dict) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())
    return total(after) - total(before)


def pipeline_doc(name: str, bucket: str, endpoint: str, stages: list[dict]) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "teacher": {"uri": f"{bucket}/inputs/teacher"},
            "student": {"uri": f"{bucket}/inputs/student"},
            "dataset": {"uri": f"{bucket}/inputs/dataset.jsonl", "evalSplit": 0.2},
            "storage": {"uri": f"{bucket}/artifacts", "endpoint": endpoint, "credentialsSecret": "s3"},
            "resources": {"gpus": 0, "backoffLimit": 0},
            "stages": stages,
        },
    }


STAGES = [
    {"name": "distill", "distill": {"method": "logits", "maxSteps": 4, "batchSize": 2, "maxSeqLength": 32,
                                    "learningRate": 1e-3, "checkpointEvery": 2}},
    {"name": "nf4", "quantize": {"method": "bnb-nf4", "computeDtype": "float32"}},
    {"name": "gguf", "quantize": {"method": "gguf", "type": "q8_0"}},
    {"name": "eval", "evaluate": {"of": ["student", "distill", "nf4", "gguf"], "baseline": "distill",
                                  "seqLength": 32, "maxEvalTokens": 512, "generateTokens": 4}},
]


# Fake credentials, distinctive enough to find anywhere they leak (the S3 server accepts any).
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAKONDENSELEAKTEST7",
    "AWS_SECRET_ACCESS_KEY": "kondense-leak-test-secret-9f3c2a7e",
    "HF_TOKEN": "hf_kondenseLeakTestToken4b8d1e",
}


class Captured(logging.Handler):
    """Every log record of this process (the operator's and kopf's), formatted with its arguments."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def operator_logs():
    root, handler = logging.getLogger(), Captured()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def workspace(api_client, namespace, s3_bucket, s3_endpoint, tiny_inputs, fake_kubelet):
    """The namespace as the chart prepares it (job ServiceAccount), the S3 Secret, the inputs in S3."""
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "kondense-job"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "stringData": SECRETS})
    store = S3Store(endpoint=s3_endpoint)
    files = [(p, join(s3_bucket, "inputs", p.relative_to(tiny_inputs).as_posix())) for p in tiny_inputs.rglob("*") if p.is_file()]
    store.upload(files)
    return namespace


def custom(api_client) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def get(api_client, namespace: str, name: str) -> dict:
    return custom(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def jobs(api_client, namespace: str) -> list[client.V1Job]:
    return client.BatchV1Api(api_client).list_namespaced_job(namespace).items


def wait_condition(api_client, namespace, name, type_, status="True", timeout=420):
    def check():
        obj = get(api_client, namespace, name)
        c = condition(obj, type_)
        failed = condition(obj, "Failed")
        if type_ != "Failed" and failed and failed["status"] == "True":
            raise AssertionError(f"pipeline failed: {failed['reason']}: {failed['message']}")
        return obj if c and c["status"] == status else None

    return wait_for(check, timeout=timeout, what=f"{name} {type_}={status}")


def test_demo_shaped_pipeline_end_to_end(
    operator, api_client, workspace, s3_bucket, s3_endpoint, control_plane, metrics_url, fake_kubelet, operator_logs
):
    ns = workspace
    scraped = scrape(metrics_url)
    body = pipeline_doc("e2e", s3_bucket, s3_endpoint, STAGES)
    # HF_TOKEN from a Secret, as a gated hf:// model needs it: it reaches the stage pods by reference.
    body["spec"]["resources"]["env"] = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "HF_TOKEN"}}}]
    custom(api_client).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    # The first stage's Job appears alone: its dependents wait for its artifact.
    try:
        first = wait_for(lambda: jobs(api_client, ns) or None, timeout=60, what="the first Job")
    except TimeoutError as e:  # say why: a refused Job is reported on its stage
        raise AssertionError(f"{e}; status: {get(api_client, ns, 'e2e').get('status')}") from None
    assert [j.metadata.labels["kondense.io/stage"] for j in first] == ["distill"]
    assert first[0].metadata.owner_references[0].kind == api.KIND

    done = wait_condition(api_client, ns, "e2e", "Ready")
    assert not done["metadata"].get("finalizers"), "deletionPolicy Retain (the default) needs no finalizer"
    st = done["status"]
    assert st["observedGeneration"] == done["metadata"]["generation"]
    assert [s["state"] for s in st["stages"]] == ["Succeeded"] * 4
    assert {c["type"]: c["status"] for c in st["conditions"]}["Succeeded"] == "True"
    assert st["progress"] == "4/4" and [r["variant"] for r in st["report"]["table"]] == ["student", "distill", "nf4", "gguf"]

    # The metrics endpoint counted the run: a Job and a duration per stage, reconciles, the phase.
    now = scrape(metrics_url)
    assert moved(scraped, now, "kondense_jobs_created_total", component="stage") == 4
    for kind, method, n in (("distill", "logits", 1), ("quantize", "bnb-nf4", 1), ("quantize", "gguf", 1),
                            ("evaluate", "evaluate", 1)):
        assert moved(scraped, now, "kondense_stage_duration_seconds_count", kind=kind, method=method,
                     state="Succeeded") == n, (kind, method)
    assert moved(scraped, now, "kondense_stage_duration_seconds_sum", kind="distill") > 0
    assert moved(scraped, now, "kondense_reconcile_duration_seconds_count", result="ok") >= 4
    assert moved(scraped, now, "kondense_stage_failures_total") == 0
    assert now[("kondense_pipelines", (("phase", "Succeeded"),))] >= 1

    # Every stage's artifact is committed in S3 under its content address.
    store = S3Store(endpoint=s3_endpoint)
    for s in st["stages"]:
        manifest = store.read_manifest(s["artifact"]["uri"])
        assert manifest is not None and manifest.input_digest == s["inputDigest"] and manifest.digest == s["artifact"]["digest"]

    # Secrets never leak: not in the operator's log lines, the stages' output and termination
    # messages, the status, the events or the Jobs.
    core = client.CoreV1Api(api_client)
    places = {
        "operator log": "\n".join(operator_logs),
        "status": json.dumps(done),
        "events": json.dumps([e.to_dict() for e in core.list_namespaced_event(ns).items], default=str),
        "jobs": json.dumps([j.to_dict() for j in jobs(api_client, ns)], default=str),
        "pods": json.dumps([p.to_dict() for p in core.list_namespaced_pod(ns).items], default=str),
    }
    outputs = sorted(fake_kubelet.workdir.rglob("output.log"))
    assert len(outputs) >= 4, outputs
    places |= {f"stage output {p.parent.name}": p.read_text(errors="replace") for p in outputs}
    assert len(operator_logs) > 50 and "Created Job" in places["operator log"]
    leaks = [(where, key) for where, text in places.items() for key, value in SECRETS.items() if value in text]
    assert not leaks, leaks

    # Jobs ran in DAG order: every quantize Job started after the distill Job completed.
    by_stage = {j.metadata.labels["kondense.io/stage"]: j for j in jobs(api_client, ns)}
    assert set(by_stage) == {"distill", "nf4", "gguf", "eval"}
    assert by_stage["nf4"].metadata.creation_timestamp >= by_stage["distill"].status.completion_time

    # kubectl shows the printer columns.
    kubeconfig = control_plane.kubeconfig
    out = subprocess.run([str(tools.kubectl()), "--kubeconfig", kubeconfig, "get", "cpl", "-n", ns],
                         check=True, capture_output=True, text=True).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "STAGE", "PROGRESS", "READY", "REASON", "AGE"]
    assert row.split()[:5] == ["e2e", "eval", "4/4", "True", "Succeeded"]
    wide = subprocess.run([str(tools.kubectl()), "--kubeconfig", kubeconfig, "get", "cpl", "-n", ns, "-o", "wide"],
                          check=True, capture_output=True, text=True).stdout
    header, row = wide.splitlines()[:2]
    assert header.split() == ["NAME", "STAGE", "PROGRESS", "READY", "REASON", "BEST", "SIZE", "GATES", "AGE"]
    report = get(api_client, ns, "e2e")["status"]["report"]
    assert row.split()[5:8] == [report["best"], f"{report['bestSizeRatio']:g}", "True"], wide
    assert report["best"] in ("nf4", "gguf") and report["bestSizeRatio"] < 1

    # GitOps: editing one quantize stage re-runs that stage and evaluate only.
    before = {j.metadata.name for j in jobs(api_client, ns)}
    patch = {"spec": {"stages": STAGES[:2] + [{"name": "gguf", "quantize": {"method": "gguf", "type": "q4_0"}}] + STAGES[3:]}}
    custom(api_client).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "e2e", patch)
    wait_for(lambda: (lambda o: o if o["status"].get("observedGeneration") == 2 and condition(o, "Ready")["status"] == "True" else None)(
        get(api_client, ns, "e2e")), timeout=300, what="the edited pipeline to be Ready again")
    new = {j.metadata.labels["kondense.io/stage"] for j in jobs(api_client, ns) if j.metadata.name not in before}
    assert new == {"gguf", "eval"}
    assert moved(now, scrape(metrics_url), "kondense_jobs_created_total", component="stage") == 2

    # Deleting the pipeline deletes its Jobs (garbage collection through owner references).
    custom(api_client).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "e2e")
    wait_for(lambda: not jobs(api_client, ns), timeout=60, what="the Jobs to be garbage-collected")
    assert store.read_manifest(st["stages"][0]["artifact"]["uri"]) is not None, "artifacts stay"


def test_delete_policy_removes_the_artifacts_before_the_pipeline_goes(operator, api_client, workspace, s3_bucket, s3_endpoint):
    ns = workspace
    body = pipeline_doc("doomed", s3_bucket, s3_endpoint, STAGES[:1])
    body["spec"]["storage"]["deletionPolicy"] = "Delete"
    custom(api_client).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    done = wait_condition(api_client, ns, "doomed", "Ready")
    assert done["metadata"]["finalizers"] == ["kondense.io/finalizer"]
    store = S3Store(endpoint=s3_endpoint)
    prefix = join(s3_bucket, "artifacts", ns, "doomed")
    assert store.read_manifest(done["status"]["stages"][0]["artifact"]["uri"]) is not None

    custom(api_client).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "doomed")

    def gone():
        try:
            get(api_client, ns, "doomed")
        except client.ApiException as e:
            return e.status == 404
        return False

    wait_for(gone, timeout=180, what="the pipeline to go once its artifacts are deleted")
    assert store.list_keys(prefix) == [], "every artifact under <storage>/<namespace>/<pipeline> is deleted"
    events = client.CoreV1Api(api_client).list_namespaced_event(ns, field_selector="involvedObject.name=doomed").items
    assert any(e.reason == "ArtifactsDeleted" for e in events), [(e.reason, e.message) for e in events]
    wait_for(lambda: not jobs(api_client, ns), timeout=60, what="the stage and cleanup Jobs to be garbage-collected")


def test_invalid_spec_gets_failed_condition_and_no_job_while_others_run(operator, api_client, workspace, s3_bucket, s3_endpoint):
    ns = workspace
    # Admitted (each field is valid) but not plannable: two nodes of CPU workers nobody asked for
    # (the stage inherits gpus: 0). Admission refuses what the fields alone decide (test_admission.py).
    bad = pipeline_doc("bad", s3_bucket, s3_endpoint, [
        {"name": "d", "distill": {"maxSteps": 1}, "resources": {"nodes": 2}},
    ])
    good = pipeline_doc("good", s3_bucket, s3_endpoint, [
        {"name": "gguf", "from": "student", "quantize": {"method": "gguf", "type": "q8_0"}},
    ])
    for body in (bad, good):
        custom(api_client).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    failed = wait_condition(api_client, ns, "bad", "Failed", timeout=60)
    c = condition(failed, "Failed")
    assert c["reason"] == "InvalidSpec" and "spec.stages[0].resources.nodes: 2 nodes with gpus 0" in c["message"]
    wait_condition(api_client, ns, "good", "Ready", timeout=300)
    assert all(j.metadata.labels["kondense.io/pipeline"] == "good" for j in jobs(api_client, ns))
    events = client.CoreV1Api(api_client).list_namespaced_event(ns, field_selector="involvedObject.name=bad").items
    assert any(e.reason == "InvalidSpec" for e in events)


def test_schema_rejects_what_the_crd_forbids(operator, api_client, workspace, s3_bucket, s3_endpoint):
    """The API server itself (schema + CEL) refuses bad objects; nothing reaches the operator."""
    cases = [
        ({"name": "x", "quantize": {"method": "gptq", "type": "q8_0"}}, "type is only for method gguf"),
        ({"name": "x", "distill": {}, "quantize": {"method": "gguf"}}, "exactly one of distill, quantize, evaluate"),
        ({"name": "x", "quantize": {"method": "gptq", "bits": 5}}, "Unsupported value: 5"),
        ({"name": "x", "distill": {"temprature": 2}}, 'unknown field "spec.stages[0].distill.temprature"'),
        ({"name": "x", "distill": {}, "resources": {"env": [{"name": "HOME", "value": "/"}]}},
         "HOME, TMPDIR, HF_HOME and KONDENSE_* are set by kondense"),
        ({"name": "x", "distill": {}, "resources": {"envFrom": [
            {"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]}},
         "exactly one of secretRef, configMapRef must be set"),
    ]
    for stage, message in cases:
        body = pipeline_doc("rejected", s3_bucket, s3_endpoint, [stage])
        with pytest.raises(client.ApiException) as e:
            custom(api_client).create_namespaced_custom_object(
                GROUP, VERSION, workspace, PLURAL, body, field_validation="Strict"
            )
        assert e.value.status in (400, 422) and message in json.loads(e.value.body)["message"], e.value.body


def test_failed_stage_reports_reason_and_hint(operator, api_client, workspace, s3_bucket, s3_endpoint, fake_kubelet):
    """An OOM-killed pod: the stage fails with OOMKilled and a hint; dependents are skipped."""
    from fakekubelet import PodOutcome

    fake_kubelet.behaviour = lambda pod: PodOutcome(137, "OOMKilled") if pod["metadata"]["labels"].get("kondense.io/stage") == "distill" else None
    custom(api_client).create_namespaced_custom_object(GROUP, VERSION, workspace, PLURAL, pipeline_doc("oom", s3_bucket, s3_endpoint, STAGES))
    obj = wait_condition(api_client, workspace, "oom", "Failed", timeout=120)
    stage = obj["status"]["stages"][0]
    assert stage["state"] == "Failed" and stage["reason"] == "OOMKilled" and "raise resources.memory" in stage["message"]
    assert [s["state"] for s in obj["status"]["stages"][1:]] == ["Skipped"] * 3
    assert condition(obj, "Ready")["reason"] == "OOMKilled"


# One optimizer step sees 4 sequences either way: 2 workers x batchSize 2, or 1 worker x batchSize 2
# x 2 accumulated micro-batches. Resources are not in a stage's content address; globalBatchSize is.
DATA_PARALLEL = {"method": "logits", "maxSteps": 4, "batchSize": 2, "globalBatchSize": 4, "maxSeqLength": 32,
                 "learningRate": 1e-3}
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def tensors_in(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        tensors.update(load_file(str(path)))
    assert tensors, f"no safetensors under {folder}"
    return tensors


def largest_difference(a: dict, b: dict) -> tuple[float, str]:
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a.keys() & b.keys())


def test_distill_on_two_nodes_is_an_indexed_job_that_trains_what_one_worker_trains(
    operator, api_client, workspace, s3_bucket, s3_endpoint, fake_kubelet, tiny_inputs, tmp_path
):
    """Two pods of one Indexed Job rendezvous (torchrun's c10d at index 0, found through the
    headless Service's name, which the fake kubelet resolves to this machine) and publish the
    student that one worker with the same global batch publishes."""
    ns, core = workspace, client.CoreV1Api(api_client)
    fake_kubelet.extra_env["LOGLEVEL"] = "INFO"  # torchrun's agents then log their rendezvous' result
    shapes = {"two-nodes": 2, "one-node": 1}
    for name, nodes in shapes.items():
        stage = {"name": "distill", "distill": DATA_PARALLEL, "resources": {"gpus": 0, "workers": 1, "nodes": nodes}}
        custom(api_client).create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, pipeline_doc(name, s3_bucket, s3_endpoint, [stage]))

    # The Indexed Job: one pod per node, host names in the subdomain of its headless Service.
    def indexed_job():
        return next((j for j in jobs(api_client, ns) if j.metadata.labels["kondense.io/pipeline"] == "two-nodes"), None)

    job = wait_for(indexed_job, timeout=60, what="the two-node stage's Job")
    jname, spec = job.metadata.name, job.spec
    assert (spec.completion_mode, spec.completions, spec.parallelism) == ("Indexed", 2, 2)
    subdomain = spec.template.spec.subdomain
    args = spec.template.spec.containers[0].args
    assert args[args.index("--rdzv-endpoint") + 1] == f"{jname}-0.{subdomain}:29400"
    assert args[args.index("--rdzv-id") + 1] == jname
    service = core.read_namespaced_service(subdomain, ns)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    assert service.spec.selector == {"batch.kubernetes.io/job-name": jname}
    assert [(o.kind, o.name) for o in service.metadata.owner_references] == [(api.KIND, "two-nodes")]

    try:
        done = {name: wait_condition(api_client, ns, name, "Ready", timeout=600) for name in shapes}
    except TimeoutError as e:  # say why: each pod's exit and the end of its log (a flake in CI once)
        pods = "\n".join(f"--- {r.name}: exit {r.exit_code} {r.reason or ''}\n{r.output()[-2500:]}"
                          for r in fake_kubelet.runs if r.namespace == ns)
        raise AssertionError(f"{e}\n{pods}") from e
    for obj in done.values():
        (stage,) = obj["status"]["stages"]
        assert stage["state"] == "Succeeded" and stage["artifact"]["uri"]
    assert done["two-nodes"]["status"]["stages"][0]["job"] == jname

    # Both pods ran here, each with its index, and met: torchrun's agents saw a world of two.
    # The pod of global rank 0 published (the rendezvous, not the index, decides which it is).
    pods = core.list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={jname}").items
    assert sorted(p.metadata.labels[COMPLETION_INDEX] for p in pods) == ["0", "1"]
    summaries = [events.parse_summary(p.status.container_statuses[0].state.terminated.message or "") for p in pods]
    published = [s.artifact.uri for s in summaries if s is not None and s.artifact is not None]
    assert published == [done["two-nodes"]["status"]["stages"][0]["artifact"]["uri"]]
    ranks = set()
    for pod in pods:
        run = fake_kubelet.run_for(ns, pod.metadata.name)
        assert run is not None and run.exit_code == 0, run and run.output()[-3000:]
        assert run.env["JOB_COMPLETION_INDEX"] == pod.metadata.labels[COMPLETION_INDEX]
        assert run.argv[run.argv.index("--rdzv-endpoint") + 1] == "127.0.0.1:29400"  # emulated DNS
        log = run.output()
        assert "group_world_size=2" in log and "global_world_sizes=[2]" in log, log[-3000:]
        ranks |= set(re.findall(r"group_rank=(\d+)", log))
    assert ranks == {"0", "1"}

    # The same student, to float32 rounding of a different summation order.
    store = S3Store(endpoint=s3_endpoint)
    uris = {name: obj["status"]["stages"][0]["artifact"]["uri"] for name, obj in done.items()}
    assert uris["two-nodes"] != uris["one-node"]
    for name in uris:
        store.fetch(uris[name], tmp_path / name)
    two, one = tensors_in(tmp_path / "two-nodes"), tensors_in(tmp_path / "one-node")
    assert two.keys() == one.keys()
    difference, where = largest_difference(two, one)
    assert difference <= 1e-5, f"largest difference {difference:.3g} in {where}"
    moved, _ = largest_difference(two, tensors_in(tiny_inputs / "student"))
    assert moved > 1e-4, "training moved the student's weights: the equality above says something"


def test_jobs_do_not_carry_the_pipelines_labels_and_an_image_not_allowed_gets_no_job(
    operator, api_client, workspace, s3_bucket, s3_endpoint
):
    """Argo CD tracks its objects by the label app.kubernetes.io/instance: a Job that carried its
    pipeline's would count as the application's own. And spec.image must be one the operator allows."""
    ns = workspace
    stages = [{"name": "gguf", "from": "student", "quantize": {"method": "gguf", "type": "q8_0"}}]
    tracked = pipeline_doc("tracked", s3_bucket, s3_endpoint, stages)
    tracked["metadata"]["labels"] = {"app.kubernetes.io/instance": "ml-apps"}
    foreign = pipeline_doc("foreign", s3_bucket, s3_endpoint, stages)
    foreign["spec"]["image"] = "registry.example/ml-other/miner:1"
    for body in (foreign, tracked):
        custom(api_client).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    failed = condition(wait_condition(api_client, ns, "foreign", "Failed", timeout=60), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "'registry.example/ml-other/miner:1' is not allowed" in failed["message"]
    assert "KONDENSE_ALLOWED_IMAGES" in failed["message"] and "registry.example/ml/" in failed["message"]

    wait_condition(api_client, ns, "tracked", "Ready", timeout=300)
    (job,) = jobs(api_client, ns)  # the foreign pipeline got none
    assert job.metadata.labels["kondense.io/pipeline"] == "tracked"
    for labels in (job.metadata.labels, job.spec.template.metadata.labels):
        assert "app.kubernetes.io/instance" not in labels, labels
    owners = [(o.kind, o.name, o.controller) for o in job.metadata.owner_references]
    assert owners == [(api.KIND, "tracked", True)]


# -- stage resources inherit; stages that cannot start say why; fixes take effect ------------

GGUF_ONLY = [{"name": "gguf", "from": "student", "quantize": {"method": "gguf", "type": "q8_0"}}]


def events_of(api_client, namespace: str, name: str) -> list[tuple[str, str]]:
    found = client.CoreV1Api(api_client).list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [(e.reason, e.message or "") for e in found.items]


def stage_of(api_client, namespace: str, name: str, stage: str = "gguf") -> dict:
    return next((s for s in (get(api_client, namespace, name).get("status") or {}).get("stages", [])
                 if s["name"] == stage), {})


def patch_spec(api_client, namespace: str, name: str, spec: dict) -> None:
    custom(api_client).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})


def test_stage_resources_hold_what_the_user_wrote_and_inherit_the_rest(
    operator, api_client, workspace, s3_bucket, s3_endpoint, control_plane
):
    ns = workspace
    body = pipeline_doc("inherit", s3_bucket, s3_endpoint, [{**GGUF_ONLY[0], "resources": {"memory": "2Gi"}}])
    body["spec"]["resources"] = {"gpus": 0, "activeDeadlineSeconds": 7200, "backoffLimit": 5}
    custom(api_client).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    stored = get(api_client, ns, "inherit")
    assert stored["spec"]["stages"][0]["resources"] == {"memory": "2Gi"}, "no schema default filled in"
    job = wait_for(lambda: next(iter(jobs(api_client, ns)), None), timeout=60, what="the stage's Job")
    assert (job.spec.active_deadline_seconds, job.spec.backoff_limit) == (7200, 5)
    container = job.spec.template.spec.containers[0]
    assert container.resources.limits["memory"] == "2Gi" and "nvidia.com/gpu" not in container.resources.limits
    # What the API documents as a default or a range, `kubectl explain` shows.
    explain = lambda path: " ".join(subprocess.run(  # noqa: E731 - the words, as kubectl wraps its lines
        [str(tools.kubectl()), "--kubeconfig", control_plane.kubeconfig, "explain", path],
        check=True, capture_output=True, text=True).stdout.split())
    assert "Default: 1." in explain("cpl.spec.resources.gpus") and "<= 16" in explain("cpl.spec.resources.gpus")
    assert "Unset: spec.resources.gpus." in explain("cpl.spec.stages.resources.gpus")


def test_an_unschedulable_stage_is_pending_with_the_schedulers_words_and_rebuilt_when_resources_change(
    operator, api_client, workspace, s3_bucket, s3_endpoint
):
    ns = workspace
    greedy = [{**GGUF_ONLY[0], "resources": {"gpus": 16}}]  # the node has 8
    custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, pipeline_doc("greedy", s3_bucket, s3_endpoint, greedy))
    stage = wait_for(lambda: (lambda s: s if s.get("reason") == "Unschedulable" else None)(
        stage_of(api_client, ns, "greedy")), timeout=60, what="the stage to say Unschedulable")
    assert stage["state"] == "Pending" and "1 Insufficient nvidia.com/gpu" in stage["message"] and "hint:" in stage["message"]
    assert "metrics" not in stage, "no empty Metrics: in kubectl describe"
    ready = condition(get(api_client, ns, "greedy"), "Ready")
    assert ready["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in ready["message"]
    assert any(r == "Unschedulable" for r, _ in events_of(api_client, ns, "greedy"))
    (old,) = jobs(api_client, ns)

    patch_spec(api_client, ns, "greedy", {"stages": [{**GGUF_ONLY[0], "resources": {"gpus": 0}}]})
    done = wait_condition(api_client, ns, "greedy", "Ready", timeout=300)
    (new,) = jobs(api_client, ns)
    assert new.metadata.name == old.metadata.name and new.metadata.uid != old.metadata.uid, "rebuilt, same name"
    assert "nvidia.com/gpu" not in (new.spec.template.spec.containers[0].resources.limits or {})
    assert done["status"]["stages"][0]["inputDigest"] == stage["inputDigest"], "the artifact's address did not move"
    assert any(r == "JobDeleted" and old.metadata.name in m for r, m in events_of(api_client, ns, "greedy"))


def test_a_stage_pending_past_its_timeout_fails_and_a_failed_stage_reruns_on_a_retry_annotation(
    operator, api_client, workspace, s3_bucket, s3_endpoint, fake_kubelet
):
    from fakekubelet import PodOutcome

    ns = workspace
    stuck = [{**GGUF_ONLY[0], "resources": {"gpus": 16, "pendingTimeoutSeconds": 3}}]
    custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, pipeline_doc("stuck", s3_bucket, s3_endpoint, stuck))
    failed = condition(wait_condition(api_client, ns, "stuck", "Failed", timeout=60), "Failed")
    assert failed["reason"] == "Unschedulable" and "pending for more than 3s" in failed["message"]
    wait_for(lambda: not jobs(api_client, ns), timeout=30, what="the stuck Job to be deleted")

    # A failure that a retry can cure (a node lost mid-run, say): kondense.io/retry runs it again.
    fake_kubelet.behaviour = lambda pod: PodOutcome(137, "OOMKilled")
    custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, pipeline_doc("flaky", s3_bucket, s3_endpoint, GGUF_ONLY))
    assert condition(wait_condition(api_client, ns, "flaky", "Failed", timeout=120), "Failed")["reason"] == "OOMKilled"
    fake_kubelet.behaviour = None
    custom(api_client).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "flaky", {"metadata": {"annotations": {"kondense.io/retry": "1"}}})
    done = wait_condition(api_client, ns, "flaky", "Ready", timeout=300)
    assert done["status"]["stages"][0]["state"] == "Succeeded"
    assert condition(done, "Failed")["status"] == "False" and condition(done, "Failed")["reason"] == "NoStageFailed"


def test_a_missing_secret_or_priority_class_leaves_the_stage_pending_with_the_reason(
    operator, api_client, workspace, s3_bucket, s3_endpoint
):
    ns = workspace
    no_secret = pipeline_doc("no-secret", s3_bucket, s3_endpoint, GGUF_ONLY)
    no_secret["spec"]["storage"]["credentialsSecret"] = "s3-missing"
    no_class = pipeline_doc("no-class", s3_bucket, s3_endpoint, GGUF_ONLY)
    no_class["spec"]["resources"]["priorityClassName"] = "ml-batch"
    for body in (no_secret, no_class):
        custom(api_client).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    def reason_is(name: str, reason: str):
        return lambda: (lambda s: s if s.get("reason") == reason else None)(stage_of(api_client, ns, name))

    config = wait_for(reason_is("no-secret", "ConfigError"), timeout=60, what="no-secret to say ConfigError")
    assert "s3-missing" in config["message"] and "credentialsSecret" in config["message"]
    # The Job controller cannot create the pod; only its FailedCreate event says why, and the
    # operator looks for it on a timer, since neither the Job nor a pod changes.
    create = wait_for(reason_is("no-class", "PodCreateFailed"), timeout=90, what="no-class to say PodCreateFailed")
    assert "ml-batch" in create["message"] and "PriorityClass" in create["message"]
    assert any(r == "PodCreateFailed" for r, _ in events_of(api_client, ns, "no-class"))

    client.CoreV1Api(api_client).create_namespaced_secret(ns, {"metadata": {"name": "s3-missing"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}})
    wait_condition(api_client, ns, "no-secret", "Ready", timeout=300)


def test_deleting_the_namespace_is_not_wedged_by_a_cleanup_that_cannot_run(operator, api_client, s3_bucket, s3_endpoint):
    core = client.CoreV1Api(api_client)
    ns = f"doomed-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    body = pipeline_doc("kept", s3_bucket, s3_endpoint, GGUF_ONLY)
    body["spec"]["storage"]["deletionPolicy"] = "Delete"
    custom(api_client).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for(lambda: get(api_client, ns, "kept").get("metadata", {}).get("finalizers"), timeout=30,
             what="the operator's finalizer")
    core.delete_namespace(ns)

    def gone():
        try:
            core.read_namespace(ns)
        except client.ApiException as e:
            return e.status == 404
        return False

    wait_for(gone, timeout=120, what="the namespace to go although no cleanup Job could start in it")


def test_the_operator_lists_and_watches_only_the_jobs_and_pods_of_pipelines(operator, control_plane):
    """kopf applies a handler's labels= itself, to whatever its watch brought in; the API server
    filters only what a request asks for. Every list and watch of Jobs and pods the operator makes
    carries the pipeline label's selector, so other applications' pods never come over the wire."""
    wanted = {(verb, resource) for verb in ("list", "watch") for resource in ("jobs", "pods")}

    def made():  # kopf's requests, as the operator's ServiceAccount (tests list pods as it too)
        requests = [e for e in control_plane.audit_events() if e.get("userAgent", "").startswith("kopf/")
                    and e["user"]["username"].startswith(f"system:serviceaccount:{RELEASE_NAMESPACE}:")
                    and (e["verb"], e.get("objectRef", {}).get("resource")) in wanted]
        return requests if {(e["verb"], e["objectRef"]["resource"]) for e in requests} >= wanted else None

    requests = wait_for(made, timeout=30, what="the operator's lists and watches of Jobs and pods")
    for request in requests:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request["requestURI"]).query)
        assert query.get("labelSelector") == [LABEL_PIPELINE], request["requestURI"]
