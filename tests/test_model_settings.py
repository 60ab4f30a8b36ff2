"""Engine settings stored with a model (engine.json)."""
import json
from types import SimpleNamespace

import pytest

from vrpsam_med.engine import model_settings
from vrpsam_med.models.backbones import CheckpointError


def test_round_trip_and_resolve(tmp_path):
    assert model_settings.load(tmp_path) == {}
    model_settings.save(tmp_path, {"localised_box_margin": 0.1})
    settings = model_settings.load(tmp_path)
    assert settings == {"localised_box_margin": 0.1}
    model = SimpleNamespace(engine_settings=settings)
    assert model_settings.resolve("model", model, "localised_box_margin") == 0.1
    assert model_settings.resolve("model", object(), "localised_box_margin") == 0.03  # no settings: default
    assert model_settings.resolve(0.2, model, "localised_box_margin") == 0.2  # an explicit value wins
    with pytest.raises(ValueError, match="expected 'model' or a number"):
        model_settings.resolve("wide", model, "localised_box_margin")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not JSON"),
    ("[0.1]", "expected an object"),
    ('{"box_margni": 0.1}', "unknown engine setting 'box_margni'"),
    ('{"localised_box_margin": "wide"}', "localised_box_margin must be a number >= 0"),
    ('{"localised_box_margin": -0.1}', "localised_box_margin must be a number >= 0"),
])
def test_bad_files_are_named(tmp_path, text, match):
    (tmp_path / model_settings.FILE).write_text(text)
    with pytest.raises(CheckpointError, match=rf"engine.json: .*{match}"):
        model_settings.load(tmp_path)


def test_save_refuses_unknown_keys_and_leaves_no_file(tmp_path):
    with pytest.raises(CheckpointError, match="unknown engine setting"):
        model_settings.save(tmp_path, {"nope": 1.0})
    assert not (tmp_path / model_settings.FILE).exists()
    model_settings.save(tmp_path, {"localised_box_margin": 0.05})
    assert json.loads((tmp_path / model_settings.FILE).read_text()) == {"localised_box_margin": 0.05}
