import json
import math

import numpy as np
import pytest
import torch

from fl_client.config import SiteConfig
from fl_client.train import evaluate_round, predict, select_device, train_model, train_round
from fl_server.config import ServerConfig
from models.factory import build_model
from preprocessing.labels import DIAGNOSES
from synthetic.dicom_writer import PatientIdentity, write_ct_series


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """A site of 12 studies whose class sets the mean HU, so a model can learn it quickly."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    rows = ["StudyInstanceUID,diagnosis,severe,time_days,age,sex"]
    for i in range(12):
        label = i % 3
        uid = f"1.2.826.0.1.3680043.10.999.{i}"
        hu = rng.normal(-700 + 300 * label, 50, size=(10, 24, 24)).astype(np.float32)
        patient = PatientIdentity(f"TEST^P{i}", f"PID{i}", "19500101", "F", "070Y")
        write_ct_series(
            root / "dicom" / f"s{i}",
            hu,
            pixel_spacing_mm=(8.0, 8.0),
            slice_spacing_mm=8.0,
            study_instance_uid=uid,
            series_instance_uid=uid + ".1",
            patient=patient,
        )
        rows.append(f"{uid},{DIAGNOSES[label]},{int(label == 0)},{5 + 3 * label + i % 3},{50 + i},{'MF'[i % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    site = SiteConfig(
        site_name="site-t",
        dicom_dir=root / "dicom",
        site_dir=root / "work",
        labels_csv=root / "labels.csv",
        device="cpu",
        workers=1,
    )
    config = ServerConfig(
        model_name="smallcnn", input_size="16,16,16", target_spacing_mm="8,8,8", learning_rate=0.01, local_epochs=2
    )
    return site, config


def test_train_round_changes_weights_and_counts_studies(tiny_site):
    site, config = tiny_site
    settings = config.round_settings(1)
    initial = build_model(settings.model).state_dict()
    state, result = train_round(site, settings, initial)
    assert set(state) == set(initial)
    assert any(not torch.equal(state[k], initial[k]) for k in initial if initial[k].is_floating_point())
    # 12 studies, 4 per class: 1 val + 1 test per class, so 6 train studies (examples, not batches).
    assert result.num_examples == 6
    assert result.steps == 2 * math.ceil(6 / settings.batch_size)
    assert math.isfinite(result.loss)


def test_evaluate_round_reports_val_and_test_metrics(tiny_site):
    site, config = tiny_site
    settings = config.round_settings(1)
    metrics = evaluate_round(site, settings, build_model(settings.model).state_dict())
    assert metrics["val-n"] == 3 and metrics["test-n"] == 3
    for key in (
        "loss",
        "accuracy",
        "auc-macro",
        "balanced-accuracy",
        "brier",
        "ece",
        "sens-covid",
        "spec-normal",
        "c-index",
        "td-auc",
        "n-events",
        "hist-pos-covid",
        "hist-neg-normal",
    ):
        assert f"val-{key}" in metrics and f"test-{key}" in metrics
    assert metrics["val-n-events"] == 1  # one covid study per split, the only severe outcomes
    assert sum(metrics["test-hist-pos-covid"]) == 1 and sum(metrics["test-hist-neg-covid"]) == 2


def test_training_learns_the_tiny_task(tiny_site):
    site, config = tiny_site
    settings = config.round_settings(1)
    state = build_model(settings.model).state_dict()
    for r in range(1, 6):
        state, _ = train_round(site, config.round_settings(r), state)
    metrics = evaluate_round(site, settings, state)
    assert metrics["val-accuracy"] + metrics["test-accuracy"] >= 1.0  # well above chance (1/3 each)


def _batch(n, labels, times=None, events=None):
    nan = float("nan")
    return {
        "image": torch.randn(n, 1, 16, 16, 16),
        "label": torch.tensor(labels),
        "time": torch.tensor(times or [nan] * n, dtype=torch.float64),
        "event": torch.tensor(events or [nan] * n, dtype=torch.float64),
        "age": torch.full((n,), nan),
        "sex": torch.full((n,), nan),
    }


def test_predict_returns_probabilities_and_risk():
    model = build_model(ServerConfig(model_name="smallcnn").model)
    preds = predict(model, [_batch(2, [0, 2], [3.0, 9.0], [1.0, 0.0])], device=torch.device("cpu"))
    assert preds.probs.shape == (2, 3)
    assert np.allclose(preds.probs.sum(axis=1), 1.0, atol=1e-5)
    assert preds.labels.tolist() == [0, 2] and preds.risk.shape == (2,)
    assert preds.time.tolist() == [3.0, 9.0] and preds.event.tolist() == [1.0, 0.0]


def test_train_model_uses_examples_not_batches():
    model = build_model(ServerConfig(model_name="smallcnn").model)

    class Loader(list):
        dataset = list(range(5))

    loader = Loader([_batch(3, [0, 1, 2]), _batch(2, [0, 1])])
    result = train_model(model, loader, epochs=1, lr=1e-3, device=torch.device("cpu"))
    assert result.num_examples == 5 and result.steps == 2


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            select_device("cuda")


def test_batch_norm_statistics_are_recomputed_for_the_final_weights():
    from fl_client.train import recalibrate_batch_norm
    from models.factory import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn", norm="batch"))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    images = [{**_batch(2, [0, 1]), "image": torch.randn(2, 1, 16, 16, 16) * 3 + 5} for _ in range(3)]
    assert recalibrate_batch_norm(model, images, device=torch.device("cpu")) is True
    # Input mean 5, std 3: the first conv's outputs are far from the initial (0, 1) statistics.
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    group = build_model(ModelConfig(name="smallcnn", norm="group"))
    assert recalibrate_batch_norm(group, images, device=torch.device("cpu")) is False


def test_cox_loss_matches_a_hand_computed_case():
    from fl_client.train import cox_partial_likelihood

    risk = torch.tensor([0.5, 0.0, -0.5], requires_grad=True)
    time = torch.tensor([1.0, 2.0, 3.0])
    event = torch.tensor([1.0, 1.0, 0.0])
    # events at t=1 (risk set all three) and t=2 (risk set {2, 3}):
    expected = -((0.5 - math.log(math.exp(0.5) + 1 + math.exp(-0.5))) + (0.0 - math.log(1 + math.exp(-0.5)))) / 2
    loss = cox_partial_likelihood(risk, time, event)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert risk.grad is not None and torch.isfinite(risk.grad).all()


def test_cox_loss_masks_unknown_outcomes_and_handles_no_event():
    from fl_client.train import cox_partial_likelihood

    nan = float("nan")
    risk = torch.tensor([0.5, 0.0, 3.0])
    with_unknown = cox_partial_likelihood(risk, torch.tensor([1.0, 2.0, nan]), torch.tensor([1.0, 1.0, 1.0]))
    without = cox_partial_likelihood(risk[:2], torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    assert with_unknown.item() == pytest.approx(without.item())
    assert cox_partial_likelihood(risk, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)).item() == 0.0


def test_cox_loss_breslow_ties_share_the_risk_set():
    from fl_client.train import cox_partial_likelihood

    risk = torch.tensor([0.2, -0.3, 0.1])
    time = torch.tensor([2.0, 2.0, 5.0])
    event = torch.tensor([1.0, 1.0, 0.0])
    denominator = math.log(math.exp(0.2) + math.exp(-0.3) + math.exp(0.1))
    expected = -((0.2 - denominator) + (-0.3 - denominator)) / 2
    assert cox_partial_likelihood(risk, time, event).item() == pytest.approx(expected, rel=1e-6)


def test_unknown_diagnosis_is_masked_from_the_loss():
    from fl_client.train import multitask_loss
    from models.factory import ModelOutput

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    out = ModelOutput(logits, torch.zeros(2))
    nan = float("nan")
    batch = {"label": torch.tensor([0, -1]), "time": torch.tensor([nan, nan]), "event": torch.tensor([nan, nan])}
    total, diagnosis, prognosis = multitask_loss(out, batch, weights=(1.0, 0.5), device=torch.device("cpu"))
    assert diagnosis == pytest.approx(torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0])).item())
    assert prognosis == 0.0 and total.item() == pytest.approx(diagnosis)


def test_proximal_term_pulls_local_training_toward_the_global_weights(tiny_site):
    """FedProx: the same round with a large mu ends closer to the weights it started from."""
    from dataclasses import replace

    from fl_client.train import proximal_term

    site, config = tiny_site
    settings = replace(config.round_settings(1), learning_rate=0.03, local_epochs=3)
    start = build_model(settings.model).state_dict()
    trainable = {name for name, _ in build_model(settings.model).named_parameters()}

    def distance(state):
        return math.sqrt(sum(float(((state[k] - start[k]) ** 2).sum()) for k in trainable))

    free, _ = train_round(site, settings, start)
    pulled, _ = train_round(site, replace(settings, proximal_mu=100.0), start)
    assert distance(pulled) < 0.5 * distance(free)
    model = build_model(settings.model)
    anchor = [p.detach().clone() for p in model.parameters()]
    assert proximal_term(model, anchor, 1.0).item() == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(2.0)
    first = next(model.parameters())
    assert proximal_term(model, anchor, 0.5).item() == pytest.approx(0.25 * 4.0 * first.numel(), rel=1e-5)


def test_fedbn_local_mode_keeps_the_sites_own_normalisation_layers(tiny_site, tmp_path):
    from dataclasses import replace

    from fl_client.train import local_norm_path
    from models.factory import norm_state_keys

    site, config = tiny_site
    site = replace(site, site_dir=tmp_path / "work")  # its own FedBN folder; ingestion cache is rebuilt there
    settings = replace(config.round_settings(1), bn_mode="local")
    model = build_model(settings.model)
    norm_keys = norm_state_keys(model)
    assert norm_keys and all("running_mean" not in k or k in norm_keys for k in model.state_dict())
    global_state = model.state_dict()
    trained, _ = train_round(site, settings, global_state)
    saved = torch.load(local_norm_path(site, settings), weights_only=True)
    assert set(saved) == norm_keys and all(torch.equal(saved[k], trained[k]) for k in norm_keys)
    # Next round the server sends other norm values (its average): the site trains with its own instead.
    foreign = {k: (v + 7.0 if k in norm_keys and v.is_floating_point() else v) for k, v in trained.items()}
    from fl_client.train import with_local_norm

    merged = with_local_norm(site, replace(settings, server_round=2), foreign)
    assert all(torch.equal(merged[k], saved[k]) for k in norm_keys)
    assert all(torch.equal(merged[k], foreign[k]) for k in foreign if k not in norm_keys)
    aggregate = with_local_norm(site, replace(settings, bn_mode="aggregate"), foreign)
    assert all(torch.equal(aggregate[k], foreign[k]) for k in foreign)


# --- #18: the fast path gives the old path's results -------------------------------------------------------------


def _old_cox(risk, time, event):
    """fl_client.train.cox_partial_likelihood as on main before #18 (boolean masks on the device)."""
    time, event = time.to(risk.device, risk.dtype), event.to(risk.device, risk.dtype)
    known = ~(torch.isnan(time) | torch.isnan(event))
    risk, time, event = risk[known], time[known], event[known]
    if event.sum() <= 0:
        return risk.sum() * 0.0
    order = torch.argsort(time, descending=True)
    risk, time, event = risk[order], time[order], event[order]
    log_risk_set = torch.logcumsumexp(risk, dim=0)[torch.searchsorted(-time, -time, right=True) - 1]
    return -((risk - log_risk_set) * event).sum() / event.sum()


