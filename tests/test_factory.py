import pytest
import torch

from models.factory import MODEL_NAMES, ModelConfig, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_maps_a_volume_to_class_logits(name):
    model = build_model(ModelConfig(name=name, num_classes=3))
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 32, 32))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_norm_choice_changes_the_layers(norm):
    model = build_model(ModelConfig(name="smallcnn", norm=norm))
    kinds = {type(m).__name__ for m in model.modules()}
    expected = {"batch": "BatchNorm3d", "instance": "InstanceNorm3d", "group": "GroupNorm"}[norm]
    assert expected in kinds


def test_same_config_same_architecture():
    a = build_model(ModelConfig(name="densenet121")).state_dict()
    b = build_model(ModelConfig(name="densenet121")).state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "vgg"}, "'vgg'"),
        ({"norm": "layer"}, "'layer'"),
        ({"num_classes": 1}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**kwargs)
