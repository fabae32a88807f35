"""Operator settings from the environment, and the image policy they carry."""

from __future__ import annotations

import pytest

from kondense.api import PipelineSpec
from kondense.errors import InvalidSpec
from kondense.manifests import jobs_image
from kondense.settings import Settings

OWN = "ghcr.io/kondense/kondense-jobs:0.1.0"


def spec(image: str | None) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "teacher": {"uri": "s3://models/t"}, "student": {"uri": "s3://models/s"},
        "dataset": {"uri": "s3://data/x.jsonl"}, "storage": {"uri": "s3://bucket/p"},
        "image": image, "stages": [{"name": "q", "quantize": {"method": "gguf"}}],
    })


@pytest.mark.parametrize(
    "raw, allowed",
    [(None, ()), ("", ()), ("registry.example/ml/", ("registry.example/ml/",)),
     (" registry.example/ml/ , ghcr.io/acme/jobs:1.2 ,", ("registry.example/ml/", "ghcr.io/acme/jobs:1.2"))],
    ids=["unset", "empty", "one", "two-with-spaces"],
)
def test_allowed_images_are_read_from_the_environment(raw, allowed):
    env = {} if raw is None else {"KONDENSE_ALLOWED_IMAGES": raw}
    assert Settings.from_env(env).allowed_images == allowed


@pytest.mark.parametrize(
    "allowed, image, expected",
    [
        ((), "anything.example/x:1", "anything.example/x:1"),  # empty: any image
        ((), None, OWN),
        (("registry.example/ml/",), "registry.example/ml/jobs:2", "registry.example/ml/jobs:2"),
        (("registry.example/ml/",), None, OWN),
        (("registry.example/ml/",), OWN, OWN),  # the operator's own image is always allowed
        (("registry.example/ml/", "ghcr.io/acme/jobs:1.2"), "ghcr.io/acme/jobs:1.2", "ghcr.io/acme/jobs:1.2"),
    ],
    ids=["any", "default-any", "prefix", "default", "own-image", "second-prefix"],
)
def test_allowed_images(allowed, image, expected):
    assert jobs_image(spec(image), Settings(jobs_image=OWN, allowed_images=allowed)) == expected


@pytest.mark.parametrize(
    "image", ["registry.example/ml-other/jobs:2", "registry.example/jobs:2", "evil.example/x"],
    ids=["sibling", "parent", "elsewhere"],
)
def test_an_image_outside_the_allowed_prefixes_is_an_invalid_spec_naming_the_setting(image):
    settings = Settings(jobs_image=OWN, allowed_images=("registry.example/ml/", "ghcr.io/acme/"))
    with pytest.raises(InvalidSpec) as e:
        jobs_image(spec(image), settings)
    message = str(e.value)
    assert message.startswith(f"spec.image: {image!r} is not allowed")
    assert "KONDENSE_ALLOWED_IMAGES" in message and "jobs.allowedImages" in message
    assert "registry.example/ml/, ghcr.io/acme/" in message and OWN in message


@pytest.mark.parametrize(
    "env, endpoint",
    [
        ({}, "http://0.0.0.0:8080/healthz"),
        ({"KONDENSE_LIVENESS_HOST": "127.0.0.1", "KONDENSE_LIVENESS_PORT": "9090"}, "http://127.0.0.1:9090/healthz"),
        ({"KONDENSE_LIVENESS_HOST": "::"}, "http://[::]:8080/healthz"),
        ({"KONDENSE_LIVENESS_HOST": "0:0::1"}, "http://[::1]:8080/healthz"),  # written as Python reads it
    ],
    ids=["default", "loopback", "dual-stack", "ipv6-normalised"],
)
def test_the_liveness_endpoint_binds_where_the_environment_says(env, endpoint):
    assert Settings.from_env(env).liveness_endpoint == endpoint


@pytest.mark.parametrize(
    "env, message",
    [
        ({"KONDENSE_LIVENESS_HOST": "localhost"}, "KONDENSE_LIVENESS_HOST='localhost': expected an IP address"),
        ({"KONDENSE_LIVENESS_HOST": "0.0.0.0:8080"}, "expected an IP address"),
        ({"KONDENSE_LIVENESS_PORT": "0"}, "KONDENSE_LIVENESS_PORT=0: expected a port from 1 to 65535"),
        ({"KONDENSE_LIVENESS_PORT": "http"}, "KONDENSE_LIVENESS_PORT='http': expected an integer"),
    ],
    ids=["hostname", "host-and-port", "port-zero", "port-not-a-number"],
)
def test_a_bad_liveness_address_stops_the_operator_with_the_variable_named(env, message):
    with pytest.raises(SystemExit) as stopped:
        Settings.from_env(env)
    assert message in str(stopped.value)
