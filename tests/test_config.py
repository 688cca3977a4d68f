"""The one config mechanism: common sections in the shared library, each service's own section registered
with the loader, the same environment variable and file names for all of them."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from dreamframe import config
from dreamframe.config import load_settings, register_section, sections, settings_class

SERVICE_SECTIONS = {
    "plot": "services.plot_llm.settings",
    "style": "services.style_trainer.settings",
    "renderer": "services.keyframe_renderer.settings",
    "qa": "services.qa_generator.settings",
    "trainer": "services.trainer.settings",
    "evaluator": "services.evaluator.settings",
    "coordinator": "services.coordinator.settings",
}


def test_each_service_section_lives_in_its_own_package():
    found = sections()
    assert set(SERVICE_SECTIONS) <= set(found)
    for name, module in SERVICE_SECTIONS.items():
        assert found[name].__module__ == module, name
    # The shared library keeps only the common sections.
    assert set(config.Settings.model_fields) == {
        "storage",
        "server",
        "client",
        "log",
        "models",
        "cli",
        "limits",
    }


def test_service_sections_read_the_same_names_from_env_and_file(tmp_path, monkeypatch):
    file = tmp_path / "config.yaml"
    file.write_text("renderer: {batch_size: 3}\ncoordinator: {kubernetes: {max_replicas: 9}}\nqa: {fps: 4}\n")
    monkeypatch.setenv("DREAMFRAME_CONFIG_FILE", str(file))
    monkeypatch.setenv("DREAMFRAME_QA__FPS", "5")
    monkeypatch.setenv("DREAMFRAME_TRAINER__PRESET", "llava-1.5-7b")
    monkeypatch.setenv("DREAMFRAME_STORAGE__BUCKET", "other")
    settings = load_settings()
    assert settings.renderer.batch_size == 3
    assert settings.coordinator.kubernetes.max_replicas == 9
    assert settings.qa.fps == 5.0  # the environment wins over the file
    assert settings.trainer.preset == "llava-1.5-7b"
    assert settings.storage.bucket == "other"
    assert settings.plot == sections()["plot"]()  # unset sections take their defaults


def test_a_bad_value_names_section_and_field(monkeypatch):
    monkeypatch.setenv("DREAMFRAME_EVALUATOR__NUM_FRAMES", "0")
    with pytest.raises(ValidationError, match=r"evaluator\.num_frames"):
        load_settings()


def test_register_section_adds_one_and_refuses_a_clash(monkeypatch):
    class ExtraSettings(BaseModel):
        level: int = 1

    monkeypatch.setattr(config, "_registered", {})
    monkeypatch.setenv("DREAMFRAME_EXTRA__LEVEL", "7")
    register_section("extra", ExtraSettings)
    try:
        assert load_settings().extra.level == 7
        assert "extra" in settings_class().model_fields
        register_section("storage", ExtraSettings)
        with pytest.raises(ValueError, match="clashes with a common one"):
            sections()
    finally:
        config._registered.clear()
        sections.cache_clear()
        settings_class.cache_clear()
        config.get_settings.cache_clear()


def test_sections_of_services_not_installed_are_skipped(monkeypatch):
    from importlib.metadata import EntryPoint

    present = EntryPoint(
        "renderer", "services.keyframe_renderer.settings:RendererSettings", config.SECTIONS_GROUP
    )
    absent = EntryPoint("plot", "services.not_in_this_image.settings:PlotSettings", config.SECTIONS_GROUP)
    broken = EntryPoint("qa", "services.keyframe_renderer.settings:NoSuchSection", config.SECTIONS_GROUP)
    monkeypatch.setattr(config, "entry_points", lambda group: [present, absent])
    sections.cache_clear()
    try:
        assert list(sections()) == ["renderer"]  # an image holds only its own service's package
        monkeypatch.setattr(config, "entry_points", lambda group: [present, broken])
        sections.cache_clear()
        with pytest.raises(AttributeError):  # a section that is there but broken is an error
            sections()
    finally:
        sections.cache_clear()
        settings_class.cache_clear()


@pytest.mark.parametrize(
    "name, secret",
    [
        ("DREAMFRAME_RENDERER__COMPILE_AOT", False),
        ("dreamframe_renderer__batch_size", False),  # the loader reads names case-insensitively
        ("DREAMFRAME_RENDERER__COMPILE_CACHE__KEY_FILE", False),
        ("DREAMFRAME_RENDERER__COMPILE_CACHE__KEY", True),
        ("DREAMFRAME_STORAGE__SECRET_KEY", True),
        ("DREAMFRAME_PLOT__API_KEY", True),
        ("DREAMFRAME_SERVER__AUTH_TOKENS", True),  # a list of secrets
        ("DREAMFRAME_SERVER__CALLERS", True),  # a list of models, each with its token
        ("DREAMFRAME_NO_SUCH__THING", True),  # nothing vouches for an unknown name
        ("DREAMFRAME_RENDERER__COMPILE_AOT__DEEPER", True),
    ],
)
def test_secret_variables_are_found_from_the_settings_types(name, secret):
    assert config.secret_variable(name) is secret


def test_a_whole_section_set_as_json_counts_as_secret_when_it_holds_one():
    assert config.secret_variable("DREAMFRAME_RENDERER") and config.secret_variable("DREAMFRAME_STORAGE")
    assert not config.secret_variable("DREAMFRAME_LIMITS")
