"""SecAgg+ (Flower's legacy workflow) inside fedct's ServerApp: settings checks and a real simulation whose secure
aggregate equals the plain FedAvg aggregate of the same site updates, with metrics and checkpoints as usual; and a
fused-profile run whose profile statistics go through SecAgg+ too (the pooled normalisation equals the plain one
within the stated error, and no reply carries one site's statistics)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from federation import TINY_RUN_CONFIG, tiny_federation
from flwr.app import ArrayRecord, Context, Message
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.simulation import run_simulation

from fedct.demo import simulation_backend_config
from fedct.protocol import PROFILE_STATISTICS
from fl_client.client_app import build_client_app
from fl_client.secagg import LEGACY_FIT_KEY
from fl_server.config import ServerConfig
from fl_server.privacy import PrivacyConfig
from fl_server.secagg import quantization_tolerance
from fl_server.server_app import build_server_app
from models.bundle import load_bundle
from preprocessing.profile import aggregate_statistics, read_schema, read_site_profile
from preprocessing.profile_features import ProfileNormalisation
from preprocessing.profile_secagg import SecureLayout

MAX_WEIGHT = 10.0  # about the sites' training counts here (see fl_server.secagg on precision)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"secagg-num-shares": 2}, "secagg-num-shares"),
        ({"secagg-reconstruction-threshold": 3}, "secagg-reconstruction-threshold"),
        ({"secagg-reconstruction-threshold": 1}, "secagg-reconstruction-threshold"),
        ({"secagg-max-weight": 0.0}, "secagg-max-weight"),
        ({"min-sites": 1}, "min-sites"),
        ({"secure-aggregation": "maybe"}, "secure-aggregation"),
        (
            {"dp-mode": "server-fixed", "dp-noise-multiplier": 1.0, "dp-clipping-norm": 1.0, "model-norm": "group"},
            "dp-mode",
        ),
    ],
)
def test_bad_secagg_settings_fail_before_the_run_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        ServerConfig.from_run_config({**TINY_RUN_CONFIG, "secure-aggregation": True, **overrides})


def test_secagg_refuses_robust_aggregation():
    with pytest.raises(ValueError, match="strategy"):
        PrivacyConfig(secure_aggregation=True).check_run(min_sites=3, model_norm="batch", strategy="krum")


def test_secagg_defaults_are_off_and_valid():
    config = ServerConfig().privacy
    assert config.secure_aggregation is False
    assert ServerConfig.from_run_config({"secure-aggregation": "true"}).privacy.secure_aggregation is True


def recording_mod(folder: Path):
    """Client mod inside Flower's secaggplus_mod: saves each site's legacy fit result (its update before masking)."""

    def mod(msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if LEGACY_FIT_KEY in msg.content.array_records and not reply.has_error():
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            rnd = int(msg.content.config_records["fitins.config"]["server-round"])
            site = str(fitres.metrics["site-name"])
            np.savez(
                folder / f"{site}-round{rnd}.npz",
                num_examples=fitres.num_examples,
                **{f"u{i}": a for i, a in enumerate(parameters_to_ndarrays(fitres.parameters))},
            )
        return reply

    return mod


def masked_vector_mod(folder: Path):
    """Client mod outside Flower's secaggplus_mod: saves what a site really sends in SecAgg+'s collect stage."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    def mod(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = None if configs is None else configs.get(Key.STAGE)  # read first: secaggplus_mod consumes the record
        reply = call_next(msg, context)
        if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            sent = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            site = f"site-{context.node_config['partition-id']}"
            rnd = len(list(folder.glob(f"masked-{site}-r*.npz"))) + 1
            np.savez(folder / f"masked-{site}-r{rnd}.npz", *[bytes_to_ndarray(b) for b in sent])
        return reply

    return mod


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    tiny_federation(root / "data", sites=3, patients_per_site=8)
    run_dir, replies = root / "run", root / "replies"
    replies.mkdir()
    server_config = {
        **TINY_RUN_CONFIG,
        "num-server-rounds": 2,
        "min-sites": 3,
        "run-dir": str(run_dir),
        "secure-aggregation": True,
        "secagg-max-weight": MAX_WEIGHT,
    }
    run_simulation(
        server_app=build_server_app(server_config),
        client_app=build_client_app(
            {"sim-data-root": str(root / "data"), "sim-work-root": str(root / "sites")},
            mods=[recording_mod(replies)],
            outer_mods=[masked_vector_mod(replies)],
        ),
        num_supernodes=3,
        backend_config=simulation_backend_config(),
    )
    return run_dir, replies


