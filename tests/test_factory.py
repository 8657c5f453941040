import math

import pytest
import torch

from models.factory import COVARIATES, MODEL_NAMES, ModelConfig, build_model, covariate_vector


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_has_a_diagnosis_and_a_prognosis_head(name):
    model = build_model(ModelConfig(name=name, num_classes=3))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32, 32))
    assert out.logits.shape == (2, 3) and out.risk.shape == (2,)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.risk).all()


def test_covariates_are_fused_before_both_heads():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn", covariates=True)).eval()
    assert model.diagnosis.in_features == model.prognosis.in_features == 64 + len(COVARIATES)
    x = torch.randn(2, 1, 16, 16, 16)
    young = covariate_vector(torch.tensor([30.0, 30.0]), torch.tensor([0.0, 0.0]))
    old = covariate_vector(torch.tensor([90.0, 90.0]), torch.tensor([1.0, 1.0]))
    with torch.no_grad():
        assert not torch.equal(model(x, young).risk, model(x, old).risk)
    with pytest.raises(ValueError, match="covariates"):
        model(x)


def test_unknown_covariates_are_zero_with_their_indicator_off():
    v = covariate_vector(torch.tensor([75.0, math.nan]), torch.tensor([math.nan, 0.0]))
    assert v.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 1.0]]


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
        ({"test_time_flips": 0}, "sequence of spatial axes, got 0"),
        ({"test_time_flips": (3,)}, r"among 0, 1, 2, got \(3,\)"),
        ({"test_time_flips": (True,)}, "among 0, 1, 2, got"),
        ({"test_time_flips": (0.0,)}, "among 0, 1, 2, got"),
        ({"test_time_flips": (0, 0)}, r"repeat an axis, got \(0, 0\)"),
    ],
)
def test_bad_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**kwargs)


def test_norm_and_buffer_keys():
    from models.factory import buffer_keys, norm_state_keys

    batch = build_model(ModelConfig(name="smallcnn", norm="batch"))
    keys = norm_state_keys(batch)
    assert {k.rsplit(".", 1)[1] for k in keys} == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert not any(k.startswith(("diagnosis", "prognosis")) for k in keys)
    assert buffer_keys(batch) == {k for k in keys if not k.endswith(("weight", "bias"))}
    group = build_model(ModelConfig(name="smallcnn", norm="group"))
    assert {k.rsplit(".", 1)[1] for k in norm_state_keys(group)} == {"weight", "bias"} and buffer_keys(group) == set()


def test_the_network_only_sees_plain_tensors():
    """A MONAI MetaTensor input gives the same output as its plain data, and nothing MetaTensor comes out (#18)."""
    from monai.data import MetaTensor

    from models.factory import ModelConfig, as_plain_tensor, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn")).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    meta = MetaTensor(x, affine=torch.eye(4))
    assert type(as_plain_tensor(meta)) is torch.Tensor and as_plain_tensor(x) is x
    out_meta, out_plain = model(meta), model(x)
    assert type(out_meta.logits) is torch.Tensor and type(out_meta.risk) is torch.Tensor
    assert torch.equal(out_meta.logits, out_plain.logits) and torch.equal(out_meta.risk, out_plain.risk)


@pytest.mark.parametrize("fusion", ["late", "film"])
def test_profile_fusion_feeds_the_profile_to_both_heads(fusion):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn", profile_fusion=fusion, profile_variables=3)).eval()
    assert model.n_profile == 6
    x = torch.randn(2, 1, 16, 16, 16)
    a = torch.tensor([[1.0, 0.0, -1.0, 1.0, 0.0, 1.0]] * 2)
    b = torch.tensor([[-2.0, 0.0, 2.0, 1.0, 0.0, 1.0]] * 2)
    with torch.no_grad():
        if fusion == "film":  # gamma/beta start at 0: a fresh FiLM model is the image-only model
            torch.testing.assert_close(model(x, profile=a).logits, model(x, profile=b).logits)
            torch.nn.init.normal_(model.profile.net[-1].weight)
        out_a, out_b = model(x, profile=a), model(x, profile=b)
    assert out_a.logits.shape == (2, 3) and out_a.risk.shape == (2,)
    assert not torch.allclose(out_a.logits, out_b.logits) and not torch.allclose(out_a.risk, out_b.risk)
    with pytest.raises(ValueError, match="profile of 6 inputs"):
        model(x)
    with pytest.raises(ValueError, match="profile of 6 inputs"):
        model(x, profile=torch.zeros(2, 3))


def test_profile_fusion_none_builds_the_image_only_network():
    plain = build_model(ModelConfig(name="smallcnn"))
    assert plain.profile is None and plain.n_profile == 0
    assert not any(k.startswith("profile.") for k in plain.state_dict())
    late = build_model(ModelConfig(name="smallcnn", profile_fusion="late", profile_variables=4))
    assert late.diagnosis.in_features == plain.diagnosis.in_features + 32


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"profile_fusion": "early", "profile_variables": 3}, "profile-fusion 'early'"),
        ({"profile_fusion": "late"}, "profile_variables > 0"),
        ({"profile_variables": 3}, "profile_variables > 0"),
    ],
)
def test_bad_profile_fusion_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(name="smallcnn", **kwargs)


def test_profile_only_baseline_ignores_the_image():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn", profile_fusion="only", profile_variables=2)).eval()
    assert not model.uses_image and model.diagnosis.in_features == 32
    profile = torch.tensor([[0.5, -1.0, 1.0, 1.0]])
    with torch.no_grad():
        a, b = (
            model(torch.randn(1, 1, 16, 16, 16), profile=profile),
            model(torch.randn(1, 1, 16, 16, 16), profile=profile),
        )
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.risk, b.risk)


def test_test_time_flips_average_the_mirrored_views_when_evaluating_only():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="smallcnn")).eval()
    flipped = build_model(ModelConfig(name="smallcnn", test_time_flips=[0, 2]))  # a bundle's JSON list
    assert flipped.test_time_flips == (0, 2) and ModelConfig(test_time_flips=[0]).test_time_flips == (0,)
    flipped.load_state_dict(plain.state_dict())
    flipped.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        views = [plain(x), plain(torch.flip(x, dims=(2,))), plain(torch.flip(x, dims=(4,)))]
        out = flipped(x)
        assert torch.allclose(out.logits, sum(v.logits for v in views) / 3, atol=1e-6)
        assert torch.allclose(out.risk, sum(v.risk for v in views) / 3, atol=1e-6)
        assert not torch.allclose(out.logits, views[0].logits)  # the mirrors did change something
        assert torch.equal(flipped.forward_view(x).logits, views[0].logits)  # one pass, as explanations need
    flipped.train()  # training sees the input it is given
    plain.train()
    torch.manual_seed(1)
    a = flipped(x).logits
    torch.manual_seed(1)
    assert torch.allclose(a, plain(x).logits, atol=1e-6)


def test_test_time_flips_are_not_part_of_the_architecture():
    assert ModelConfig(name="smallcnn", test_time_flips=(0,)).architecture == ModelConfig(name="smallcnn")
    assert ModelConfig(name="smallcnn").architecture != ModelConfig(name="resnet10").architecture
