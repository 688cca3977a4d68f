"""The chart's compile cache (issue 21): the signing key generated at install and held only by the services
that compile, their storage prefixes, and the warm-up Job (renderer image, GPU node, its own network
policy), rendered offline and validated strictly."""

from __future__ import annotations

import pytest
from test_chart import by_kind, render
from test_chart_security import (
    SERVICES,
    allows,
    env_of,
    pod_spec,
    policies,
    secrets_used,
    validate_strictly,
)

COMPILING = {"keyframe-renderer": "RENDERER", "style-trainer": "STYLE", "trainer": "TRAINER"}
SECRET = "dreamframe-compile-cache"


def warm_up(**values) -> dict:
    return {"compileCache": {"warmUp": {"enabled": True, **values}}}


def the_job(docs: list[dict]) -> dict:
    [job] = [d for d in by_kind(docs, "Job").values() if "warm-cache" in d["metadata"]["name"]]
    return job


def test_only_the_compiling_services_hold_the_generated_key():
    docs = render()
    secret = by_kind(docs, "Secret")[SECRET]
    assert len(secret["stringData"]["key"]) == 64
    for component in SERVICES.values():
        deployment = by_kind(docs, "Deployment")[f"dreamframe-{component}"]
        env = env_of(pod_spec(docs, f"dreamframe-{component}")["containers"][0])
        if component in COMPILING:
            section = COMPILING[component]
            assert env[f"DREAMFRAME_{section}__COMPILE_CACHE__KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": SECRET,
                "key": "key",
            }
            # Inductor's unsigned cache in the pod's own scratch, never the shared model volume; no key
            # made up in the pod.
            assert env[f"DREAMFRAME_{section}__COMPILE_CACHE__INDUCTOR_DIR"]["value"] == "/scratch/inductor"
            assert env[f"DREAMFRAME_{section}__COMPILE_CACHE__GENERATE_KEY"]["value"] == "false"
            assert SECRET in secrets_used(deployment)
        else:
            assert SECRET not in secrets_used(deployment), component
            assert not [name for name in env if "COMPILE_CACHE" in name], component
    assert not [d for d in by_kind(docs, "Job") if "warm-cache" in d]  # the warm-up is opt-in
    assert secret["stringData"]["key"] not in str([d for d in docs if d["kind"] != "Secret"])


def test_compile_cache_prefixes_belong_to_their_service_only():
    found = policies(render())
    read, write = "s3:GetObject", "s3:PutObject"
    for component in COMPILING:
        own = f"compile-cache/{component}/0123abcd.bin"
        assert allows(found[component], read, own) and allows(found[component], write, own), component
        for other in COMPILING:
            if other != component:
                theirs = f"compile-cache/{other}/0123abcd.bin"
                assert not allows(found[component], write, theirs), (component, other)
    for component in set(SERVICES.values()) - set(COMPILING):
        for key in ("compile-cache/keyframe-renderer/x.bin", "compile-cache/trainer/x.bin"):
            assert not allows(found[component], read, key) and not allows(found[component], write, key)


def test_existing_secret_and_off_switch():
    docs = render({"compileCache": {"existingSecret": "my-compile-key"}})
    assert SECRET not in by_kind(docs, "Secret")
    env = env_of(pod_spec(docs, "dreamframe-trainer")["containers"][0])
    assert (
        env["DREAMFRAME_TRAINER__COMPILE_CACHE__KEY"]["valueFrom"]["secretKeyRef"]["name"] == "my-compile-key"
    )
    off = render({"compileCache": {"enabled": False, "warmUp": {"enabled": True}}})
    assert SECRET not in by_kind(off, "Secret") and not [d for d in by_kind(off, "Job") if "warm-cache" in d]
    env = env_of(pod_spec(off, "dreamframe-keyframe-renderer")["containers"][0])
    assert env["DREAMFRAME_RENDERER__COMPILE_CACHE__ENABLED"]["value"] == "false"


def test_the_warm_up_job_runs_the_renderer_image_on_a_renderer_gpu_node():
    values = warm_up(tryMaxAutotune=True, extraArgs=["--batches", "2"])
    values["services"] = {
        "keyframeRenderer": {
            "nodeSelector": {"gpu": "h200"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "render", "effect": "NoSchedule"}
            ],
        }
    }
    docs = render(values)
    job = the_job(docs)
    renderer = pod_spec(docs, "dreamframe-keyframe-renderer")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == renderer["containers"][0]["image"]
    assert container["command"] == ["python", "-m", "services.keyframe_renderer.warm_cache"]
    assert container["args"] == ["--try-max-autotune", "--batches", "2"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"gpu": "h200"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "render", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = env_of(container)
    # The renderer's own S3 user (its policy grants compile-cache/keyframe-renderer/) and the signing key.
    assert env["DREAMFRAME_STORAGE__SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == (
        "dreamframe-keyframe-renderer-storage"
    )
    assert env["DREAMFRAME_RENDERER__COMPILE_CACHE__KEY"]["valueFrom"]["secretKeyRef"]["name"] == SECRET
    assert secrets_used(job) == {SECRET, "dreamframe-keyframe-renderer-storage"}
    # Not a renderer pod: the renderer's Service never sends it calls.
    labels = job["spec"]["template"]["metadata"]["labels"]
    service = by_kind(docs, "Service")["dreamframe-keyframe-renderer"]
    assert not service["spec"]["selector"].items() <= labels.items()
    # Its own policy: no ingress, egress only to DNS and MinIO.
    [policy] = [
        p
        for p in by_kind(docs, "NetworkPolicy").values()
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and not policy["spec"].get("ingress")
    assert all(rule.get("to") for rule in policy["spec"]["egress"])
    assert not [p for rule in policy["spec"]["egress"] for p in rule["to"] if "ipBlock" in p]
    validate_strictly(docs)


def test_the_job_is_renamed_when_what_it_compiles_changes():
    first = the_job(render(warm_up()))["metadata"]["name"]
    assert first == the_job(render(warm_up()))["metadata"]["name"]
    changed = render({**warm_up(), "config": {"renderer": {"preset": "sdxl", "batch_size": 8}}})
    assert the_job(changed)["metadata"]["name"] != first
    tagged = render({**warm_up(), "global": {"imageTag": "9.9.9"}})
    assert the_job(tagged)["metadata"]["name"] != first


def test_the_warm_up_needs_the_renderer():
    import helm_python as helm

    with pytest.raises(helm.HelmError, match="compileCache.warmUp.enabled needs"):
        render({**warm_up(), "services": {"keyframeRenderer": {"enabled": False}}})
