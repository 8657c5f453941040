"""The clinical/molecular profile of one predicted study, as the clinician's pages show it (issue #24.5).

For a bundle that fuses the profile (``model.json`` ``profile_normalisation``), :func:`profile_record` lists each
schema variable's value as the model received it (schema units, after the site's unit conversion), which were
missing (masked, never imputed) and how much each contributed to the risk score and to the probability of the
reported diagnosis.

Attribution is **exact occlusion of the tabular branch**: the image features are computed once; for each measured
variable the heads are rerun with that variable set to "missing" (z-score 0, presence flag 0: exactly what the model
sees for an unmeasured value), and its contribution is the full prediction minus the occluded one. No sampling, no
approximation; V + 1 passes of the heads only. A positive risk contribution means the value raised the risk score
(log-risk units of the Cox head); a diagnosis contribution is in percentage points of the calibrated probability.
These are statements about the model, not about the patient's physiology: the pages word them as decision support.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from models.factory import MultiTaskNet, as_plain_tensor
from preprocessing.profile import ProfileSchema
from preprocessing.profile_features import ProfileNormalisation

#: How the attribution was computed (shown on the pages and stored in prediction.json).
METHOD = "occlusion of each profile value (set to missing) in the fused model's heads; exact, no sampling"
#: Variables listed as the main contributors: at most this many, and only those above :data:`MIN_SHOWN` of the largest.
TOP_N = 3
MIN_SHOWN = 0.1


def profile_tensor(normalisation: ProfileNormalisation, values: np.ndarray) -> torch.Tensor:
    """(1, 2V) model input of one study's schema-unit values (NaN = missing)."""
    return torch.from_numpy(normalisation.vector(np.asarray(values, dtype=np.float64)[None]))


@torch.no_grad()
def profile_record(
    model: MultiTaskNet,
    image: torch.Tensor,
    values: np.ndarray,
    *,
    normalisation: ProfileNormalisation,
    schema: ProfileSchema,
    class_index: int,
    temperature: float = 1.0,
    covariates: torch.Tensor | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The profile section of a study's result: values used, missing ones, and each value's contribution.

    ``image`` is the prepared (1, C, X, Y, Z) input; ``values`` (V,) in schema units with NaN for missing;
    ``class_index`` the reported diagnosis. ValueError when the bundle's variables are not ``schema``'s.
    """
    if tuple(normalisation.variables) != schema.names:
        raise ValueError(
            f"the bundle's profile variables ({len(normalisation.variables)}) are not this schema's "
            f"({schema.name} v{schema.version}, {len(schema.names)})"
        )
    device = next(model.parameters()).device
    model.eval()
    image = as_plain_tensor(image).to(device)
    features = model.backbone(image) if model.uses_image else image.new_zeros((image.shape[0], 0))
    cov = None if covariates is None else covariates.to(device)
    values = np.asarray(values, dtype=np.float64)
    usable = normalisation.usable
    measured = ~np.isnan(values) & usable
    batch = np.repeat(values[None], 1 + int(measured.sum()), axis=0)
    for row, j in enumerate(np.flatnonzero(measured), start=1):
        batch[row, j] = np.nan  # occluded: the model sees "missing"
    profile = torch.from_numpy(normalisation.vector(batch)).to(device)
    out = model.heads(features.expand(len(batch), -1), None if cov is None else cov.expand(len(batch), -1), profile)
    probs = torch.softmax(out.logits.float() / float(temperature), dim=1)[:, class_index].cpu().numpy()
    risk = out.risk.float().cpu().numpy()
    entries = []
    row_of = {int(j): row for row, j in enumerate(np.flatnonzero(measured), start=1)}
    for j, variable in enumerate(schema.variables):
        value = None if math.isnan(values[j]) else float(values[j])
        entry: dict[str, Any] = {
            "name": variable.name,
            "label": variable.label or variable.name,
            "unit": variable.unit,
            "value": _shown(variable, value),
            "missing": value is None,
            "used": bool(measured[j]),
        }
        if value is not None and not usable[j]:
            entry["note"] = "no pooled statistics for this variable (too few studies across sites); not used"
        if j in row_of:
            entry["risk_contribution"] = float(risk[0] - risk[row_of[j]])
            entry["diagnosis_contribution"] = float(probs[0] - probs[row_of[j]])
        entries.append(entry)
    return {
        "variables": entries,
        "missing": [e["name"] for e in entries if e["missing"]],
        "top_risk": top_contributors(entries, "risk_contribution"),
        "top_diagnosis": top_contributors(entries, "diagnosis_contribution"),
        "method": METHOD,
        "schema": normalisation.schema or f"{schema.name} v{schema.version}",
        "source": source,
    }


def top_contributors(entries: Sequence[Mapping[str, Any]], key: str, *, n: int = TOP_N) -> list[str]:
    """Names of the variables whose |``key``| is largest (at most ``n``, each at least :data:`MIN_SHOWN` of the largest)."""
    scored = sorted(((abs(e[key]), e["name"]) for e in entries if key in e), reverse=True)
    if not scored or scored[0][0] <= 0:
        return []
    return [name for size, name in scored[:n] if size >= MIN_SHOWN * scored[0][0]]


def _shown(variable: Any, value: float | None) -> Any:
    """The value as the pages print it: a category's name, yes/no, or the number."""
    if value is None:
        return None
    if variable.type == "bool":
        return "yes" if value >= 0.5 else "no"
    if variable.type == "category":
        return variable.categories[round(value)]
    return round(value, 4)