def _old_step(model, batch):
    """One step of main's loop before #18 on CPU: the MetaTensor batch goes through the network, fp32."""
    from models.factory import ModelOutput

    model.zero_grad(set_to_none=True)
    features = model.dropout(model.backbone(batch["image"]))  # MultiTaskNet.forward of main, MetaTensor and all
    output = ModelOutput(model.diagnosis(features), model.prognosis(features).squeeze(1))
    labels = torch.as_tensor(batch["label"], dtype=torch.long)
    known = labels >= 0
    diagnosis = torch.nn.functional.cross_entropy(output.logits.float()[known], labels[known])
    loss = diagnosis + 0.5 * _old_cox(output.risk.float(), batch["time"], batch["event"])
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def _meta_batch():
    from monai.data import MetaTensor

    torch.manual_seed(3)
    batch = _batch(4, [0, 1, -1, 2], [3.0, 8.0, 5.0, float("nan")], [1.0, 0.0, 1.0, float("nan")])
    batch["image"] = MetaTensor(torch.rand(4, 1, 64, 64, 48), affine=torch.diag(torch.tensor([2.5, 2.5, 2.5, 1.0])))
    return batch


def test_one_step_of_the_fast_path_matches_the_old_metatensor_path_on_cpu():
    """Same seed, augmentation off: loss and every gradient of one step equal main's MetaTensor step (DenseNet121)."""
    import copy

    from fl_client.compute import ComputeOptions, resolve_compute
    from fl_client.train import forward, loss_terms, prepare_model
    from models.factory import ModelConfig

    torch.manual_seed(0)
    reference = build_model(ModelConfig(name="densenet121")).train()
    batch = _meta_batch()
    old_loss, old_grads = _old_step(copy.deepcopy(reference), batch)

    compute = resolve_compute(ComputeOptions(), torch.device("cpu"))
    assert compute.precision == "fp32" and not compute.channels_last and compute.loader_workers == 0  # CPU default
    model = prepare_model(copy.deepcopy(reference), compute)
    output = forward(model, batch, compute.device)
    assert type(output.logits) is torch.Tensor  # no MetaTensor inside or out of the network
    loss, _, _ = loss_terms(output, batch, weights=(1.0, 0.5), device=compute.device)
    loss.backward()
    assert abs(float(loss) - old_loss) <= 1e-6 * max(1.0, abs(old_loss))
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, old_grads[name], rtol=1e-5, atol=1e-7), name

    # And train_model (the loop itself) reports the same loss for that step.
    class Loader(list):
        dataset = list(range(4))

    result = train_model(
        copy.deepcopy(reference), Loader([batch]), epochs=1, lr=1e-3, device=torch.device("cpu"), compute=compute
    )
    assert abs(result.loss - old_loss) <= 1e-6 * max(1.0, abs(old_loss))


