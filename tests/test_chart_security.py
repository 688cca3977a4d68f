"""The chart's safe defaults (issue 19), rendered offline and validated strictly: TLS on (cert-manager's
Certificate when the cluster serves cert-manager.io/v1, else a CA generated at install), one MinIO user
and policy per service limited to its key prefixes, default-deny egress, metrics only from monitoring,
probes on a plaintext health port with liveness apart from readiness, a hardened vLLM, auth always on
(the chart's own caller identities, user callers read by the real settings loader) and evaluator endpoint
keys only in Secrets."""

from __future__ import annotations

import base64
import fnmatch
import json
import os

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from helm_python import _native
from test_chart import CHART, K8S_VERSIONS, by_kind, render

NS = "dreamframe"
SERVICES = {
    "coordinator": "coordinator",
    "plotLlm": "plot-llm",
    "styleTrainer": "style-trainer",
    "keyframeRenderer": "keyframe-renderer",
    "qaGenerator": "qa-generator",
    "trainer": "trainer",
    "evaluator": "evaluator",
}
# cert-manager's Certificate and Issuer spec fields (cert-manager.io/v1; its CRDs are not in
# kubernetes-validate): what the chart may use, checked by hand.
CERTIFICATE_SPEC = {
    "secretName", "commonName", "dnsNames", "duration", "renewBefore", "usages", "privateKey", "issuerRef",
    "isCA", "ipAddresses", "uris", "subject", "secretTemplate", "revisionHistoryLimit", "keystores",
}  # fmt: skip
ISSUER_SPEC = {"selfSigned", "ca", "acme", "vault", "venafi"}


def render_with_api(values: dict | None = None, api_versions: list[str] | None = None) -> list[dict]:
    """render() with extra API versions the cluster would serve (helm-python-sdk's native options)."""
    options = {"name": "dreamframe", "namespace": NS, "is_install": True, "api_versions": api_versions or []}
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values or {}))
        files = json.loads(
            _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options))
        )
    return [
        d
        for name, text in files.items()
        if not name.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


def validate_strictly(docs: list[dict], versions=K8S_VERSIONS) -> None:
    for version in versions:
        for doc in docs:
            if not doc["apiVersion"].startswith("cert-manager.io/"):
                kubernetes_validate.validate(doc, version, strict=True)


def pod_spec(docs: list[dict], name: str) -> dict:
    return by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def service_names() -> list[str]:
    names = []
    for component in SERVICES.values():
        for host in [f"dreamframe-{component}"] + (
            ["dreamframe-keyframe-renderer-headless"] if component == "keyframe-renderer" else []
        ):
            names += [host, f"{host}.{NS}", f"{host}.{NS}.svc", f"{host}.{NS}.svc.cluster.local"]
    return names


# --- TLS ---------------------------------------------------------------------------------------------


def test_tls_is_on_by_default_with_a_generated_ca_naming_every_service():
    docs = render_with_api()
    secret = by_kind(docs, "Secret")["dreamframe-tls"]
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(service_names())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert cert.issuer == ca.subject
    key = ca.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(
            cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
        )
    else:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]

    # Every server serves it, every client (the coordinator, the helm test) trusts the CA.
    for key_, component in SERVICES.items():
        pod = pod_spec(docs, f"dreamframe-{component}")
        env = env_of(pod["containers"][0])
        assert env["DREAMFRAME_SERVER__TLS_CERT_FILE"]["value"] == "/etc/dreamframe/tls/tls.crt"
        assert env["DREAMFRAME_SERVER__TLS_KEY_FILE"]["value"] == "/etc/dreamframe/tls/tls.key"
        assert env["DREAMFRAME_CLIENT__TLS_CA_FILE"]["value"] == "/etc/dreamframe/tls/ca.crt"
        assert "DREAMFRAME_SERVER__TLS_CLIENT_CA_FILE" not in env  # mutual is opt-in
        assert {"name": "tls", "secret": {"secretName": "dreamframe-tls"}} in pod["volumes"], key_
    coordinator = env_of(pod_spec(docs, "dreamframe-coordinator")["containers"][0])
    assert coordinator["DREAMFRAME_CLIENT__TLS_SERVER_NAME"]["value"] in service_names()
    test_pod = by_kind(docs, "Pod")["dreamframe-test-health"]["spec"]
    assert env_of(test_pod["containers"][0])["DREAMFRAME_CLIENT__TLS_CA_FILE"]["value"].endswith("ca.crt")
    assert {"name": "tls", "secret": {"secretName": "dreamframe-tls"}} in test_pod["volumes"]
    validate_strictly(docs)


