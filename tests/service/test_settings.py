import pytest
from pydantic import ValidationError

from service.cores import available_cores
from service.settings import Settings
from tests.conftest import REPO


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`VIT_{name.upper()}`" not in readme]
    assert not missing


def test_settings_come_from_vit_environment_variables(monkeypatch):
    monkeypatch.setenv("VIT_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("VIT_PROVIDERS", "cpu")
    settings = Settings()
    assert (settings.max_batch_size, settings.providers) == (32, "cpu")


def test_inconsistent_or_invalid_settings_are_refused():
    with pytest.raises(ValidationError, match="printable ASCII"):
        Settings(api_keys="plain,clé")
    with pytest.raises(ValidationError, match="max_queue_images"):
        Settings(max_queue_images=4, max_images_per_request=8)
    with pytest.raises(ValidationError):
        Settings(providers="tpu")


def test_front_ends_default_to_one_per_core_and_on_cuda_leave_the_engine_one():
    assert Settings().resolved_frontends() == min(available_cores(), 8)
    assert [Settings().resolved_frontends(cores) for cores in (1, 2, 16, 64)] == [1, 2, 8, 8]
    assert [Settings(providers="cuda").resolved_frontends(cores) for cores in (1, 2, 16, 64)] == [1, 1, 15, 16]
    assert Settings(providers="cuda", frontend_processes=3).resolved_frontends(64) == 3


def test_decode_threads_cover_the_cores_across_the_front_ends_with_two_in_each_at_least():
    # (front-ends, cores): auto's counts on CPU for 1, 2, 16 and 64 cores, then on CUDA for 2, 16 and 64.
    cases = [(1, 1), (2, 2), (8, 16), (8, 64), (1, 2), (15, 16), (16, 64)]
    assert [Settings().resolved_preprocess_threads(*case) for case in cases] == [2, 2, 2, 8, 2, 2, 4]
    assert Settings(preprocess_threads=5).resolved_preprocess_threads(16, 64) == 5


def test_session_workers_default_to_one_per_core_on_cpu_and_one_on_cuda():
    settings = Settings()
    assert settings.resolved_session_workers(on_cuda=True) == 1
    assert settings.resolved_session_workers(on_cuda=False) >= 1
    assert Settings(session_workers=3).resolved_session_workers(on_cuda=False) == 3


def test_large_graphs_share_one_session_unless_told_otherwise():
    vit_small, vit_base = 88_000_000, 346_000_000  # fp32 graph files, bytes
    assert not Settings().resolved_shared_session(vit_small)
    assert Settings().resolved_shared_session(vit_base)
    assert Settings(shared_session=True).resolved_shared_session(vit_small)
    assert not Settings(shared_session=False).resolved_shared_session(vit_base)


def test_a_refused_setting_never_prints_the_api_keys(monkeypatch):
    """pydantic's errors show what they were given, and a model-level check is given every setting."""
    monkeypatch.setenv("VIT_API_KEYS", "hunter2-key,other-key")
    monkeypatch.setenv("VIT_MAX_QUEUE_IMAGES", "8")  # below a full request: refused
    with pytest.raises(ValueError) as refused:
        Settings()
    assert "max_queue_images" in str(refused.value) and "hunter2" not in str(refused.value)
    monkeypatch.setenv("VIT_API_KEYS", "hunter2-key,caf\u00e9")
    with pytest.raises(ValueError) as refused:
        Settings()
    assert "printable ASCII" in str(refused.value) and "hunter2" not in str(refused.value)
