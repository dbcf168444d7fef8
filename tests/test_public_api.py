"""The top-level names of sora_ds: the public API imports, and the 0.1 names still work for one release, with a
warning that names the new one."""

import pytest

import sora_ds

pytestmark = pytest.mark.unit


def test_every_public_name_imports():
    assert sorted(sora_ds.__all__) == sorted(set(sora_ds.__all__))
    for name in sora_ds.__all__:
        assert getattr(sora_ds, name) is not None, name


@pytest.mark.parametrize("old, new", sorted(sora_ds._RENAMED.items()))
def test_renamed_names_warn_and_are_the_new_objects(old, new):
    with pytest.warns(DeprecationWarning, match=f"sora_ds.{old} is now sora_ds.{new}"):
        assert getattr(sora_ds, old) is getattr(sora_ds, new)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'SoRATrainer'"):
        sora_ds.SoRATrainer  # noqa: B018  (never a top-level name; the Trainer lives in sora_ds.recipe.hf_trainer)