@pytest.mark.parametrize("server_round", [1, 2])
def test_secure_aggregate_equals_plain_fedavg_of_the_same_updates(secagg_run, server_round):
    run_dir, replies = secagg_run
    before = torch.load(run_dir / "checkpoints" / f"round-{server_round - 1:03d}.pt", weights_only=True)
    after = torch.load(run_dir / "checkpoints" / f"round-{server_round:03d}.pt", weights_only=True)
    floats = [k for k, v in before.items() if v.is_floating_point()]
    sites = sorted(replies.glob(f"*-round{server_round}.npz"))
    assert len(sites) == 3
    models, counts = [], []
    for path in sites:
        with np.load(path) as data:
            counts.append(int(data["num_examples"]))
            models.append({k: before[k].numpy().astype(np.float64) + data[f"u{i}"] for i, k in enumerate(floats)})
    # Plain FedAvg: the sites' trained models averaged with weights num-examples / total.
    fedavg = {k: sum(n * m[k] for n, m in zip(counts, models, strict=True)) / sum(counts) for k in floats}
    max_update = max(float(np.abs(m[k] - before[k].numpy()).max()) for m in models for k in floats)
    tolerance = quantization_tolerance(
        clipping_range=8.0, weights=[n / MAX_WEIGHT for n in counts], max_update=max_update
    )
    deviation = max(float(np.abs(after[k].numpy() - fedavg[k]).max()) for k in floats)
    assert deviation <= tolerance
    assert max_update > 100 * tolerance  # the comparison is not trivially satisfied by tiny updates
    # Integer buffers (BatchNorm batch counters) are not aggregated by SecAgg+: they keep the global value.
    assert all(torch.equal(before[k], after[k]) for k in before if k not in floats)


@pytest.mark.parametrize("server_round", [1, 2])
def test_what_leaves_a_site_is_masked_not_its_update(secagg_run, server_round):
    """The vector a site sends is its quantized weighted update plus masks: uniform mod 2**32, unrelated to the
    update (while the aggregate of all sites is still the plain weighted mean, test above)."""
    _, replies = secagg_run
    raw_paths = sorted(replies.glob(f"site-*-round{server_round}.npz"))
    assert len(raw_paths) == 3
    for raw_path in raw_paths:
        site = raw_path.name.split("-round")[0]
        with np.load(raw_path) as raw, np.load(replies / f"masked-{site}-r{server_round}.npz") as masked:
            update = [raw[f"u{i}"] for i in range(len(raw.files) - 1)]
            ratio = round(int(raw["num_examples"]) / MAX_WEIGHT * 2**22) / 2**22
            sent = [masked[f"arr_{i}"] for i in range(len(masked.files))]
        assert len(sent) == len(update) + 1  # SecAgg+ prepends the quantized weight
        # What an unmasked site would send: the update x weight quantized to [0, 2**22] (stochastic rounding: +-1).
        plain = np.concatenate([((np.clip(u * ratio, -8.0, 8.0) + 8.0) * 2**22 / 16.0).ravel() for u in update])
        sent_flat = np.concatenate([a.ravel() for a in sent[1:]]).astype(np.float64)
        assert sent_flat.shape == plain.shape and plain.size > 1000
        assert np.mean(np.abs(sent_flat - plain) <= 1.0) < 0.001  # virtually no value is its plain quantization
        assert (
            np.mean(sent_flat > 2**22) > 0.9
        )  # masks spread the values over [0, 2**32), far beyond the update's range
        assert abs(np.corrcoef(sent_flat, plain)[0, 1]) < 0.05


