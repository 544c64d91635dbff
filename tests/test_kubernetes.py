"""contrib/kubernetes/: every manifest is valid Kubernetes, and fits mailgate.

kubernetes-validate (a test dependency) checks each document of each file against the
OpenAPI schemas it ships (no cluster, no network), strictly: an unknown field is an error,
as a misspelt one would be silently dropped by an apply. Broken copies of the StatefulSet
must fail the same check, so the check cannot pass by checking nothing. Then what the
schemas cannot know: the ConfigMap's mailgate.toml and tables pass `mailgate check`, the pods'
ports are the config's, and the grace period covers the preStop drain and the stop after it.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mailgate.cli import STOP_MARGIN
from mailgate.config import parse_duration
from tests.support.gateway import run_cli

MANIFESTS = Path(__file__).resolve().parent.parent / "contrib" / "kubernetes"
# The oldest Kubernetes the manifests are for (persistentVolumeClaimRetentionPolicy is GA
# from 1.32) and the newest whose schemas the package has.
VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def resources() -> dict[str, dict[str, Any]]:
    """Every document of every manifest, by kind."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in documents(path):
            out.setdefault(doc["kind"], doc)
    return out


def validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS.iterdir()} >= {
        "configmap.yaml",
        "service.yaml",
        "statefulset.yaml",
    }
    assert set(resources()) >= {"ConfigMap", "Service", "StatefulSet"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("*.yaml")), ids=lambda p: p.name)
def test_each_manifest_is_valid(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path} has no document"
    for doc in docs:
        validate(doc, version)


def broken(change: str) -> dict[str, Any]:
    doc = copy.deepcopy(resources()["StatefulSet"])
    pod = doc["spec"]["template"]["spec"]
    if change == "wrong type":
        doc["spec"]["replicas"] = "two"
    elif change == "unknown field":
        pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    elif change == "required field missing":
        del doc["spec"]["selector"]
    elif change == "bad value":
        pod["containers"][0]["ports"][0]["containerPort"] = "smtp"
    return doc


@pytest.mark.parametrize(
    "change", ["wrong type", "unknown field", "required field missing", "bad value"]
)
def test_a_broken_manifest_fails_the_check(change: str) -> None:
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken(change), VERSIONS[-1])


def test_the_shared_config_passes_mailgate_check(tmp_path: Path) -> None:
    """The ConfigMap's files as the pod mounts them, under ``tmp_path`` instead of /."""
    mounted = tmp_path / "etc" / "mailgate"
    mounted.mkdir(parents=True)
    for name, text in resources()["ConfigMap"]["data"].items():
        for folder in ("/etc/mailgate", "/var/spool/mailgate"):
            text = text.replace(f'"{folder}"', f'"{tmp_path}{folder}"')
        (mounted / name).write_text(text)
    config = mounted / "mailgate.toml"
    assert str(tmp_path / "var") in config.read_text()  # the spool moved too
    done = run_cli("check", "-c", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


def test_the_pods_fit_the_config() -> None:
    kinds = resources()
    settings = tomllib.loads(kinds["ConfigMap"]["data"]["mailgate.toml"])
    pod = kinds["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (listen,) = settings["listen"]
    assert listen.rsplit(":", 1)[1] == str(ports["smtp"])
    assert settings["metrics"]["listen"].rsplit(":", 1)[1] == str(ports["metrics"])
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/health", "metrics")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert settings["spool_dir"] == mounts["spool"]
    assert container["command"][-1] == f"{mounts['config']}/mailgate.toml"
    claims = [c["metadata"]["name"] for c in kinds["StatefulSet"]["spec"]["volumeClaimTemplates"]]
    assert claims == ["spool"]  # one claim per pod: each node's queue is its own

    # The drain's deadline, then a stop (stop_grace and the command's margin), within the
    # grace period: the kubelet's SIGKILL must never cut the drain or the stop short.
    drain = container["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[:2] == ["mailgate", "drain"]
    deadline = parse_duration(drain[drain.index("--deadline") + 1])
    stop_grace = parse_duration(settings["stop_grace"])
    assert pod["terminationGracePeriodSeconds"] >= deadline + stop_grace + STOP_MARGIN
