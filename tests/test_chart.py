"""The Helm chart, rendered and validated offline: Helm's Go SDK (helm-python-sdk) for lint, schema and
template, kubernetes-validate --strict for every manifest against the Kubernetes API schemas."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "dreamframe"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.31.0"
# The chart's kubeVersion is >=1.27 (native gRPC probes are GA there); check the oldest and newest too.
K8S_VERSIONS = ("1.27.0", "1.31.0", "1.37.0")
GPU_SERVICES = {"style-trainer", "keyframe-renderer", "trainer", "evaluator"}


def render(values: dict | None = None, namespace: str = "dreamframe") -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values or {})
        chart.validate_schema(merged)
        files = chart.render(values or {}, name="dreamframe", namespace=namespace, is_install=True)
    docs = []
    for name, text in files.items():
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_lint_is_clean():
    result = helm.lint(str(CHART), strict=True)
    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] > 1], result["messages"]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"tls": {"enabled": True, "secretName": "dreamframe-tls", "mutual": True}, "vllm": {"enabled": True}},
        {
            "minio": {"enabled": False},
            "config": {"storage": {"endpoint": "s3.example.com:443", "secure": True}},
            "secrets": {"existingSecret": "mine"},
            "networkPolicy": {"enabled": False},
        },
        {"services": {"keyframeRenderer": {"autoscaling": {"mode": "hpa"}}}},
        {"services": {"keyframeRenderer": {"autoscaling": {"mode": "off"}}}},
        {"config": {"coordinator": {"leader_election": "off"}}, "services": {"coordinator": {"replicas": 1}}},
        {
            "config": {"coordinator": {"leader_election": "storage"}},
            "services": {"coordinator": {"replicas": 3}},
        },
    ],
    ids=["defaults", "tls-vllm", "external-s3", "hpa", "scaling-off", "one-coordinator", "storage-lease"],
)
def test_every_manifest_validates_strictly(values):
    docs = render(values)
    assert docs
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_each_service_has_deployment_service_and_grpc_probes():
    docs = render()
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    names = [
        "coordinator",
        "plot-llm",
        "style-trainer",
        "keyframe-renderer",
        "qa-generator",
        "trainer",
        "evaluator",
    ]
    for name in names:
        dep = deployments[f"dreamframe-{name}"]
        assert f"dreamframe-{name}" in services
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        # The kubelet's gRPC probes cannot do TLS: they ask the plaintext health port; liveness its own
        # health service (never storage), startup and readiness "" (storage and models).
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": 50052}
        assert container["livenessProbe"]["grpc"] == {"port": 50052, "service": "liveness"}
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == 1) == (name in GPU_SERVICES), name
        env = {e["name"]: e for e in container["env"]}
        assert env["DREAMFRAME_CONFIG_FILE"]["value"] == "/etc/dreamframe/config.yaml"
        assert "secretKeyRef" in env["DREAMFRAME_STORAGE__SECRET_KEY"]["valueFrom"]
    coordinator_env = {
        e["name"]: e.get("value")
        for e in deployments["dreamframe-coordinator"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert coordinator_env["DREAMFRAME_COORDINATOR__RENDERER_ADDRESSES"] == (
        "dns:///dreamframe-keyframe-renderer-headless.dreamframe.svc.cluster.local:50051"
    )
    assert (
        coordinator_env["DREAMFRAME_COORDINATOR__KUBERNETES__RENDERER_DEPLOYMENT"]
        == "dreamframe-keyframe-renderer"
    )


def test_secrets_never_land_in_config_maps():
    secret_values = {
        "s3SecretKey": "s3-secret-value",
        "llmApiKey": "llm-key-value",
        "judgeApiKey": "judge-key-value",
        "authTokens": "caller-token-1,caller-token-2",
    }
    docs = render(
        {
            "minio": {"enabled": False},
            "config": {"storage": {"endpoint": "s3.example.com:443"}},
            "networkPolicy": {"egress": {"storage": {"cidrs": ["203.0.113.0/24"]}}},
            "secrets": secret_values,
        }
    )
    config_maps = yaml.safe_dump([d for d in docs if d["kind"] == "ConfigMap"])
    deployments = yaml.safe_dump([d for d in docs if d["kind"] == "Deployment"])
    secret = by_kind(docs, "Secret")["dreamframe-secrets"]["stringData"]
    for value in ("s3-secret-value", "llm-key-value", "judge-key-value", "caller-token-1"):
        assert value not in config_maps and value not in deployments
        assert value in " ".join(secret.values())
    # Services call each other as their own identities (the callers Secret), never with an auth token.
    assert "client-token" not in secret


def test_config_values_use_dreamframe_settings_names():
    from dreamframe.config import settings_class

    config_map = by_kind(render(), "ConfigMap")["dreamframe-config"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    # Every section and key in the chart's config is one DreamFrame's Settings knows.
    fields = settings_class().model_fields
    for section, values in config.items():
        assert section in fields, section
        model = fields[section].annotation
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        assert set(values) <= known, (section, set(values) - known)


def test_renderer_scales_independently_behind_a_headless_service():
    base = by_kind(render(), "Deployment")
    scaled = by_kind(render({"services": {"keyframeRenderer": {"replicas": 6}}}), "Deployment")
    assert scaled["dreamframe-keyframe-renderer"]["spec"]["replicas"] == 6
    for name, dep in base.items():
        if name != "dreamframe-keyframe-renderer":
            assert scaled[name]["spec"] == dep["spec"], f"{name} changed with the renderer's replicas"
    headless = by_kind(render(), "Service")["dreamframe-keyframe-renderer-headless"]
    assert headless["spec"]["clusterIP"] == "None"


def test_coordinator_rbac_only_scales_the_renderer_and_reads_its_endpoints():
    docs = render()
    # Discovery: list/watch on endpointslices (read-only), and nothing else, whatever scales the renderer.
    roles = by_kind(docs, "Role")
    assert roles["dreamframe-renderer-discovery"]["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
    ]
    discovery = by_kind(docs, "RoleBinding")["dreamframe-renderer-discovery"]
    assert discovery["subjects"][0]["name"] == "dreamframe-coordinator"
    assert discovery["roleRef"]["name"] == "dreamframe-renderer-discovery"
    others = [r for n, role in roles.items() if n != "dreamframe-renderer-discovery" for r in role["rules"]]
    assert not [r for r in others if "endpointslices" in r["resources"]], "no other Role reads endpoints"
    coordinator = by_kind(docs, "Deployment")["dreamframe-coordinator"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in coordinator["containers"][0]["env"]}
    assert env["DREAMFRAME_COORDINATOR__RENDERER_SERVICE"] == "dreamframe-keyframe-renderer"
    assert "dreamframe-keyframe-renderer" in by_kind(docs, "Service")
    # DNS discovery needs no API rights: no Role for it.
    dns = render({"config": {"coordinator": {"renderer_discovery": "dns"}}})
    assert "dreamframe-renderer-discovery" not in by_kind(dns, "Role")
    assert "dreamframe-renderer-discovery" not in by_kind(dns, "RoleBinding")

    role = roles["dreamframe-renderer-scaler"]
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["apps"]
        assert rule["resourceNames"] == ["dreamframe-keyframe-renderer"]
        assert set(rule["verbs"]) <= {"get", "patch", "update"}
        assert rule["resources"] in (["deployments/scale"], ["deployments"])
        if rule["resources"] == ["deployments"]:
            assert rule["verbs"] == ["get"]
    binding = by_kind(docs, "RoleBinding")["dreamframe-renderer-scaler"]
    assert binding["subjects"][0]["name"] == "dreamframe-coordinator"
    pods = {n: d["spec"]["template"]["spec"] for n, d in by_kind(docs, "Deployment").items()}
    assert pods["dreamframe-coordinator"]["serviceAccountName"] == "dreamframe-coordinator"
    assert all(
        not p["automountServiceAccountToken"] for n, p in pods.items() if n != "dreamframe-coordinator"
    )


def test_network_policies_let_only_the_coordinator_reach_services():
    policies = by_kind(render(), "NetworkPolicy")
    renderer = policies["dreamframe-keyframe-renderer"]
    sources = renderer["spec"]["ingress"][0]["from"]
    assert {"app.kubernetes.io/name": "coordinator", "app.kubernetes.io/instance": "dreamframe"} in [
        s["podSelector"]["matchLabels"] for s in sources
    ]
    assert all(
        s["podSelector"]["matchLabels"].get("app.kubernetes.io/name") in ("coordinator", "helm-test")
        for s in sources
    )
    coordinator = policies["dreamframe-coordinator"]["spec"]["ingress"][0]["from"]
    assert {"matchLabels": {"dreamframe.io/client": "true"}} in [s["podSelector"] for s in coordinator]


def test_bundled_minio_and_helm_test_hook():
    docs = render()
    minio = by_kind(docs, "StatefulSet")["dreamframe-minio"]
    assert minio["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "200Gi"
    test_pod = by_kind(docs, "Pod")["dreamframe-test-health"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["command"] == ["dreamframe", "health"]
    assert len(test_pod["spec"]["containers"][0]["args"]) == 7


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"services": {"keyframeRenderer": {"replicas": -1}}}, "/services/keyframeRenderer/replicas"),
        ({"services": {"trainer": {"gpu": "two"}}}, "/services/trainer/gpu"),
        ({"config": {"storage": {"backend": "gcs"}}}, "/config/storage/backend"),
        ({"surprise": True}, "additional properties 'surprise' not allowed"),
        ({"minio": {"rootPassword": "short"}}, "/minio/rootPassword"),
        ({"ports": {"grpc": 70000}}, "/ports/grpc"),
        ({"services": {"keyframeRenderer": {"autoscaling": {"mode": "cpu"}}}}, "autoscaling/mode"),
        (
            {"config": {"coordinator": {"leader_election": "zookeeper"}}},
            "/config/coordinator/leader_election",
        ),
        (
            {"config": {"coordinator": {"leader_lease_name": "Not A Name"}}},
            "/config/coordinator/leader_lease_name",
        ),
    ],
)
def test_schema_rejects_bad_values_with_clear_messages(values, message):
    with pytest.raises(helm.HelmValuesError) as info:
        render(values)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"config": {"coordinator": {"kubernetes": {"enabled": True}}}},
            "set by the chart from services.keyframeRenderer.autoscaling",
        ),
        (
            {"services": {"keyframeRenderer": {"autoscaling": {"mode": "keda"}}}},
            "prometheus.serverAddress is required with mode keda",
        ),
        (
            {"services": {"keyframeRenderer": {"autoscaling": {"mode": "hpa", "minReplicas": 0}}}},
            "minReplicas must be at least 1 with mode hpa",
        ),
        (
            {"services": {"keyframeRenderer": {"autoscaling": {"minReplicas": 4, "maxReplicas": 2}}}},
            "maxReplicas must be at least minReplicas",
        ),
        ({"minio": {"enabled": False}}, "config.storage.endpoint is required"),
        (
            {"config": {"coordinator": {"leader_election": "off"}}},
            "leader_election off with services.coordinator.replicas > 1",
        ),
        ({"config": {"coordinator": {"identity": "coordinator-0"}}}, "config.coordinator.identity"),
    ],
)
def test_inconsistent_values_fail_rendering(values, message):
    with pytest.raises(helm.HelmError) as info:
        render(values)
    assert message in str(info.value)


@pytest.mark.parametrize("env", sorted(p.stem.removeprefix("values-") for p in DEPLOY.glob("values-*.yaml")))
def test_environment_values_render(env):
    values = yaml.safe_load((DEPLOY / f"values-{env}.yaml").read_text()) or {}
    for doc in render(values):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_deploy_is_a_helm_upgrade_install_through_the_go_sdk(tmp_path):
    from dreamframe.cli.deploy import collect_values, deploy
    from dreamframe.errors import InvalidArgument

    values = collect_values([DEPLOY / "values-gpu.yaml"], ["global.imageTag=1.2.3"])
    manifest = deploy("dreamframe", "prod", values, dry_run="client")
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    images = {
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert "registry.example.com/dreamframe/keyframe-renderer:1.2.3" in images
    assert (
        by_kind(docs, "Deployment")["dreamframe-trainer"]["spec"]["template"]["spec"]["containers"][0][
            "resources"
        ]["limits"]["nvidia.com/gpu"]
        == 8
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: {trainer: {gpu: -1}}")
    with pytest.raises(InvalidArgument) as info:
        deploy("dreamframe", "prod", collect_values([bad], []), dry_run="client")
    assert "/services/trainer/gpu" in str(info.value)


def test_deploy_without_a_kube_context_says_so(tmp_path, monkeypatch):
    from dreamframe.cli.deploy import deploy
    from dreamframe.errors import FailedPrecondition

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(FailedPrecondition) as info:
        deploy("dreamframe", "dev", {}, dry_run=None)
    assert "kubectl config use-context" in str(info.value)


# --- renderer autoscaling: on the coordinator's pending frames, never on CPU -------------------------
RENDERER = "dreamframe-keyframe-renderer"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
# The fields of KEDA's ScaledObject spec (keda.sh/v1alpha1; its CRD is not in kubernetes-validate).
SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "advanced",
    "fallback",
    "triggers",
}


def scaling(mode: str, **autoscaling) -> dict:
    return {"services": {"keyframeRenderer": {"autoscaling": {"mode": mode, **autoscaling}}}}


def coordinator_config(docs: list[dict]):
    from services.coordinator.settings import CoordinatorSettings

    config = yaml.safe_load(by_kind(docs, "ConfigMap")["dreamframe-config"]["data"]["config.yaml"])
    return CoordinatorSettings.model_validate(config["coordinator"])


def scaler_rules(docs: list[dict]) -> list[dict]:
    """Role rules that let the coordinator change the renderer's scale (whatever Role holds them)."""
    return [
        rule
        for role in by_kind(docs, "Role").values()
        for rule in role["rules"]
        if "deployments/scale" in rule.get("resources", [])
    ]