def test_bf16_autocast_on_cpu_is_optional_and_close_to_fp32():
    import copy

    from fl_client.compute import ComputeOptions, resolve_compute
    from models.factory import ModelConfig

    torch.manual_seed(0)
    reference = build_model(ModelConfig(name="smallcnn"))

    class Loader(list):
        dataset = list(range(4))

    batch = _meta_batch()
    fp32 = train_model(copy.deepcopy(reference), Loader([batch]), epochs=1, lr=1e-3, device=torch.device("cpu"))
    bf16 = resolve_compute(ComputeOptions(precision="bf16"), torch.device("cpu"))
    assert bf16.autocast_dtype == torch.bfloat16 and not bf16.grad_scaler
    low = train_model(
        copy.deepcopy(reference), Loader([batch]), epochs=1, lr=1e-3, device=torch.device("cpu"), compute=bf16
    )
    assert math.isfinite(low.loss) and abs(low.loss - fp32.loss) < 0.05 * abs(fp32.loss) + 0.05


def test_train_model_applies_the_on_device_augmentation_to_each_batch():
    from preprocessing.transforms import BatchAugment, PipelineConfig

    model = build_model(ServerConfig(model_name="smallcnn").model)
    seen = []
    augment = BatchAugment(PipelineConfig(), seed=1)

    def spy(images):
        seen.append(images)
        return augment(images)

    class Loader(list):
        dataset = list(range(5))

    train_model(
        model,
        Loader([_batch(3, [0, 1, 2]), _batch(2, [0, 1])]),
        epochs=1,
        lr=1e-3,
        device=torch.device("cpu"),
        augment=spy,
    )
    assert [tuple(x.shape) for x in seen] == [(3, 1, 16, 16, 16), (2, 1, 16, 16, 16)]