def test_tls_uses_cert_manager_when_the_cluster_serves_it():
    docs = render_with_api(api_versions=["cert-manager.io/v1"])
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    certificates = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    assert set(issuers) == {"dreamframe-selfsigned", "dreamframe-ca"}
    assert issuers["dreamframe-selfsigned"]["spec"] == {"selfSigned": {}}
    assert issuers["dreamframe-ca"]["spec"] == {"ca": {"secretName": "dreamframe-ca"}}
    for issuer in issuers.values():
        assert issuer["apiVersion"] == "cert-manager.io/v1" and set(issuer["spec"]) <= ISSUER_SPEC
    ca, server = certificates["dreamframe-ca"]["spec"], certificates["dreamframe-tls"]["spec"]
    assert ca["isCA"] and ca["issuerRef"]["name"] == "dreamframe-selfsigned"
    assert server["secretName"] == "dreamframe-tls" and server["issuerRef"]["name"] == "dreamframe-ca"
    assert sorted(server["dnsNames"]) == sorted(service_names())
    assert {"server auth", "client auth"} <= set(server["usages"])
    for cert in certificates.values():
        assert set(cert["spec"]) <= CERTIFICATE_SPEC, set(cert["spec"]) - CERTIFICATE_SPEC
    # cert-manager writes the Secret: the chart renders none of its own, the pods mount cert-manager's.
    assert "dreamframe-tls" not in by_kind(docs, "Secret")
    assert {"name": "tls", "secret": {"secretName": "dreamframe-tls"}} in pod_spec(
        docs, "dreamframe-trainer"
    )["volumes"]
    validate_strictly(docs, versions=("1.31.0",))

    # provider helm: generated by Helm even where cert-manager is installed; an own Secret: neither.
    forced = render_with_api({"tls": {"provider": "helm"}}, ["cert-manager.io/v1"])
    assert "dreamframe-tls" in by_kind(forced, "Secret") and not by_kind(forced, "Certificate")
    own = render_with_api({"tls": {"secretName": "team-tls"}}, ["cert-manager.io/v1"])
    assert not by_kind(own, "Certificate") and "dreamframe-tls" not in by_kind(own, "Secret")
    assert {"name": "tls", "secret": {"secretName": "team-tls"}} in pod_spec(own, "dreamframe-coordinator")[
        "volumes"
    ]


def test_mutual_tls_and_plaintext_switches():
    docs = render({"tls": {"mutual": True}})
    for component in SERVICES.values():
        env = env_of(pod_spec(docs, f"dreamframe-{component}")["containers"][0])
        assert env["DREAMFRAME_SERVER__TLS_CLIENT_CA_FILE"]["value"] == "/etc/dreamframe/tls/ca.crt"
        # Services present their certificate when they call (the coordinator calls everyone).
        assert env["DREAMFRAME_CLIENT__TLS_CERT_FILE"]["value"] == "/etc/dreamframe/tls/tls.crt"
        assert env["DREAMFRAME_CLIENT__TLS_KEY_FILE"]["value"] == "/etc/dreamframe/tls/tls.key"
    test_env = env_of(by_kind(docs, "Pod")["dreamframe-test-health"]["spec"]["containers"][0])
    assert "DREAMFRAME_CLIENT__TLS_CERT_FILE" in test_env

    plain = render({"tls": {"enabled": False}})
    assert "dreamframe-tls" not in by_kind(plain, "Secret")
    for component in SERVICES.values():
        pod = pod_spec(plain, f"dreamframe-{component}")
        assert not [n for n in env_of(pod["containers"][0]) if "TLS" in n]
        assert "tls" not in [v["name"] for v in pod["volumes"]]


# --- least-privilege storage -------------------------------------------------------------------------


def allows(policy: dict, action: str, key: str, bucket: str = "dreamframe") -> bool:
    """S3 policy evaluation for Allow-only policies (the chart's): * in a resource matches any characters."""
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    resource = f"arn:aws:s3:::{bucket}/{key}" if key else f"arn:aws:s3:::{bucket}"
    return any(
        action in s["Action"] and any(fnmatch.fnmatchcase(resource, r) for r in s["Resource"])
        for s in policy["Statement"]
    )


