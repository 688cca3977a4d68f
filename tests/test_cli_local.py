"""Local process planning for `dreamframe up`: ports, coordinator addresses, one GPU per renderer."""

from __future__ import annotations

from dreamframe.cli.local import service_plan


def test_plan_gives_every_service_a_port_and_the_coordinator_every_address():
    plan, addresses = service_plan(renderers=3, base_port=30000, gpus=2)
    by_name = {p.name: p for p in plan}
    assert set(by_name) == {
        "plot-llm",
        "style-trainer",
        "keyframe-renderer",
        "keyframe-renderer-1",
        "keyframe-renderer-2",
        "qa-generator",
        "trainer",
        "evaluator",
        "coordinator",
    }
    assert len({p.port for p in plan}) == len(plan), "no two processes share a port"
    assert by_name["coordinator"].port == 30000
    renderer_ports = [
        by_name[n].port for n in ("keyframe-renderer", "keyframe-renderer-1", "keyframe-renderer-2")
    ]
    assert addresses["DREAMFRAME_COORDINATOR__RENDERER_ADDRESSES"] == ",".join(
        f"127.0.0.1:{p}" for p in renderer_ports
    )
    assert addresses["DREAMFRAME_COORDINATOR__PLOT_ADDRESS"] == f"127.0.0.1:{by_name['plot-llm'].port}"
    # replica r sees GPU r mod 2; nothing else is pinned
    assert [by_name[n].env for n in ("keyframe-renderer", "keyframe-renderer-1", "keyframe-renderer-2")] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    ]
    assert by_name["trainer"].env == {}


def test_default_plan_matches_the_configured_defaults():
    from services.coordinator.settings import CoordinatorSettings

    plan, addresses = service_plan()
    defaults = CoordinatorSettings()
    assert addresses["DREAMFRAME_COORDINATOR__PLOT_ADDRESS"] == defaults.plot_address
    assert addresses["DREAMFRAME_COORDINATOR__RENDERER_ADDRESSES"] == defaults.renderer_addresses
    assert all(p.env == {} for p in plan)