def test_train_round_with_loader_workers_counts_the_same_studies(tiny_site):
    """Loader worker processes (persistent) are a site setting; the round trains on the same studies."""
    import dataclasses

    from fl_client.compute import ComputeOptions
    from fl_client.train import site_compute

    site, config = tiny_site
    site = dataclasses.replace(site, compute=ComputeOptions(loader_workers=2, persistent_workers=True))
    compute = site_compute(site)
    assert compute.loader_workers == 2 and compute.persistent_workers and not compute.pin_memory  # no pinning on CPU
    settings = config.round_settings(1)
    state, result = train_round(site, settings, build_model(settings.model).state_dict())
    assert (
        result.num_examples == 6
        and result.steps == 2 * math.ceil(6 / settings.batch_size)
        and math.isfinite(result.loss)
    )
    assert all(v.is_contiguous() for v in state.values())
    stats = [json.loads(line) for line in (site.site_dir / "train-stats.jsonl").read_text().splitlines()]
    assert stats[-1] == {
        "round": 1,
        "device": "cpu",
        "precision": "fp32",
        "examples": 6,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "peak_gpu_memory_mib": None,
    }


def test_profile_dropout_masks_value_and_flag_together_at_the_asked_rate():
    from fl_client.train import drop_profile_values

    torch.manual_seed(0)
    profile = torch.cat([torch.randn(4000, 8), torch.ones(4000, 8)], dim=1)
    dropped = drop_profile_values(profile, 0.3)
    masked = dropped[:, 8:] == 0
    assert 0.27 < masked.float().mean().item() < 0.33
    assert torch.all(dropped[:, :8][masked] == 0) and torch.equal(dropped[:, :8][~masked], profile[:, :8][~masked])
    assert torch.equal(drop_profile_values(profile, 0.0), profile)
    with pytest.raises(ValueError, match="profile dropout"):
        drop_profile_values(profile, 1.0)


