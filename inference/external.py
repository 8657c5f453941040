"""External validation: score a model on a labelled DICOM collection that no site trained on.

Internal test AUC says how well a model does on studies like its training data; an external family (another
generator, another hospital's collection) says whether it learned the finding. The collection is ingested like a
site (same validation, pipeline and cache; into its own work folder), every study with a label is scored, none
is held out for anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from sklearn.metrics import roc_auc_score

from fl_client.train import predict
from models.factory import ModelConfig, build_model
from preprocessing.cache import make_dataset
from preprocessing.ingest import prepare_site
from preprocessing.labels import DIAGNOSES
from preprocessing.pipeline import PipelineConfig

#: Keys of :meth:`ExternalScore.metrics` (``external-`` prefix, as internal metrics use ``test-``); ``-low`` and
#: ``-high``: the COVID-vs-normal AUC's 95 % confidence interval (:func:`auc_interval`).
EXTERNAL_KEYS = (
    "external-n",
    "external-auc-macro",
    "external-auc-covid-vs-normal",
    "external-auc-covid-vs-normal-low",
    "external-auc-covid-vs-normal-high",
    "external-accuracy",
)
#: Two-sided normal quantile of the 95 % interval.
_Z95 = 1.959963984540054


def auc_interval(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float] | None:
    """95 % confidence interval of the ROC AUC of scores ``positives`` against ``negatives`` by DeLong's variance
    (DeLong, DeLong & Clarke-Pearson 1988; ties count one half), clipped to [0, 1]; None with fewer than 2 of either.

    An external collection is small (tens of studies): on 8 + 8 studies an AUC of 0.75 has a standard error near 0.13,
    so a figure without its interval says little about whether a goal was met.
    """
    x = np.asarray(positives, dtype=np.float64).ravel()
    y = np.asarray(negatives, dtype=np.float64).ravel()
    if x.size < 2 or y.size < 2:
        return None
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    auc = float(psi.mean())
    variance = psi.mean(axis=1).var(ddof=1) / x.size + psi.mean(axis=0).var(ddof=1) / y.size
    half = _Z95 * float(np.sqrt(variance))
    return max(0.0, auc - half), min(1.0, auc + half)


@dataclass(frozen=True)
class ExternalScore:
    """Diagnosis figures of one model on an external collection (None where undefined, e.g. a class missing)."""

    n: int
    counts: dict[str, int]
    auc_macro: float | None
    auc_covid_vs_normal: float | None
    accuracy: float | None
    #: 95 % confidence interval of ``auc_covid_vs_normal`` (:func:`auc_interval`); None where undefined.
    auc_covid_vs_normal_interval: tuple[float, float] | None = None

    def metrics(self) -> dict[str, float | int | None]:
        """The figures under :data:`EXTERNAL_KEYS`."""
        low, high = self.auc_covid_vs_normal_interval or (None, None)
        values = (self.n, self.auc_macro, self.auc_covid_vs_normal, low, high, self.accuracy)
        return dict(zip(EXTERNAL_KEYS, values, strict=True))


def external_figures(probs: np.ndarray, labels: np.ndarray) -> ExternalScore:
    """Macro one-vs-rest AUC over the classes present (None unless all of fedct's classes are), COVID-vs-normal AUC
    (P(covid) on the COVID and normal studies) with its 95 % interval, and accuracy, from class probabilities and
    labels (-1: unknown)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (studies, classes) matching labels, got {probs.shape} and {labels.shape}")
    known = labels >= 0
    probs, labels = probs[known], labels[known]
    counts = {name: int((labels == i).sum()) for i, name in enumerate(DIAGNOSES[: probs.shape[1]])}
    macro = None
    if len(labels) and all(counts.values()):
        macro = float(
            roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])))
        )
    covid, normal = DIAGNOSES.index("covid"), DIAGNOSES.index("normal")
    pair = (labels == covid) | (labels == normal)
    vs_normal, interval = None, None
    if counts.get("covid") and counts.get("normal"):
        vs_normal = float(roc_auc_score(labels[pair] == covid, probs[pair, covid]))
        interval = auc_interval(probs[labels == covid, covid], probs[labels == normal, covid])
    accuracy = float((probs.argmax(axis=1) == labels).mean()) if len(labels) else None
    return ExternalScore(int(len(labels)), counts, macro, vs_normal, accuracy, interval)


def score_external(
    state: Mapping[str, torch.Tensor],
    *,
    model: ModelConfig,
    pipeline: PipelineConfig,
    dicom_dir: Path,
    labels_csv: Path,
    work_dir: Path,
    batch_size: int = 4,
) -> ExternalScore:
    """Ingest ``dicom_dir`` (cached in ``work_dir``, reused while unchanged) and score ``state`` on every labelled study.

    Runs on the CPU with the evaluation path of training (:func:`fl_client.train.predict`).
    """
    manifest = prepare_site(Path(dicom_dir), Path(work_dir), labels_csv=Path(labels_csv), pipeline=pipeline)
    items = [s.item() for s in manifest.studies if s.diagnosis is not None]
    if not items:
        raise ValueError(f"no labelled study in {dicom_dir} (see {Path(work_dir) / 'ingest_report.json'})")
    network = build_model(model)
    network.load_state_dict(dict(state))
    dataset = make_dataset(items, pipeline, manifest.site_dir, augment=False)
    preds = predict(
        network, DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0), device=torch.device("cpu")
    )
    return external_figures(preds.probs, preds.labels)
