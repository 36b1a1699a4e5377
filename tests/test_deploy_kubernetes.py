"""deploy/kubernetes: the base and its overlays render with `kubectl kustomize`, and their wiring holds.

Shard index and count, probes, selectors, the data dir and the config are checked on the rendered objects;
the ConfigMap's syncd.toml is loaded by syncd's own loader with the environment a pod would get, and run as a
pod would run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from syncd.app import FLUSH_TIMEOUT, INFLIGHT_TIMEOUT
from syncd.errors import ConfigError
from syncd.settings import Settings, load
from syncd.sim.broker import free_port
from syncd.sim.common import sims_in_thread
from syncd.sim.iotopen import IotOpenSim

KUBE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
BASE = KUBE / "base"
CLUSTER = KUBE / "overlays" / "clickhouse-cluster"
POD_INDEX_LABEL = "metadata.labels['apps.kubernetes.io/pod-index']"
POD_LABELS = {"app.kubernetes.io/name": "syncd"}
SECRET_KEYS = {"IOTOPEN_API_KEY", "CLICKHOUSE_PASSWORD"}
# Whatever the image's ENV says, the manifest must not depend on it: the pod's own env has to win.
IMAGE_ENV = {"SYNCD_SYNCD__DATA_DIR": "/image/default", "SYNCD_SYNCD__HTTP": "127.0.0.1:1"}
Obj = dict[str, Any]


def kubectl(*args: str, stdin: str | None = None) -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is not on PATH: these tests render deploy/kubernetes with `kubectl kustomize`; install kubectl")
    # No cluster is involved: an empty kubeconfig makes sure nothing is asked of one.
    r = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "KUBECONFIG": os.devnull})
    assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr}"
    return r.stdout


def as_objects(manifest_yaml: str) -> list[Obj]:
    """YAML documents as dicts, by kubectl itself (no YAML library here): removing a label no object has
    (`--local`, no server) prints each object unchanged as JSON."""
    text = kubectl("label", "--local", "-f", "-", "-o", "json", "syncd-test-absent-", stdin=manifest_yaml)
    decoder, objects, rest = json.JSONDecoder(), [], text.lstrip()
    while rest:
        obj, end = decoder.raw_decode(rest)
        objects.append(obj)
        rest = rest[end:].lstrip()
    return objects


def render(directory: Path) -> list[Obj]:
    return as_objects(kubectl("kustomize", str(directory)))


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def container(objects: list[Obj]) -> Obj:
    (c,) = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert c["name"] == "syncd"
    return c  # type: ignore[no-any-return]


def env_entry(objects: list[Obj], name: str) -> Obj:
    (entry,) = [e for e in container(objects)["env"] if e["name"] == name]
    return entry  # type: ignore[no-any-return]


def secret_example() -> Obj:
    (secret,) = as_objects((BASE / "secret.example.yaml").read_text())
    return secret


def pod_env(objects: list[Obj], index: int) -> dict[str, str]:
    """The environment Kubernetes gives pod `index`: the image's, the Secret's keys (envFrom), then `env`."""
    sts = one(objects, "StatefulSet")
    (source,) = container(objects)["envFrom"]
    assert source == {"secretRef": {"name": secret_example()["metadata"]["name"]}}
    env = {**IMAGE_ENV, **secret_example()["stringData"]}
    fields = {POD_INDEX_LABEL: str(index), "metadata.name": f"{sts['metadata']['name']}-{index}"}
    for e in container(objects)["env"]:
        if "value" in e:
            assert "$(" not in e["value"], f"{e['name']}: Kubernetes would expand $(...); this test does not"
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def config_file(objects: list[Obj], tmp: Path) -> Path:
    path = tmp / "syncd.toml"
    path.write_text(one(objects, "ConfigMap")["data"]["syncd.toml"])
    return path


def pod_settings(objects: list[Obj], index: int, tmp: Path) -> Settings:
    return load(config_file(objects, tmp), env=pod_env(objects, index))


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(BASE)


@pytest.fixture(scope="module")
def cluster() -> list[Obj]:
    return render(CLUSTER)


def kinds(objects: list[Obj]) -> list[tuple[str, str]]:
    named = [(o["kind"], re.sub(r"^syncd-config-[a-z0-9]{10}$", "syncd-config-<hash>", o["metadata"]["name"]))
             for o in objects]
    return sorted(named)


EVERY_KIND = [("ConfigMap", "syncd-config-<hash>"), ("PodDisruptionBudget", "syncd"), ("Service", "syncd"),
              ("Service", "syncd-metrics"), ("StatefulSet", "syncd")]


def test_base_and_overlay_render_every_kind(base: list[Obj], cluster: list[Obj]) -> None:
    assert kinds(base) == EVERY_KIND
    assert kinds(cluster) == EVERY_KIND
    for obj in base + cluster:
        assert obj["metadata"]["labels"] == POD_LABELS, obj["kind"]


@pytest.mark.parametrize(("which", "count"), [("base", 1), ("cluster", 3)])
def test_shard_index_from_the_pod_label_and_count_from_replicas(which: str, count: int, request: pytest.FixtureRequest,
                                                                tmp_path: Path) -> None:
    objects: list[Obj] = request.getfixturevalue(which)
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == count
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert env_entry(objects, "POD_INDEX") == {"name": "POD_INDEX", "valueFrom": {"fieldRef": {"fieldPath": POD_INDEX_LABEL}}}
    assert env_entry(objects, "SHARD_COUNT") == {"name": "SHARD_COUNT", "value": str(count)}
    assert env_entry(objects, "SYNCD_SYNCD__SHARD") == {"name": "SYNCD_SYNCD__SHARD", "value": "${POD_INDEX}/${SHARD_COUNT}"}
    assert env_entry(objects, "SYNCD_SYNCD__INSTANCE") == {
        "name": "SYNCD_SYNCD__INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    for index in range(count):
        settings = pod_settings(objects, index, tmp_path)
        assert settings.syncd.shard_index == (index, count)
        assert settings.syncd.instance == f"syncd-{index}"


def test_an_overlay_that_changes_replicas_changes_the_shard_count(tmp_path: Path) -> None:
    """The recipe the base documents: `replicas` plus the shard-count transformer, nothing else."""
    rel = os.path.relpath(KUBE, tmp_path)  # kustomize refuses absolute paths
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}/base]\nreplicas: [{{name: syncd, count: 5}}]\ntransformers: [{rel}/shard-count]\n")
    objects = render(tmp_path)
    assert one(objects, "StatefulSet")["spec"]["replicas"] == 5
    assert env_entry(objects, "SHARD_COUNT") == {"name": "SHARD_COUNT", "value": "5"}
    assert pod_settings(objects, 4, tmp_path).syncd.shard_index == (4, 5)


def test_every_overlay_keeps_the_shard_count_in_step() -> None:
    overlays = sorted(p for p in (KUBE / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    assert [p.name for p in overlays] == ["clickhouse-cluster"]
    for overlay in overlays:
        objects = render(overlay)
        assert env_entry(objects, "SHARD_COUNT")["value"] == str(one(objects, "StatefulSet")["spec"]["replicas"]), overlay


def test_a_pod_without_the_index_label_refuses_to_start(base: list[Obj], tmp_path: Path) -> None:
    """Kubernetes < 1.28 has no pod-index label; the downward API then gives an empty string."""
    env = {**pod_env(base, 0), "POD_INDEX": ""}
    with pytest.raises(ConfigError) as err:
        load(config_file(base, tmp_path), env=env)
    assert err.value.problems == ["syncd.shard: must be 'index/count' with 0 <= index < count, e.g. '0/1'"]


def test_probes_ports_and_the_metrics_service(base: list[Obj], tmp_path: Path) -> None:
    settings = pod_settings(base, 0, tmp_path)
    assert env_entry(base, "SYNCD_SYNCD__HTTP") == {"name": "SYNCD_SYNCD__HTTP", "value": "0.0.0.0:9108"}
    assert settings.syncd.http == "0.0.0.0:9108"
    c = container(base)
    assert c["ports"] == [{"name": "metrics", "containerPort": 9108}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    metrics = one(base, "Service", "syncd-metrics")
    assert metrics["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9108", "prometheus.io/path": "/metrics"}
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9108, "targetPort": "metrics"}]
    assert "clusterIP" not in metrics["spec"]


def test_services_and_the_disruption_budget_select_the_pods(base: list[Obj]) -> None:
    sts = one(base, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels == POD_LABELS
    assert sts["spec"]["selector"] == {"matchLabels": POD_LABELS}
    headless = one(base, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for service in [headless, one(base, "Service", "syncd-metrics")]:
        assert service["spec"]["selector"] == POD_LABELS
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                           "selector": {"matchLabels": POD_LABELS}}


def test_each_replica_has_its_own_volume_at_the_configured_data_dir(base: list[Obj], tmp_path: Path) -> None:
    settings = pod_settings(base, 0, tmp_path)
    sts = one(base, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "20Gi"}}
    mounts = {m["name"]: m["mountPath"] for m in container(base)["volumeMounts"]}
    assert mounts == {"data": "/var/lib/syncd", "config": "/etc/syncd", "tmp": "/tmp"}
    assert env_entry(base, "SYNCD_SYNCD__DATA_DIR") == {"name": "SYNCD_SYNCD__DATA_DIR", "value": mounts["data"]}
    assert settings.syncd.data_dir == Path(mounts["data"])
    assert settings.clickhouse_dsn == "chdb:///var/lib/syncd/clickhouse"  # the embedded store is on the PVC too
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes == {"config": {"name": "config",
                                  "configMap": {"name": one(base, "ConfigMap")["metadata"]["name"], "defaultMode": 0o440}},
                       "tmp": {"name": "tmp", "emptyDir": {}}}
    assert container(base)["command"] == ["syncd"]
    assert container(base)["args"] == ["run", "--config", f"{mounts['config']}/syncd.toml"]
    assert list(one(base, "ConfigMap")["data"]) == ["syncd.toml"]


def test_shutdown_grace_and_non_root(base: list[Obj]) -> None:
    pod = one(base, "StatefulSet")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["terminationGracePeriodSeconds"] >= INFLIGHT_TIMEOUT + FLUSH_TIMEOUT + 15  # in-flight pages, drain, close
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                      "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    assert container(base)["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                  "capabilities": {"drop": ["ALL"]}}


def test_the_secret_is_an_example_with_placeholders(base: list[Obj], cluster: list[Obj]) -> None:
    secret = secret_example()
    assert (secret["kind"], secret["metadata"]["name"], secret["type"]) == ("Secret", "syncd-secrets", "Opaque")
    assert set(secret["stringData"]) == SECRET_KEYS
    for key, value in secret["stringData"].items():
        assert value.startswith("CHANGE-ME-"), key
    # Not rendered: `kubectl apply -k` must never overwrite the operator's real Secret with placeholders.
    assert [o for o in base + cluster if o["kind"] == "Secret"] == []


def test_the_base_uses_the_embedded_store(base: list[Obj], tmp_path: Path) -> None:
    settings = pod_settings(base, 0, tmp_path)
    assert (settings.clickhouse.dsn, settings.clickhouse.cluster) == ("", "")
    assert [(s.name, s.vendor) for s in settings.sources] == [("lynx-prod", "iotopen")]
    assert settings.mqtt is None


def test_the_cluster_overlay_points_at_a_clickhouse_cluster(cluster: list[Obj], tmp_path: Path) -> None:
    settings = pod_settings(cluster, 2, tmp_path)
    assert settings.clickhouse.dsn == "http://syncd:CHANGE-ME-clickhouse-password@clickhouse.clickhouse.svc:8123"
    assert settings.clickhouse.cluster == "syncd_cluster"
    assert settings.clickhouse_dsn == settings.clickhouse.dsn
    assert "CHANGE-ME-clickhouse-password" in settings.secrets()  # so the logs mask it
    assert env_entry(cluster, "SYNCD_CLICKHOUSE__DSN")["value"] == \
        "http://syncd:${CLICKHOUSE_PASSWORD}@clickhouse.clickhouse.svc:8123"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, whatever *_proxy says


def get(url: str) -> tuple[int, str]:
    try:
        with _DIRECT.open(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_pod_runs_the_rendered_config_answers_its_probes_and_stops_within_the_grace_period(
        base: list[Obj], tmp_path: Path) -> None:
    """The ConfigMap's syncd.toml with pod 0's environment; only what the cluster would supply is local here:
    the PVC (a temp dir), the pod's address, and the vendor (a simulator with the Secret's key)."""
    port = free_port()
    cfg = config_file(base, tmp_path)
    pod = one(base, "StatefulSet")["spec"]["template"]["spec"]
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    cfg.chmod(config_volume["configMap"]["defaultMode"])  # the mode the mounted file has
    grace = pod["terminationGracePeriodSeconds"]
    c = container(base)
    probes = {c["startupProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"],
              one(base, "Service", "syncd-metrics")["metadata"]["annotations"]["prometheus.io/path"]}
    sim = IotOpenSim(seed=11, installations=2, topics_per_installation=3, log_points=200)
    with sims_in_thread([sim]):
        env = {**os.environ, **pod_env(base, 0), "IOTOPEN_API_KEY": sim.api_key,
               "SYNCD_SYNCD__DATA_DIR": str(tmp_path / "data"), "SYNCD_SYNCD__HTTP": f"127.0.0.1:{port}",
               "SYNCD_SOURCES__0__BASE_URL": sim.url}
        log = (tmp_path / "stderr.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "syncd", *c["args"][:2], str(cfg)],
                                env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            answers: dict[str, tuple[int, str]] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    answers = {path: get(f"http://127.0.0.1:{port}{path}") for path in sorted(probes)}
                except OSError:  # not listening yet
                    time.sleep(0.05)
                    continue
                if all(status == 200 for status, _ in answers.values()) and sim.requests:  # and syncing
                    break
                time.sleep(0.05)
            assert {path: status for path, (status, _) in answers.items()} == {"/healthz": 200, "/readyz": 200, "/metrics": 200}
            assert answers["/readyz"][1] == "ready\n"
            assert sim.requests, "syncd made no request to the vendor before the deadline"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert took < grace
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [e["instance"] for e in lines if e["event"] == "syncd.started"] == ["syncd-0"]
    assert [e for e in lines if e["event"] == "config.warning"] == []
    assert [e["flushed"] for e in lines if e["event"] == "syncd.stopped"] == [True]
