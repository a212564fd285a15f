"""The registry refuses a variant figures could not name: no display_name of its own, or one that
another variant already shows."""

import pytest

import lowrank as lr
from lowrank.adapters import registry


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_every_variant_has_its_own_display_name():
    shown = [lr.variant_class(v).display_name for v in lr.variants()]
    assert all(s.strip() for s in shown) and len(set(shown)) == len(shown)


def test_a_variant_without_a_display_name_of_its_own_is_refused(scratch_registry):
    class Unnamed(lr.variant_class("lora")):  # inherits LoRA's display_name: not its own
        name = "unnamed_for_test"

    with pytest.raises(ValueError, match=r"^variant 'unnamed_for_test' \(.*Unnamed\) has no display_name"):
        lr.register(Unnamed)
    assert "unnamed_for_test" not in lr.variants()


def test_a_display_name_another_variant_uses_is_refused(scratch_registry):
    class Twin(lr.variant_class("lora")):
        name = "twin_for_test"
        display_name = "LoRA"

    with pytest.raises(ValueError, match=r"display_name 'LoRA', which variant 'lora' already uses"):
        lr.register(Twin)
