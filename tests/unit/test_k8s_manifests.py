"""k8s/ validates against the Kubernetes schemas offline and agrees with itself."""

from __future__ import annotations

import pathlib

import kubernetes_validate
import pytest
import yaml

from tokenforge.catalog import parse_catalog

K8S = pathlib.Path(__file__).resolve().parents[2] / "k8s"
K8S_VERSION = "1.30.0"


def _documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def test_every_manifest_file_is_listed_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_kubernetes(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_services_find_each_other_and_probe_their_ports() -> None:
    docs = _documents()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    env_cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tokenforge-env")["data"]
    for var in ("TF_LEDGER_ADDR", "TF_METERING_ADDR", "TF_ROUTER_ADDR"):
        host, port = env_cm[var].split(":")
        assert host in services, var
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    for dep in (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("tokenforge-")):
        container = dep["spec"]["template"]["spec"]["containers"][0]
        port = container["ports"][0]["containerPort"]
        probe = container["readinessProbe"]
        assert (probe.get("grpc") or probe.get("httpGet"))["port"] == port
        assert dep["metadata"]["name"] in services
        assert container["args"][1] in ("ledger", "metering", "router", "edge")


def test_the_catalog_configmap_is_a_valid_catalog_with_credentials_from_secrets() -> None:
    docs = _documents()
    catalog_text = next(d for d in docs if d["metadata"]["name"] == "tokenforge-catalog")["data"]["catalog.yaml"]
    catalog = parse_catalog(yaml.safe_load(catalog_text), source="k8s/config.yaml", env={})
    keys = next(d for d in docs if d["metadata"]["name"] == "tokenforge-upstream-keys")["stringData"]
    assert {c.api_key_env for c in catalog.channels.values()} <= set(keys)


def test_only_the_router_and_edge_can_reach_the_ledger() -> None:
    docs = _documents()
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "ledger-callers")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "tokenforge-ledger"}
    allowed = {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in policy["spec"]["ingress"][0]["from"]}
    assert allowed == {"tokenforge-router", "tokenforge-edge"}
