"""``helm upgrade --install`` of charts/dreamframe through Helm's Go SDK (helm-python-sdk), so deploying
needs no helm binary: the current kubectl context, or an explicit kubeconfig/API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dreamframe.errors import FailedPrecondition, InvalidArgument

CHART = Path(__file__).resolve().parents[3] / "charts" / "dreamframe"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into ``base`` (later values files and --set win, like helm)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _helm():
    try:
        import helm_python
    except ImportError:  # pragma: no cover - the dev/deploy install carries it
        raise FailedPrecondition(
            "Helm's Go SDK (helm-python-sdk) is not installed: run `make install`", field="helm"
        ) from None
    return helm_python


def collect_values(values_files: list[Path], sets: list[str]) -> dict[str, Any]:
    helm = _helm()

    values: dict[str, Any] = {}
    for path in values_files:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidArgument(f"cannot read values file: {exc}", field=str(path)) from None
        values = merge(values, loaded)
    for item in sets:
        values = merge(values, helm.parse_set_string(item))
    return values


def has_kube_context(kube_context: str | None = None) -> bool:
    """A kubeconfig to use (KUBECONFIG or ~/.kube/config with a current or named context), or a pod's
    service account."""
    import os

    if Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
        return True
    paths = [Path(p) for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p] or [
        Path.home() / ".kube" / "config"
    ]
    for path in paths:
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        names = {c.get("name") for c in config.get("contexts") or []}
        if (kube_context or config.get("current-context")) in names:
            return True
    return False


def deploy(
    release: str,
    namespace: str,
    values: dict[str, Any],
    *,
    dry_run: str | None = None,
    kube_context: str | None = None,
    wait: bool = False,
    timeout: int = 900,
) -> str:
    """Upgrade ``release`` (installing it when absent); returns the rendered manifest."""
    helm = _helm()

    if dry_run != "client" and not has_kube_context(kube_context):
        raise FailedPrecondition(
            "no Kubernetes context: point KUBECONFIG at your cluster's kubeconfig or run "
            "`kubectl config use-context <name>` (DRY_RUN=client renders without a cluster)",
            field="kube_context",
        )
    helm.validate_release_name(release)
    with helm.Chart.load(CHART) as chart:
        try:
            chart.validate_schema(chart.merge_values(values))
        except helm.HelmValuesError as exc:
            raise InvalidArgument(str(exc), field="values") from None
    config = helm.Config(namespace=namespace, kube_context=kube_context)
    options: dict[str, Any] = {"namespace": namespace, "dry_run": dry_run, "timeout": timeout}
    if wait:
        options["wait"] = "watcher"
    try:
        if dry_run == "client":
            release_info = config.install(str(CHART), release, values, create_namespace=True, **options)
        else:
            try:
                release_info = config.upgrade(str(CHART), release, values, **options)
            except helm.HelmNotFoundError:
                release_info = config.install(str(CHART), release, values, create_namespace=True, **options)
    except helm.HelmKubeError as exc:
        raise FailedPrecondition(f"cannot reach the cluster: {exc}", field="kube_context") from None
    finally:
        config.close()
    return release_info.get("manifest", "") or ""