def test_metrics_checkpoints_and_bundles_are_written_as_without_secagg(secagg_run):
    run_dir, _ = secagg_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    initial = torch.load(run_dir / "checkpoints" / "round-000.pt", weights_only=True)
    model_bytes = sum(v.numel() * v.element_size() for v in initial.values() if v.is_floating_point())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert sorted(entry["train"]["sites"]) == ["site-0", "site-1", "site-2"]
        assert sorted(entry["evaluate"]["sites"]) == ["site-0", "site-1", "site-2"]
        assert entry["train"]["aggregate"]["num-examples"] == sum(
            s["num-examples"] for s in entry["train"]["sites"].values()
        )
        # every site has fewer than k = 5 validation studies here: the key is there, the value withheld (privacy floor)
        assert "val-loss" in entry["evaluate"]["aggregate"] and entry["evaluate"]["aggregate"]["val-n"] > 0
        # SecAgg+'s four stages and the evaluation are counted: at least the model out to and an update back from each site.
        assert entry["bytes_sent"] > 3 * model_bytes and entry["bytes_received"] > 3 * model_bytes
        assert not entry["skipped"] and entry["rejected_updates"] == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round-000.pt",
        "round-001.pt",
        "round-002.pt",
    ]
    _, meta = load_bundle(run_dir / "model" / "final")
    assert meta["provenance"]["run_config"]["secure-aggregation"] is True
    assert "Secure aggregation (SecAgg+)" in (run_dir / "model" / "final" / "model_card.md").read_text()
    # No site may send a validation metric (fewer than k = 5 studies each): no round is claimed best, no best bundle.
    assert metrics["best_round"] is None and not (run_dir / "model" / "best").exists()


# --- a fused run: the profile statistics exchange through SecAgg+ as well ------------------------------------------