def test_a_profile_model_trains_with_profile_dropout():
    from models.factory import ModelConfig

    model = build_model(ModelConfig(name="smallcnn", profile_fusion="late", profile_variables=3))
    seen = []
    original = model.forward

    def recording(x, covariates=None, profile=None):  # the real forward, recording the profile it was given
        seen.append(profile.clone())
        return original(x, covariates, profile)

    model.forward = recording

    class Loader(list):
        dataset = list(range(8))

    batch = {**_batch(8, [0, 1, 2, 0, 1, 2, 0, 1]), "profile": torch.cat([torch.ones(8, 3), torch.ones(8, 3)], dim=1)}
    torch.manual_seed(1)
    result = train_model(model, Loader([batch] * 4), epochs=1, lr=1e-3, device=torch.device("cpu"), profile_dropout=0.5)
    assert result.steps == 4 and math.isfinite(result.loss)
    flags = torch.cat(seen)[:, 3:]
    assert 0 < (flags == 0).float().mean().item() < 1  # some values masked, some kept
    assert torch.equal(batch["profile"], torch.ones(8, 6))  # the loader's batch itself is untouched


def test_fedbn_files_of_a_fused_model_are_kept_apart_from_the_image_only_ones(tmp_path):
    from fl_client.config import SiteConfig
    from fl_client.train import local_norm_path

    site = SiteConfig(site_name="s", dicom_dir=tmp_path, site_dir=tmp_path / "w", labels_csv=None)
    plain = ServerConfig(model_name="smallcnn").round_settings(1)
    fused = ServerConfig(model_name="smallcnn", profile_fusion="film").round_settings(1)
    assert local_norm_path(site, plain).name == "smallcnn-batch-3-0.pt"  # as before profiles existed
    assert local_norm_path(site, fused).name == "smallcnn-batch-3-0-film.pt"


def test_keep_local_optimiser_continues_the_sites_adam_moments_from_round_to_round(tiny_site, tmp_path):
    """``local-optimiser = keep``: a round saves the site's Adam moments (never in the reply) and the next round of
    the run continues them, at that round's learning rate; a run's first round, ``reset`` and a state of another
    model start fresh."""
    from dataclasses import replace

    from fl_client.train import local_optimiser, local_optimiser_path

    site, config = tiny_site
    site = replace(site, site_dir=tmp_path / "work")
    settings = replace(config.round_settings(1), local_optimiser="keep")
    model = build_model(settings.model)
    state, result = train_round(site, settings, model.state_dict())
    path = local_optimiser_path(site, settings)
    saved = torch.load(path, weights_only=True)
    assert int(saved["state"][0]["step"]) == result.steps  # one Adam step per batch of round 1
    assert set(state) == set(model.state_dict())  # the reply is the weights only
    model.load_state_dict(state)
    second = replace(settings, server_round=2, learning_rate=0.005)
    continued = local_optimiser(site, second, model, lr=second.learning_rate)
    assert int(continued.state_dict()["state"][0]["step"]) == result.steps
    assert torch.equal(continued.state_dict()["state"][0]["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])
    _, result2 = train_round(site, second, state)
    assert int(torch.load(path, weights_only=True)["state"][0]["step"]) == result.steps + result2.steps
    for fresh in (
        settings,  # a run's first round
        replace(second, local_optimiser="reset"),
    ):
        assert local_optimiser(site, fresh, model, lr=0.01).state_dict()["state"] == {}
    other = build_model(replace(settings.model, name="densenet121"))  # saved moments do not fit: fresh
    assert local_optimiser(site, second, other, lr=0.01).state_dict()["state"] == {}
    path.write_bytes(b"not a torch file")  # unreadable (e.g. a disk fault): fresh, not a failed round
    assert local_optimiser(site, second, model, lr=0.01).state_dict()["state"] == {}
    with pytest.raises(ValueError, match="local-optimiser 'sometimes'"):
        replace(settings, local_optimiser="sometimes")


def test_train_model_continues_a_given_optimiser_at_the_rounds_learning_rate():
    from monai.data import DataLoader

    model = build_model(ServerConfig(model_name="smallcnn", input_size="16,16,16").model)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.5)
    items = [{"image": torch.rand(1, 16, 16, 16), "label": i % 3, "time": 5.0, "event": 1.0} for i in range(4)]
    result = train_model(
        model, DataLoader(items, batch_size=2), epochs=1, lr=0.002, device=torch.device("cpu"), optimiser=optimiser
    )
    assert result.steps == 2 and int(optimiser.state_dict()["state"][0]["step"]) == 2
    assert all(group["lr"] == 0.002 for group in optimiser.param_groups)