def secrets_used(doc: dict) -> set[str]:
    """Names of the Secrets a workload reads (env secretKeyRef, secret and projected volumes)."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                found.add(node["secretKeyRef"]["name"])
            if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
                found.add(node["secret"]["secretName"])
            # a projected volume's source
            if isinstance(node.get("secret"), dict) and "name" in node["secret"]:
                found.add(node["secret"]["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc.get("spec"))
    return found


def policies(docs: list[dict]) -> dict[str, dict]:
    data = by_kind(docs, "ConfigMap")["dreamframe-storage-policies"]["data"]
    return {name.removesuffix(".json"): json.loads(text) for name, text in data.items()}


def test_each_service_gets_its_own_minio_user_limited_to_its_prefixes():
    docs = render()
    found = policies(docs)
    assert set(found) == set(SERVICES.values())
    for policy in found.values():
        actions = {a for s in policy["Statement"] for a in s["Action"]}
        assert not [a for a in actions if "*" in a or a.startswith("s3:PutBucket") or a.startswith("admin:")]
        assert not allows(policy, "s3:GetObject", "other-bucket-key", bucket="another-bucket")

    write, read = "s3:PutObject", "s3:GetObject"
    renderer, qa, trainer = found["keyframe-renderer"], found["qa-generator"], found["trainer"]
    # The renderer writes frames and thumbnails of a story, reads the story and style: nothing else.
    assert allows(renderer, write, "jobs/j1/stories/000/frames/000001.png")
    assert allows(renderer, write, "jobs/j1/stories/000/thumbs/000001.jpg")
    assert allows(renderer, read, "jobs/j1/stories/000/story.json")
    assert allows(renderer, read, "jobs/j1/stories/000/style/embedding.safetensors")
    for key in (
        "datasets/d1/train.json",
        "runs/r1/checkpoints/latest.json",
        "runs/r1/checkpoint-10/scheduler.json",
        "reports/r1/report.json",
        "jobs/j1/job.json",
        "jobs/j1/stories/000/story.json",
        "jobs/j1/stories/000/style/embedding.safetensors",
        "jobs-index/all/x",
        "coordinator/leader.json",
    ):
        assert not allows(renderer, write, key), key
        assert not allows(renderer, "s3:DeleteObject", key), key
    assert not allows(renderer, read, "datasets/d1/train.json") and not allows(renderer, read, "runs/r1/x")
    # The others: each only its own outputs.
    assert allows(qa, write, "datasets/d1/train.json") and not allows(qa, write, "runs/r1/x")
    assert not allows(qa, write, "jobs/j1/stories/000/frames/000001.png")
    assert allows(trainer, write, "runs/r1/checkpoint-10/model.safetensors")
    assert not allows(trainer, write, "datasets/d1/train.json") and not allows(trainer, write, "reports/x")
    assert allows(found["evaluator"], write, "reports/r1/report.json")
    assert not allows(found["evaluator"], write, "runs/r1/model.safetensors")
    assert allows(found["plot-llm"], write, "jobs/j1/stories/000/story.json")
    assert not allows(found["plot-llm"], write, "jobs/j1/stories/000/frames/000001.png")
    assert allows(found["style-trainer"], write, "jobs/j1/stories/000/style/x.pt")
    assert not allows(found["style-trainer"], write, "jobs/j1/stories/000/story.json")
    coordinator = found["coordinator"]
    assert allows(coordinator, write, "jobs/j1/job.json") and allows(coordinator, write, "jobs-index/all/x")
    assert not allows(coordinator, write, "datasets/d1/x") and not allows(coordinator, write, "runs/r1/x")
    # Readiness asks one key under its prefix (an existence check: GetObject, key names listable).
    probe = {
        "coordinator": "jobs/",
        "plot-llm": "jobs/",
        "style-trainer": "jobs/",
        "keyframe-renderer": "jobs/",
    }
    probe |= {"qa-generator": "datasets/", "trainer": "runs/", "evaluator": "reports/"}
    for user, prefix in probe.items():
        assert allows(found[user], read, f"{prefix}readiness-probe"), user
        assert allows(found[user], "s3:ListBucket", "")

    # Each Deployment holds its own user's credentials; MinIO's root ones only MinIO and the setup Job.
    secrets = by_kind(docs, "Secret")
    for component in SERVICES.values():
        env = env_of(pod_spec(docs, f"dreamframe-{component}")["containers"][0])
        for var, key in (
            ("DREAMFRAME_STORAGE__ACCESS_KEY", "access-key"),
            ("DREAMFRAME_STORAGE__SECRET_KEY", "secret-key"),
        ):
            assert env[var]["valueFrom"]["secretKeyRef"] == {
                "name": f"dreamframe-{component}-storage",
                "key": key,
            }
        assert secrets[f"dreamframe-{component}-storage"]["stringData"]["access-key"] == component
    root_password = secrets["dreamframe-minio"]["stringData"]["root-password"]
    assert len(root_password) >= 32
    holders = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod") and "dreamframe-minio" in secrets_used(d)
    ]
    assert sorted(holders) == ["dreamframe-minio", "dreamframe-storage-setup"]
    assert root_password not in yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    assert "minio-root-password" not in json.dumps(secrets["dreamframe-secrets"])
    assert "s3-secret-key" not in secrets["dreamframe-secrets"]["stringData"]

    # The setup Job: a post-install/post-upgrade hook making exactly these users with these policies.
    job = by_kind(docs, "Job")["dreamframe-storage-setup"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["policies"]["configMap"]["name"] == "dreamframe-storage-policies"
    mounted = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    assert mounted == {"dreamframe-minio"} | {f"dreamframe-{c}-storage" for c in SERVICES.values()}
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for command in ("mc admin policy create", "mc admin user add", "mc admin policy attach", "mc mb"):
        assert command in script
    validate_strictly(docs)


def test_external_s3_takes_a_secret_per_service():
    values = {
        "minio": {"enabled": False},
        "config": {"storage": {"endpoint": "s3.example.com:443", "secure": True}},
        "networkPolicy": {"egress": {"storage": {"cidrs": ["203.0.113.0/24"], "port": 443}}},
        "storage": {"credentials": {"keyframeRenderer": {"existingSecret": "renderer-s3"}}},
    }
    docs = render(values)
    renderer = env_of(pod_spec(docs, "dreamframe-keyframe-renderer")["containers"][0])
    assert renderer["DREAMFRAME_STORAGE__SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "renderer-s3",
        "key": "secret-key",
    }
    trainer = env_of(pod_spec(docs, "dreamframe-trainer")["containers"][0])  # no own Secret: the shared one
    assert (
        trainer["DREAMFRAME_STORAGE__SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "dreamframe-secrets"
    )
    assert not by_kind(docs, "Job") and "dreamframe-minio" not in by_kind(docs, "Secret")
    egress = by_kind(docs, "NetworkPolicy")["dreamframe-keyframe-renderer"]["spec"]["egress"]
    assert {
        "to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    } in egress
    validate_strictly(docs, versions=("1.31.0",))
    # Egress denied by default: external S3 without its CIDRs would be unreachable, so rendering says so.
    del values["networkPolicy"]
    with pytest.raises(helm.HelmError, match="networkPolicy.egress.storage.cidrs is required"):
        render(values)


# --- network -----------------------------------------------------------------------------------------


def peers(rule: dict) -> list[dict]:
    return rule.get("to", rule.get("from", []))


def test_every_pod_is_default_deny_egress_with_allow_listed_destinations():
    values = {
        "vllm": {"enabled": True},
        "networkPolicy": {
            "egress": {
                "llm": {"cidrs": ["198.51.100.0/24"]},
                "judge": {"cidrs": ["192.0.2.10/32"], "ports": [8443]},
                "kubernetesApi": {"cidrs": ["10.0.0.1/32"], "ports": [6443]},
            }
        },
    }
    docs = render(values)
    policies_ = by_kind(docs, "NetworkPolicy")
    pods = [
        (d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    ]
    assert len(pods) == 10  # seven services, vLLM, MinIO, the storage setup Job
    for name, labels in pods:
        selecting = [
            p for p in policies_.values() if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert selecting and all("Egress" in p["spec"]["policyTypes"] for p in selecting), name

    def ip_blocks(policy: str) -> set[str]:
        return {
            peer["ipBlock"]["cidr"]
            for rule in policies_[policy]["spec"]["egress"]
            for peer in peers(rule)
            if "ipBlock" in peer
        }

    def pod_targets(policy: str) -> list[dict]:
        return [
            peer
            for rule in policies_[policy]["spec"]["egress"]
            for peer in peers(rule)
            if "podSelector" in peer
        ]

    # No service may reach the internet, save the endpoints configured for it.
    assert ip_blocks("dreamframe-keyframe-renderer") == set()
    assert ip_blocks("dreamframe-trainer") == set() and ip_blocks("dreamframe-qa-generator") == set()
    assert ip_blocks("dreamframe-plot-llm") == {"198.51.100.0/24"}
    assert ip_blocks("dreamframe-evaluator") == {"192.0.2.10/32"}
    assert ip_blocks("dreamframe-coordinator") == {"10.0.0.1/32"}
    assert ip_blocks("dreamframe-vllm") == set() and ip_blocks("dreamframe-minio") == set()
    for rule in policies_["dreamframe-evaluator"]["spec"]["egress"]:
        if any("ipBlock" in p for p in peers(rule)):
            assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}]
    # Every rule names its destinations (an egress rule without "to" would allow anywhere).
    for policy in policies_.values():
        assert all(peers(rule) for rule in policy["spec"].get("egress", [])), policy["metadata"]["name"]
        assert all(peers(rule) for rule in policy["spec"].get("ingress", [])), policy["metadata"]["name"]
    # DNS in kube-system for everyone; MinIO for the services; the coordinator its callees; plot-llm vLLM.
    minio = {"matchLabels": {"app.kubernetes.io/name": "minio", "app.kubernetes.io/instance": "dreamframe"}}
    for component in SERVICES.values():
        egress = policies_[f"dreamframe-{component}"]["spec"]["egress"]
        assert egress[0]["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
        assert egress[0]["to"][0]["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "kube-system"
        }
        assert {"podSelector": minio} in pod_targets(f"dreamframe-{component}")
    [callees] = [p for p in pod_targets("dreamframe-coordinator") if "matchExpressions" in p["podSelector"]]
    assert sorted(callees["podSelector"]["matchExpressions"][0]["values"]) == sorted(
        c for c in SERVICES.values() if c != "coordinator"
    )
    assert pod_targets("dreamframe-keyframe-renderer")[1:] == [{"podSelector": minio}]  # after DNS
    vllm = {"matchLabels": {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": "dreamframe"}}
    assert {"podSelector": vllm} in pod_targets("dreamframe-plot-llm")
    assert {"podSelector": vllm} not in pod_targets("dreamframe-evaluator")

    # Metrics: only from the monitoring namespace (networkPolicy.metricsFrom), never from anywhere.
    for component in SERVICES.values():
        ingress = policies_[f"dreamframe-{component}"]["spec"]["ingress"]
        [metrics] = [r for r in ingress if r["ports"] == [{"port": 9090, "protocol": "TCP"}]]
        assert metrics["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
    closed = by_kind(render({"networkPolicy": {"metricsFrom": []}}), "NetworkPolicy")
    assert all(
        r["ports"] != [{"port": 9090, "protocol": "TCP"}]
        for r in closed["dreamframe-trainer"]["spec"]["ingress"]
    )
    # Without CIDRs pinned, the API server rule is the coordinator's alone.
    defaults = by_kind(render(), "NetworkPolicy")
    api = [
        r
        for r in defaults["dreamframe-coordinator"]["spec"]["egress"]
        if any("ipBlock" in p for p in peers(r))
    ]
    assert [p["port"] for p in api[0]["ports"]] == [443, 6443]
    for component in SERVICES.values():
        if component != "coordinator":
            assert not [
                r
                for r in defaults[f"dreamframe-{component}"]["spec"]["egress"]
                if any("ipBlock" in p for p in peers(r))
            ]
    validate_strictly(docs)


# --- vLLM --------------------------------------------------------------------------------------------


def test_vllm_is_hardened_keyed_and_reachable_from_plot_llm_only():
    docs = render({"vllm": {"enabled": True}})
    pod = pod_spec(docs, "dreamframe-vllm")
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/cache", "/models"} <= mounts
    env = env_of(container)
    assert env["HOME"]["value"] == "/tmp" and env["VLLM_CACHE_ROOT"]["value"].startswith("/cache")
    key_ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "dreamframe-vllm", "key": "api-key"}
    assert len(by_kind(docs, "Secret")["dreamframe-vllm"]["stringData"]["api-key"]) >= 32
    assert "--api-key" not in container["args"]  # not in the pod spec in clear
    plot = env_of(pod_spec(docs, "dreamframe-plot-llm")["containers"][0])
    assert plot["DREAMFRAME_PLOT__API_KEY"]["valueFrom"]["secretKeyRef"] == key_ref
    assert plot["DREAMFRAME_PLOT__BASE_URL"]["value"].startswith("http://dreamframe-vllm.")
    policy = by_kind(docs, "NetworkPolicy")["dreamframe-vllm"]["spec"]
    assert policy["ingress"] == [
        {
            "ports": [{"port": 8000, "protocol": "TCP"}],
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "plot-llm",
                            "app.kubernetes.io/instance": "dreamframe",
                        }
                    }
                }
            ],
        }
    ]
    own = render({"vllm": {"enabled": True, "existingSecret": "llm-key"}})
    assert "dreamframe-vllm" not in by_kind(own, "Secret")
    assert (
        env_of(pod_spec(own, "dreamframe-vllm")["containers"][0])["VLLM_API_KEY"]["valueFrom"][
            "secretKeyRef"
        ]["name"]
        == "llm-key"
    )
    validate_strictly(docs)


# --- probes ------------------------------------------------------------------------------------------


def test_probes_split_liveness_from_readiness_on_the_health_port():
    docs = render()
    for component in SERVICES.values():
        [container] = pod_spec(docs, f"dreamframe-{component}")["containers"]
        assert {"name": "health", "containerPort": 50052, "protocol": "TCP"} in container["ports"]
        assert env_of(container)["DREAMFRAME_SERVER__HEALTH_PORT"]["value"] == "50052"
        assert container["livenessProbe"]["grpc"] == {"port": 50052, "service": "liveness"}
        assert container["readinessProbe"]["grpc"] == {"port": 50052}
        assert container["startupProbe"]["grpc"] == {"port": 50052}
    # The health port is for the kubelet (always allowed from the node): no NetworkPolicy opens it.
    for policy in by_kind(docs, "NetworkPolicy").values():
        assert "50052" not in json.dumps(policy.get("spec", {}).get("ingress", []))


# Callers and endpoint secrets -------------------------------------------------------------------------
SYSTEM_CALLERS = {
    "dreamframe-coordinator": ("dreamframe-system", "submit"),
    "dreamframe-helm-test": ("dreamframe-system", "read"),
    "dreamframe-admin": ("dreamframe-system", "admin"),
}
CALLERS_FILE = "/etc/dreamframe/callers/callers.yaml"


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values or {}, name="dreamframe", namespace=NS, is_install=True)
    return next(text for name, text in files.items() if name.endswith("NOTES.txt"))


def callers_yaml(docs: list[dict]) -> list[dict]:
    return yaml.safe_load(by_kind(docs, "Secret")["dreamframe-callers"]["stringData"]["callers.yaml"])


def container_env(docs: list[dict], container: dict, external: dict | None = None) -> dict[str, str]:
    """The container's environment as the kubelet makes it: values, secretKeyRefs (the release's rendered
    Secrets, else `external` {secret: {key: value}}; optional ones may be missing) and $(VAR) references
    to variables defined before."""
    secrets = {n: s.get("stringData", {}) for n, s in by_kind(docs, "Secret").items()} | (external or {})
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            value = entry["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[entry["name"]] = value
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            found = secrets.get(ref["name"], {}).get(ref["key"])
            if found is None:
                assert ref.get("optional"), (
                    f"{entry['name']}: Secret {ref['name']} key {ref['key']} not found"
                )
                continue
            env[entry["name"]] = found
    return env


def load_service_settings(docs, container, tmp_path, monkeypatch, external=None):
    """dreamframe.config's own loader over a Deployment's environment, with the rendered callers.yaml and
    config.yaml where the pod mounts them."""
    from dreamframe.config import load_settings

    env = container_env(docs, container, external)
    (tmp_path / "callers.yaml").write_text(
        by_kind(docs, "Secret")["dreamframe-callers"]["stringData"]["callers.yaml"]
    )
    (tmp_path / "config.yaml").write_text(
        by_kind(docs, "ConfigMap")["dreamframe-config"]["data"]["config.yaml"]
    )
    assert env["DREAMFRAME_SERVER__CALLERS_FILE"] == CALLERS_FILE
    assert env["DREAMFRAME_CONFIG_FILE"] == "/etc/dreamframe/config.yaml"
    env["DREAMFRAME_SERVER__CALLERS_FILE"] = str(tmp_path / "callers.yaml")
    env["DREAMFRAME_CONFIG_FILE"] = str(tmp_path / "config.yaml")
    for name in list(os.environ):
        if name.upper().startswith("DREAMFRAME_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("DREAMFRAME_"):
            monkeypatch.setenv(name, value)
    return load_settings()


def identities(settings) -> dict[str, tuple[str, str]]:
    return {c.name: (c.team, c.role) for c in settings.server.all_callers}


def test_auth_is_always_on_with_the_charts_own_identities(tmp_path, monkeypatch):
    docs = render()
    validate_strictly(docs)
    secret = by_kind(docs, "Secret")["dreamframe-callers"]["stringData"]
    entries = callers_yaml(docs)
    assert {e["name"]: (e["team"], e["role"]) for e in entries} == SYSTEM_CALLERS
    tokens = {e["name"]: e["token"] for e in entries}
    assert all(len(t) == 40 and t.isalnum() for t in tokens.values())
    assert len(set(tokens.values())) == 3
    assert secret["coordinator-token"] == tokens["dreamframe-coordinator"]
    assert secret["helm-test-token"] == tokens["dreamframe-helm-test"]
    assert secret["admin-token"] == tokens["dreamframe-admin"]
    assert "client-token" not in by_kind(docs, "Secret")["dreamframe-secrets"]["stringData"]

    for component in SERVICES.values():
        pod = pod_spec(docs, f"dreamframe-{component}")
        container = pod["containers"][0]
        env = env_of(container)
        assert env["DREAMFRAME_SERVER__CALLERS_FILE"]["value"] == CALLERS_FILE
        assert "DREAMFRAME_SERVER__AUTH_TOKENS" not in env
        mount = next(m for m in container["volumeMounts"] if m["name"] == "callers")
        assert mount == {"name": "callers", "mountPath": "/etc/dreamframe/callers", "readOnly": True}
        volume = next(v for v in pod["volumes"] if v["name"] == "callers")
        assert volume["secret"]["secretName"] == "dreamframe-callers"
        assert volume["secret"]["items"] == [{"key": "callers.yaml", "path": "callers.yaml"}]
        # Only the coordinator calls other services: as itself, role submit (not an admin token).
        if component == "coordinator":
            assert env["DREAMFRAME_CLIENT__TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "dreamframe-callers",
                "key": "coordinator-token",
            }
        else:
            assert "DREAMFRAME_CLIENT__TOKEN" not in env
        # What the service itself reads: auth on, exactly the chart's identities.
        settings = load_service_settings(docs, container, tmp_path, monkeypatch)
        assert settings.server.auth_enabled, component
        assert identities(settings) == SYSTEM_CALLERS
        if component == "coordinator":
            client = settings.client.token.get_secret_value()
            caller = next(c for c in settings.server.all_callers if c.token.get_secret_value() == client)
            assert (caller.name, caller.role) == ("dreamframe-coordinator", "submit")

    # helm test: its own read-only identity.
    test_env = env_of(by_kind(docs, "Pod")["dreamframe-test-health"]["spec"]["containers"][0])
    assert test_env["DREAMFRAME_CLIENT__TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "dreamframe-callers",
        "key": "helm-test-token",
    }
    # Tokens only in the Secret.
    others = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    assert not [t for t in tokens.values() if t in others]
    text = notes()
    assert "get secret dreamframe-callers -o jsonpath='{.data.admin-token}'" in text
    assert "callers:" in text and "deprecated" not in text

    # Without the admin: the coordinator and helm test only, still auth on.
    docs = render({"systemCallers": {"team": "platform", "admin": False}})
    assert {e["name"]: (e["team"], e["role"]) for e in callers_yaml(docs)} == {
        "dreamframe-coordinator": ("platform", "submit"),
        "dreamframe-helm-test": ("platform", "read"),
    }
    assert "admin-token" not in by_kind(docs, "Secret")["dreamframe-callers"]["stringData"]
    assert "admin-token" not in notes({"systemCallers": {"team": "platform", "admin": False}})


def test_user_callers_are_read_by_the_services(tmp_path, monkeypatch):
    inline = "0123456789abcdef0123456789abcdef"
    from_secret = "fedcba9876543210fedcba9876543210"
    values = {
        "callers": [
            {
                "name": "vision-ci",
                "team": "vision",
                "role": "submit",
                "existingSecret": "vision-dreamframe",
                "key": "ci",
            },
            {"name": "vision-dashboard", "team": "vision", "role": "read", "token": inline},
            {"name": "ops", "team": "platform", "role": "admin", "existingSecret": "ops-token"},
        ]
    }
    docs = render(values)
    validate_strictly(docs)
    # Inline tokens go into callers.yaml; tokens in your Secrets never into anything the chart renders.
    assert {e["name"] for e in callers_yaml(docs)} == set(SYSTEM_CALLERS) | {"vision-dashboard"}
    assert from_secret not in yaml.safe_dump(docs)
    assert inline not in yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    external = {"vision-dreamframe": {"ci": from_secret}, "ops-token": {"token": "ops-token-0123456789"}}
    expected = SYSTEM_CALLERS | {
        "vision-ci": ("vision", "submit"),
        "vision-dashboard": ("vision", "read"),
        "ops": ("platform", "admin"),
    }
    for component in SERVICES.values():
        pod = pod_spec(docs, f"dreamframe-{component}")
        assert {"vision-dreamframe", "ops-token", "dreamframe-callers"} <= secrets_used({"spec": pod})
        settings = load_service_settings(docs, pod["containers"][0], tmp_path, monkeypatch, external)
        assert identities(settings) == expected, component
        tokens = {c.name: c.token.get_secret_value() for c in settings.server.all_callers}
        assert tokens["vision-ci"] == from_secret and tokens["vision-dashboard"] == inline
        assert tokens["ops"] == "ops-token-0123456789"
    # A changed list restarts the pods (callers.yaml is read at start); the same values do not.
    checksums = [
        by_kind(d, "Deployment")["dreamframe-evaluator"]["spec"]["template"]["metadata"]["annotations"][
            "checksum/callers"
        ]
        for d in (docs, render(values), render())
    ]
    assert checksums[0] == checksums[1] != checksums[2]


def test_deprecated_auth_tokens_still_work_as_admins_but_never_as_the_client_token(tmp_path, monkeypatch):
    legacy = "legacy-token-aaaaaaaaaaaa,legacy-token-bbbbbbbbbbbb"
    docs = render({"secrets": {"authTokens": legacy}})
    validate_strictly(docs)
    assert by_kind(docs, "Secret")["dreamframe-secrets"]["stringData"]["auth-tokens"] == legacy
    for component in SERVICES.values():
        container = pod_spec(docs, f"dreamframe-{component}")["containers"][0]
        assert (
            env_of(container)["DREAMFRAME_SERVER__AUTH_TOKENS"]["valueFrom"]["secretKeyRef"]["key"]
            == "auth-tokens"
        )
        settings = load_service_settings(docs, container, tmp_path, monkeypatch)
        assert identities(settings) == SYSTEM_CALLERS | {
            "token-1": ("default", "admin"),
            "token-2": ("default", "admin"),
        }
        if component == "coordinator":
            assert settings.client.token.get_secret_value() not in legacy.split(",")
            assert settings.client.token.get_secret_value() == next(
                c["token"] for c in callers_yaml(docs) if c["name"] == "dreamframe-coordinator"
            )
    assert "secrets.authTokens is deprecated" in notes({"secrets": {"authTokens": legacy}})
    # With secrets.existingSecret the tokens may be in your Secret (optional key).
    docs = render({"secrets": {"existingSecret": "mine"}})
    ref = env_of(pod_spec(docs, "dreamframe-trainer")["containers"][0])["DREAMFRAME_SERVER__AUTH_TOKENS"]
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "auth-tokens", "optional": True}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"callers": [{"name": "a", "team": "vision", "role": "root", "token": "0123456789abcdef"}]},
            "/callers/0/role",
        ),
        (
            {"callers": [{"name": "a", "team": "Vision", "role": "read", "token": "0123456789abcdef"}]},
            "/callers/0/team",
        ),
        (
            {"callers": [{"name": "CI", "team": "vision", "role": "read", "token": "0123456789abcdef"}]},
            "/callers/0/name",
        ),
        (
            {"callers": [{"name": "a", "team": "vision", "role": "read", "token": "short"}]},
            "/callers/0/token",
        ),
        ({"callers": [{"name": "a", "team": "vision", "role": "read"}]}, "missing property 'token'"),
        (
            {
                "callers": [
                    {
                        "name": "a",
                        "team": "v",
                        "role": "read",
                        "token": "0123456789abcdef",
                        "existingSecret": "s",
                    }
                ]
            },
            "/callers/0",
        ),
        (
            {"callers": [{"name": "a", "team": "v", "role": "read", "token": "0123456789abcdef", "x": 1}]},
            "'x' not allowed",
        ),
        ({"systemCallers": {"team": "Ops", "admin": True}}, "/systemCallers/team"),
        (
            {"config": {"evaluator": {"allow_caller_endpoints": "yes"}}},
            "/config/evaluator/allow_caller_endpoints",
        ),
        (
            {"config": {"evaluator": {"judges": {"j": {"base_url": "ftp://judge", "model": "m"}}}}},
            "/config/evaluator/judges/j/base_url",
        ),
        (
            {
                "config": {
                    "evaluator": {
                        "endpoints": {"e": {"base_url": "https://x", "model": "m", "api_key_file": "/k"}}
                    }
                }
            },
            "'api_key_file' not allowed",
        ),
        (
            {"config": {"evaluator": {"judges": {"../x": {"base_url": "https://x", "model": "m"}}}}},
            "'../x' not allowed",
        ),
    ],
)
def test_schema_rejects_bad_callers_and_endpoints(values, message):
    with pytest.raises(helm.HelmValuesError) as info:
        render(values)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("callers", "message"),
    [
        (
            [
                {
                    "name": "dreamframe-coordinator",
                    "team": "vision",
                    "role": "admin",
                    "token": "0123456789abcdef",
                }
            ],
            'callers[0]: the name "dreamframe-coordinator" is used twice',
        ),
        (
            [
                {"name": "a", "team": "vision", "role": "read", "token": "0123456789abcdef"},
                {"name": "b", "team": "vision", "role": "read", "token": "0123456789abcdef"},
            ],
            "callers[1] (b): its token is another caller's",
        ),
    ],
)
def test_clashing_callers_fail_at_install(callers, message):
    with pytest.raises(helm.HelmError) as info:
        render({"callers": callers})
    assert message in str(info.value)
    assert "0123456789abcdef" not in str(info.value)


def test_evaluator_endpoints_and_judges_keep_their_keys_in_secrets(tmp_path, monkeypatch):
    from services.evaluator.settings import EvaluatorSettings

    values = {
        "secrets": {"judgeApiKey": "judge-key-value"},
        "config": {
            "evaluator": {
                "endpoints": {
                    "gpt4o-vision": {
                        "base_url": "https://api.openai.com/v1",
                        "model": "gpt-4o",
                        "models": ["gpt-4o-mini"],
                        "apiKeySecret": {"name": "openai", "key": "api-key"},
                    },
                    "local-vllm": {"base_url": "http://vllm.models.svc:8000/v1", "model": "qwen"},
                },
                "judges": {
                    "gpt4o": {
                        "base_url": "https://api.openai.com/v1",
                        "model": "gpt-4o",
                        "apiKeySecret": {"name": "openai", "key": "judge-key"},
                    },
                    "internal": {
                        "base_url": "https://llm.internal/v1",
                        "model": "m",
                        "api_key_env": "INTERNAL_KEY",
                    },
                },
            }
        },
    }
    docs = render(values)
    validate_strictly(docs)
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["dreamframe-config"]["data"]["config.yaml"])
    evaluator = EvaluatorSettings.model_validate(config["evaluator"])
    assert evaluator.allow_caller_endpoints is False
    assert (
        str(evaluator.endpoints["gpt4o-vision"].api_key_file)
        == "/etc/dreamframe/endpoint-keys/endpoints/gpt4o-vision"
    )
    assert evaluator.endpoints["gpt4o-vision"].allowed_models == ["gpt-4o", "gpt-4o-mini"]
    assert (
        evaluator.endpoints["local-vllm"].api_key_file is None
        and not evaluator.endpoints["local-vllm"].api_key_env
    )
    assert str(evaluator.judges["gpt4o"].api_key_file) == "/etc/dreamframe/endpoint-keys/judges/gpt4o"
    assert evaluator.judges["internal"].api_key_env == "INTERNAL_KEY"
    assert "apiKeySecret" not in json.dumps(config)

    # The keys: mounted in the evaluator alone, read-only, one file per entry where api_key_file says.
    pod = pod_spec(docs, "dreamframe-evaluator")
    volume = next(v for v in pod["volumes"] if v["name"] == "endpoint-keys")
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "openai", "items": [{"key": "api-key", "path": "endpoints/gpt4o-vision"}]}},
        {"secret": {"name": "openai", "items": [{"key": "judge-key", "path": "judges/gpt4o"}]}},
    ]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "endpoint-keys")
    assert mount == {"name": "endpoint-keys", "mountPath": "/etc/dreamframe/endpoint-keys", "readOnly": True}
    holders = [d["metadata"]["name"] for d in docs if "openai" in secrets_used(d)]
    assert holders == ["dreamframe-evaluator"]

    # What the evaluator itself reads: the named entries, and the old judge key still the default judge.
    settings = load_service_settings(docs, pod["containers"][0], tmp_path, monkeypatch)
    assert set(settings.evaluator.endpoints) == {"gpt4o-vision", "local-vllm"}
    assert set(settings.evaluator.judges) == {"gpt4o", "internal"}
    assert settings.evaluator.judge_api_key.get_secret_value() == "judge-key-value"
    assert settings.evaluator.allow_caller_endpoints is False

    # Defaults: no entries, no key volume, caller endpoints off.
    docs = render()
    assert "endpoint-keys" not in {v["name"] for v in pod_spec(docs, "dreamframe-evaluator")["volumes"]}
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["dreamframe-config"]["data"]["config.yaml"])
    assert config["evaluator"]["allow_caller_endpoints"] is False
    assert EvaluatorSettings.model_validate(config["evaluator"]).judges == {}