def test_keda_mode_renders_a_scaled_object_on_pending_frames():
    docs = render(
        scaling(
            "keda",
            minReplicas=0,
            maxReplicas=16,
            framesPerReplica=300,
            cooldownSeconds=600,
            pollingInterval=15,
            prometheus={"serverAddress": PROMETHEUS},
        )
    )
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert len(scaled) == 1
    obj = scaled[0]
    # KEDA's CRD is not in kubernetes-validate's schemas: its structure checked by hand.
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert obj["metadata"]["name"] == RENDERER and obj["metadata"]["labels"]["app.kubernetes.io/instance"]
    spec = obj["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RENDERER}
    assert RENDERER in by_kind(docs, "Deployment")
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 16)
    assert (spec["cooldownPeriod"], spec["pollingInterval"]) == (600, 15)
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata are strings"
    assert meta["serverAddress"] == PROMETHEUS
    assert meta["query"] == 'sum(dreamframe_render_frames_pending{namespace="dreamframe"})'
    assert meta["threshold"] == "300" and meta["activationThreshold"] == "0"
    # The HPA that KEDA creates gets a scale-down window: its behavior is a real autoscaling/v2 one.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 600
    hpa_with_behavior = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe"},
        "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": 1, "behavior": behavior},
    }
    kubernetes_validate.validate(hpa_with_behavior, K8S_VERSION, strict=True)
    # KEDA runs the HPA: the chart renders none, leaves the replicas to KEDA and turns the built-in off.
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in by_kind(docs, "Deployment")[RENDERER]["spec"]
    assert not coordinator_config(docs).kubernetes.enabled and not scaler_rules(docs)
    # Everything else validates strictly.
    for version in K8S_VERSIONS:
        for doc in docs:
            if doc["kind"] != "ScaledObject":
                kubernetes_validate.validate(doc, version, strict=True)

    mine = 'sum(dreamframe_render_frames_pending{job="dreamframe-coordinator"})'
    custom = render(scaling("keda", prometheus={"serverAddress": PROMETHEUS, "query": mine}))
    [obj] = [d for d in custom if d["kind"] == "ScaledObject"]
    assert obj["spec"]["triggers"][0]["metadata"]["query"] == mine


