"""Session fixtures for the model-export tests: each reference model is built and exported once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.model_export.families import Member, build


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Member]:
    """`family(name)`: the built, imported and exported member of families.LAYOUTS, built on first use."""
    built: dict[str, Member] = {}

    def get(name: str) -> Member:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get