def statistics_vector_mod(folder: Path):
    """Client mod inside Flower's secaggplus_mod: saves each site's plain statistics vector (before masking)."""

    def mod(msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        config = msg.content.config_records.get("fitins.config")
        if config is not None and config.get(PROFILE_STATISTICS) and not reply.has_error():
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            (vector,) = parameters_to_ndarrays(fitres.parameters)
            np.save(folder / f"plain-{fitres.metrics['site-name']}.npy", vector)
        return reply

    return mod


def statistics_reply_mod(folder: Path):
    """Client mod outside Flower's secaggplus_mod: keeps every reply of the statistics exchange (group "0") as it
    leaves the site: each record's type and plain values, and the masked vector of the collect stage."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    def mod(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = None if configs is None else configs.get(Key.STAGE)  # read first: secaggplus_mod consumes it
        reply = call_next(msg, context)
        if msg.metadata.group_id != "0" or reply.has_error():
            return reply
        site = f"site-{context.node_config['partition-id']}"
        records = {}
        for name, record in reply.content.items():
            values = {k: v for k, v in record.items()} if not isinstance(record, ArrayRecord) else {}
            records[name] = {
                "type": type(record).__name__,
                "size": sum(len(a.data) for a in record.values()) if isinstance(record, ArrayRecord) else None,
                "values": {k: v for k, v in values.items() if not isinstance(v, bytes | list)},
                "lists": sorted(k for k, v in values.items() if isinstance(v, list)),
            }
        (folder / f"reply-{site}-{stage}.json").write_text(json.dumps(records))
        if stage == Stage.COLLECT_MASKED_VECTORS:
            sent = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            np.savez(folder / f"masked-{site}.npz", *[bytes_to_ndarray(b) for b in sent])
        return reply

    return mod


@pytest.fixture(scope="module")
def fused_secagg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg-fused")
    tiny_federation(root / "data", sites=3, patients_per_site=10)
    run_dir, replies = root / "run", root / "replies"
    replies.mkdir()
    server_config = {
        **TINY_RUN_CONFIG,
        "num-server-rounds": 1,
        "min-sites": 3,
        "run-dir": str(run_dir),
        "secure-aggregation": True,
        "secagg-max-weight": MAX_WEIGHT,
        "profile-fusion": "late",
    }
    run_simulation(
        server_app=build_server_app(server_config),
        client_app=build_client_app(
            {"sim-data-root": str(root / "data"), "sim-work-root": str(root / "sites")},
            mods=[statistics_vector_mod(replies)],
            outer_mods=[statistics_reply_mod(replies)],
        ),
        num_supernodes=3,
        backend_config=simulation_backend_config(),
    )
    return root, run_dir, replies


def test_a_fused_run_with_secure_aggregation_trains_end_to_end(fused_secagg_run):
    _, run_dir, _ = fused_secagg_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (entry,) = metrics["rounds"]
    assert not entry["skipped"] and sorted(entry["train"]["sites"]) == ["site-0", "site-1", "site-2"]
    before = torch.load(run_dir / "checkpoints" / "round-000.pt", weights_only=True)
    after = torch.load(run_dir / "checkpoints" / "round-001.pt", weights_only=True)
    profile_keys = [k for k in before if k.startswith("profile") and before[k].is_floating_point()]
    assert profile_keys and any(
        not torch.equal(before[k], after[k]) for k in profile_keys
    )  # the profile branch trained
    saved = ProfileNormalisation.from_dict(json.loads((run_dir / "profile-normalisation.json").read_text()))
    model, meta = load_bundle(run_dir / "model" / "final")
    assert meta["model"]["profile_fusion"] == "late" and model.n_profile == 2 * len(saved.variables)
    assert ProfileNormalisation.from_dict(meta["profile_normalisation"]) == saved
    assert metrics["profile_normalisation"]["mean"] == list(saved.mean)


def test_the_secure_normalisation_equals_the_plain_pooling_within_the_stated_error(fused_secagg_run):
    root, run_dir, replies = fused_secagg_run
    schema = read_schema()
    layout = SecureLayout.from_schema(schema)
    record = json.loads((run_dir / "profile-normalisation.json").read_text())
    secure = ProfileNormalisation.from_dict(record)
    # what plain (non-secure) pooling of the same sites gives
    stats = [aggregate_statistics(read_site_profile(root / "data" / f"site-{i}"), min_count=5) for i in range(3)]
    plain = ProfileNormalisation.pooled(schema, stats)
    assert secure.count == plain.count and secure.sites == 3 and sum(c > 0 for c in plain.count) >= 10
    bounds = record["secure_aggregation"]
    assert bounds["sites"] == ["site-0", "site-1", "site-2"] and bounds["rows"] == sum(s.n_rows for s in stats)
    for j, name in enumerate(schema.names):
        float_slack = 1e-12 * (layout.width[j] + abs(layout.low[j]))  # float64 rounding of the plain sums
        assert abs(secure.mean[j] - plain.mean[j]) <= bounds["mean_error_bound"][j] + float_slack, name
        assert abs(secure.std[j] - plain.std[j]) <= bounds["std_error_bound"][j] + float_slack, name
    # the server decoded exactly the sum of the three sites' plain vectors
    vectors = [np.load(replies / f"plain-site-{i}.npy") for i in range(3)]
    decoded = layout.decode(sum(vectors), sites=3, min_count=5, count_bound=100_000)
    assert decoded.normalisation(schema, min_count=5) == secure


def test_the_server_receives_no_single_sites_statistics(fused_secagg_run):
    """Every reply of the statistics exchange as it leaves a site: SecAgg+'s keys, shares and a masked vector; the
    only plain values are the site name, weight 1 and the status; no count, sum or list of numbers."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage

    _, run_dir, replies = fused_secagg_run
    stages = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
    for i in range(3):
        site = f"site-{i}"
        for stage in stages:
            records = json.loads((replies / f"reply-{site}-{stage}.json").read_text())
            assert all(r["lists"] == [] or name == RECORD_KEY_CONFIGS for name, r in records.items()), (site, stage)
            assert all(r["size"] in (None, 0) for r in records.values())  # no array leaves the site
            plain = {k: v for name, r in records.items() if name != RECORD_KEY_CONFIGS for k, v in r["values"].items()}
            if stage == Stage.COLLECT_MASKED_VECTORS:
                assert plain == {"site-name": site, "num_examples": 1, "code": 0, "message": "ok"}
            else:
                assert plain == {}
        # the masked vector: nothing like the site's plain vector quantized (limb + 2**21), spread over [0, 2**32)
        with np.load(replies / f"masked-{site}.npz") as masked:
            sent = [masked[f"arr_{j}"] for j in range(len(masked.files))]
        vector = np.load(replies / f"plain-{site}.npy")
        assert len(sent) == 2 and sent[1].shape == vector.shape  # SecAgg+ prepends the (masked) weight
        quantized = vector + 2**21
        assert np.all(np.abs(sent[1].astype(np.float64) - quantized) > 1)
        assert np.mean(sent[1].astype(np.float64) > 2**22) > 0.9
    # the run folder keeps the pooled moments and who is in the sum, never a site's statistics or variables
    record = json.loads((run_dir / "profile-normalisation.json").read_text())
    assert "site_variables" not in record and record["rejected_replies"] == [] and record["missing_replies"] == []
    assert record["bytes_received"] > 0


def drop_out_of_statistics_mod(partition: int):
    """Client mod outside Flower's secaggplus_mod: the site ``partition`` fails the statistics exchange's collect
    stage (as a site that crashes or loses its connection after sharing its keys), and only that stage."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    def mod(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = None if configs is None else configs.get(Key.STAGE)
        if (
            msg.metadata.group_id == "0"
            and stage == Stage.COLLECT_MASKED_VECTORS
            and int(context.node_config["partition-id"]) == partition
        ):
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="internal_error incident=0badc0de"),
                reply_to=msg,
            )
        return call_next(msg, context)

    return mod


def test_a_site_dropping_out_of_the_secure_statistics_leaves_the_others_sum(tmp_path):
    """SecAgg+ unmasks the sum of the sites that sent their vector (the dropped site's masks are rebuilt from its
    neighbours' shares): the normalisation is that of the two others, the third is recorded as missing and still
    trains."""
    tiny_federation(tmp_path / "data", sites=3, patients_per_site=8)
    run_dir = tmp_path / "run"
    server_config = {
        **TINY_RUN_CONFIG,
        "num-server-rounds": 1,
        "min-sites": 2,
        "run-dir": str(run_dir),
        "secure-aggregation": True,
        "secagg-max-weight": MAX_WEIGHT,
        "profile-fusion": "late",
    }
    run_simulation(
        server_app=build_server_app(server_config),
        client_app=build_client_app(
            {"sim-data-root": str(tmp_path / "data"), "sim-work-root": str(tmp_path / "sites")},
            outer_mods=[drop_out_of_statistics_mod(2)],
        ),
        num_supernodes=3,
        backend_config=simulation_backend_config(),
    )
    record = json.loads((run_dir / "profile-normalisation.json").read_text())
    assert record["secure_aggregation"]["sites"] == ["site-0", "site-1"] and record["sites"] == 2
    # the dropped site had not named itself yet (SecAgg+'s first stages carry no name): it is recorded by node id
    (missing,) = record["missing_replies"]
    assert missing["site"] == f"node-{missing['node_id']}" and "no masked profile statistics" in missing["reason"]
    schema = read_schema()
    stats = [aggregate_statistics(read_site_profile(tmp_path / "data" / f"site-{i}"), min_count=5) for i in (0, 1)]
    plain = ProfileNormalisation.pooled(schema, stats)
    secure = ProfileNormalisation.from_dict(record)
    assert secure.count == plain.count and record["secure_aggregation"]["rows"] == sum(s.n_rows for s in stats)
    assert np.allclose(secure.mean, plain.mean, rtol=1e-9, atol=1e-9)
    (entry,) = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert not entry["skipped"] and sorted(entry["train"]["sites"]) == ["site-0", "site-1", "site-2"]