def test_hpa_mode_scales_on_the_external_pending_frames_metric():
    selector = {"matchLabels": {"namespace": "dreamframe"}}
    docs = render(
        scaling(
            "hpa",
            minReplicas=2,
            maxReplicas=5,
            framesPerReplica=250,
            cooldownSeconds=120,
            externalMetric={"name": "dreamframe_render_frames_pending", "selector": selector},
        )
    )
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[RENDERER]
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RENDERER}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 5)
    [metric] = spec["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {"name": "dreamframe_render_frames_pending", "selector": selector}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "250"}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    assert "replicas" not in by_kind(docs, "Deployment")[RENDERER]["spec"]
    assert not [d for d in docs if d["kind"] == "ScaledObject"]
    assert not coordinator_config(docs).kubernetes.enabled and not scaler_rules(docs)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("mode", ["keda", "hpa", "builtin", "off"])
def test_no_gpu_service_scales_on_cpu_in_any_mode(mode):
    docs = render(scaling(mode, prometheus={"serverAddress": PROMETHEUS}))
    for hpa in by_kind(docs, "HorizontalPodAutoscaler").values():
        assert all(m["type"] == "External" for m in hpa["spec"]["metrics"]), hpa["spec"]["metrics"]
    for obj in (d for d in docs if d["kind"] == "ScaledObject"):
        assert [t["type"] for t in obj["spec"]["triggers"]] == ["prometheus"]
    assert "Utilization" not in yaml.safe_dump(docs)
    # One scaler at a time: the chart's, KEDA's, or the coordinator's.
    scalers = (
        len(by_kind(docs, "HorizontalPodAutoscaler"))
        + len([d for d in docs if d["kind"] == "ScaledObject"])
        + coordinator_config(docs).kubernetes.enabled
    )
    assert scalers == (0 if mode == "off" else 1)


def test_builtin_mode_keeps_the_coordinators_scaler_rbac_and_config():
    docs = render(scaling("builtin", minReplicas=0, maxReplicas=12, framesPerReplica=150))
    k8s = coordinator_config(docs).kubernetes
    assert k8s.enabled and (k8s.min_replicas, k8s.max_replicas, k8s.frames_per_replica) == (0, 12, 150)
    [rule] = scaler_rules(docs)
    assert rule["resourceNames"] == [RENDERER] and set(rule["verbs"]) == {"get", "patch", "update"}
    binding = by_kind(docs, "RoleBinding")["dreamframe-renderer-scaler"]
    assert binding["subjects"][0]["name"] == "dreamframe-coordinator"
    assert by_kind(docs, "Deployment")[RENDERER]["spec"]["replicas"] == 2
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert not [d for d in docs if d["kind"] == "ScaledObject"]
    # builtin is the default: the chart works on a cluster with neither KEDA nor a metrics adapter.
    assert coordinator_config(render()).kubernetes.enabled and scaler_rules(render())
    off = render(scaling("off"))
    assert not coordinator_config(off).kubernetes.enabled and not scaler_rules(off)
    assert "dreamframe-renderer-scaler" not in by_kind(off, "RoleBinding")


def test_renderer_grace_period_covers_a_batch():
    def pod(docs: list[dict], name: str) -> dict:
        return by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]

    def grace_env(docs: list[dict]) -> str:
        env = {e["name"]: e.get("value") for e in pod(docs, RENDERER)["containers"][0]["env"]}
        return env["DREAMFRAME_SERVER__GRACE_SECONDS"]

    docs = render()
    assert pod(docs, RENDERER)["terminationGracePeriodSeconds"] == 600
    assert grace_env(docs) == "590"  # the server gives up just before the kubelet's SIGKILL
    assert pod(docs, "dreamframe-coordinator")["terminationGracePeriodSeconds"] == 60
    assert pod(docs, "dreamframe-trainer")["terminationGracePeriodSeconds"] == 300
    longer = render({"services": {"keyframeRenderer": {"terminationGracePeriodSeconds": 1200}}})
    assert pod(longer, RENDERER)["terminationGracePeriodSeconds"] == 1200 and grace_env(longer) == "1190"
    with pytest.raises(helm.HelmValuesError):
        render({"services": {"keyframeRenderer": {"terminationGracePeriodSeconds": 5}}})


# --- high availability: two coordinators, one leader (a coordination.k8s.io Lease) -------------------
COORDINATOR = "dreamframe-coordinator"


def test_coordinator_leader_election_gets_exactly_its_lease():
    docs = render(namespace="render-ns")
    config = coordinator_config(docs)
    assert config.leader_election == "kubernetes"
    assert config.leader_lease_name == COORDINATOR
    pod = by_kind(docs, "Deployment")[COORDINATOR]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    # The Lease lives in the release namespace, where the Role below grants it.
    assert env["DREAMFRAME_COORDINATOR__KUBERNETES__NAMESPACE"] == "render-ns"
    assert env["DREAMFRAME_COORDINATOR__KUBERNETES__IN_CLUSTER"] == "true"
    assert "DREAMFRAME_COORDINATOR__IDENTITY" not in env and not config.identity  # each pod its own name
    roles = by_kind(docs, "Role")
    # create cannot be limited by resourceNames; get and patch only on the one Lease; nothing else.
    assert roles["dreamframe-leader-election"]["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [COORDINATOR],
            "verbs": ["get", "patch"],
        },
    ]
    binding = by_kind(docs, "RoleBinding")["dreamframe-leader-election"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "dreamframe-leader-election",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": COORDINATOR, "namespace": "render-ns"}]
    assert pod["serviceAccountName"] == COORDINATOR and pod["automountServiceAccountToken"]
    # The other Roles are as they were, and none of them touches leases.
    assert set(roles) == {
        "dreamframe-leader-election",
        "dreamframe-renderer-scaler",
        "dreamframe-renderer-discovery",
    }
    others = [r for n, role in roles.items() if n != "dreamframe-leader-election" for r in role["rules"]]
    assert not [r for r in others if "leases" in r["resources"]]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    # A lease name of one's own: the config and the Role's resourceNames follow it.
    named = render({"config": {"coordinator": {"leader_lease_name": "df-leader"}}})
    assert coordinator_config(named).leader_lease_name == "df-leader"
    assert by_kind(named, "Role")["dreamframe-leader-election"]["rules"][1]["resourceNames"] == ["df-leader"]
    # A lease in storage (or none) needs no API rights.
    for election in ("storage", "off"):
        other = render(
            {
                "config": {"coordinator": {"leader_election": election}},
                "services": {"coordinator": {"replicas": 1}},
            }
        )
        assert coordinator_config(other).leader_election == election
        assert "dreamframe-leader-election" not in by_kind(other, "Role")
        assert "dreamframe-leader-election" not in by_kind(other, "RoleBinding")


def test_two_coordinator_replicas_roll_and_drain_safely():
    docs = render()
    dep = by_kind(docs, "Deployment")[COORDINATOR]["spec"]
    assert dep["replicas"] == 2
    # The new pod (a follower) is up before an old one goes: the API never stops, the lease moves over.
    assert dep["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    selector = {"app.kubernetes.io/name": "coordinator", "app.kubernetes.io/instance": "dreamframe"}
    pdb = by_kind(docs, "PodDisruptionBudget")[COORDINATOR]["spec"]
    assert pdb == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    anti = dep["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti == {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": selector},
                },
            }
        ]
    }
    # The Service routes to every replica (followers answer reads and take submissions): plain selector.
    service = by_kind(docs, "Service")[COORDINATOR]["spec"]
    assert service["selector"] == selector and service.get("clusterIP") != "None"
    # KEDA's default query sums the coordinators' pending frames (followers report 0), never averages.
    keda = render(scaling("keda", prometheus={"serverAddress": PROMETHEUS}))
    [obj] = [d for d in keda if d["kind"] == "ScaledObject"]
    assert obj["spec"]["triggers"][0]["metadata"]["query"].startswith("sum(")

    # One replica: no PDB (it would block every drain) and no anti-affinity, still no-downtime rollouts.
    one = render({"services": {"coordinator": {"replicas": 1}}})
    dep1 = by_kind(one, "Deployment")[COORDINATOR]["spec"]
    assert dep1["replicas"] == 1 and dep1["strategy"] == dep["strategy"]
    assert (
        COORDINATOR not in by_kind(one, "PodDisruptionBudget") and "affinity" not in dep1["template"]["spec"]
    )
    # Without leader election two coordinators would run the same jobs: Recreate, never a surge.
    off = render(
        {"config": {"coordinator": {"leader_election": "off"}}, "services": {"coordinator": {"replicas": 1}}}
    )
    assert by_kind(off, "Deployment")[COORDINATOR]["spec"]["strategy"] == {"type": "Recreate"}
    # An affinity of one's own with a podAntiAffinity replaces the chart's; other affinity is kept beside it.
    mine = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ]
        }
    }
    own = by_kind(render({"services": {"coordinator": {"affinity": mine}}}), "Deployment")[COORDINATOR]
    assert own["spec"]["template"]["spec"]["affinity"] == mine
    zone = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                }
            ]
        }
    }
    zoned = render({"services": {"coordinator": {"affinity": zone}}})
    both = by_kind(zoned, "Deployment")[COORDINATOR]
    assert set(both["spec"]["template"]["spec"]["affinity"]) == {"nodeAffinity", "podAntiAffinity"}
    # Other services keep their strategy and PDB rules.
    renderer = by_kind(docs, "Deployment")[RENDERER]["spec"]
    assert renderer["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert by_kind(docs, "PodDisruptionBudget")[RENDERER]["spec"]["maxUnavailable"] == 1
    for variant in (one, off, zoned):
        for doc in variant:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_scratch_size_limit_reaches_the_disk_checks_of_trainer_and_evaluator():
    from services.evaluator.settings import EvaluatorSettings
    from services.trainer.settings import TrainerSettings

    def limits(values: dict | None = None) -> tuple[int | None, int | None]:
        config = yaml.safe_load(
            by_kind(render(values), "ConfigMap")["dreamframe-config"]["data"]["config.yaml"]
        )
        trainer = TrainerSettings.model_validate(config["trainer"])
        evaluator = EvaluatorSettings.model_validate(config["evaluator"])
        return trainer.work_dir_size_limit, evaluator.work_dir_size_limit

    # The emptyDir's sizeLimit (Kubernetes quantity) read as pydantic's byte size, for both services.
    assert limits() == (200 << 30, 200 << 30)
    assert limits({"scratch": {"sizeLimit": "500Gi"}}) == (500 << 30, 500 << 30)
    # A value of the operator's own wins.
    assert limits({"config": {"trainer": {"work_dir_size_limit": "1TiB"}}}) == (1 << 40, 200 << 30)
