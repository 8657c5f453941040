"""A site's part in a campaign: its studies as training reads them (clinician feedback applied when the site opted
in) and the aggregate counts it reports with its training replies.

- **New studies.** ``SITE_DIR/campaigns.json`` keeps the pseudonymous study ids of the last two runs this site
  trained in (site-local; never sent). A run's first training round compares its studies with those of the previous
  run: ``train-new-studies`` is how many were not there (in the site's first run: all of them). Re-ingestion after studies
  were added reads only the new series' pixels: the others' preprocessed images are in the cache, keyed by each
  series' files (``preprocessing.ingest``, ``tests/test_ingest.py``).
- **Feedback labels** (``preprocessing.labels.merge_feedback``): ``train-feedback-labels`` training studies labelled by
  the review page's feedback, ``train-feedback-conflicts`` where feedback and labels.csv disagree.

The counts go through the privacy floor like every count (``fl_client.metrics.floor_training``: 0 or >= k, else
NaN). No flwr here.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedct.files import atomic_write_bytes
from fedct.protocol import FEEDBACK_CONFLICTS, FEEDBACK_LABELS, NEW_STUDIES, RoundSettings
from fl_client.config import SiteConfig
from preprocessing.ingest import SiteManifest, prepare_site
from preprocessing.labels import FeedbackCounts, merge_feedback, read_feedback_labels

__all__ = ["CAMPAIGNS_NAME", "campaign_counts", "new_studies", "site_manifest"]

CAMPAIGNS_NAME = "campaigns.json"


def site_manifest(site: SiteConfig, settings: RoundSettings) -> tuple[SiteManifest, FeedbackCounts]:
    """The site's prepared studies for the round's pipeline (ingested, or re-ingested when inputs changed), with
    feedback labels applied to the training split when the site opted in, and what feedback did."""
    manifest = prepare_site(
        site.dicom_dir,
        site.site_dir,
        labels_csv=site.labels_csv,
        pipeline=settings.pipeline,
        split=settings.split,
        workers=site.workers,
    )
    if site.feedback is None:
        return manifest, FeedbackCounts()
    feedback = read_feedback_labels(site.feedback.db)
    studies, counts = merge_feedback(manifest.studies, feedback, conflict=site.feedback.conflict)
    from dataclasses import replace

    return replace(manifest, studies=studies), counts


def new_studies(site_dir: Path, run_id: str, study_ids: list[str]) -> int:
    """How many of ``study_ids`` were not among the studies of the previous run this site took part in (all of them
    in its first); records this run's ids in ``SITE_DIR/campaigns.json`` (the last two runs are kept)."""
    path = Path(site_dir) / CAMPAIGNS_NAME
    try:
        runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        runs = []
    if runs and runs[-1].get("run") == run_id:
        runs[-1] = {"run": run_id, "studies": sorted(study_ids)}
    else:
        runs.append({"run": run_id, "studies": sorted(study_ids)})
    runs = runs[-2:]
    atomic_write_bytes(path, json.dumps({"runs": runs}).encode())
    previous = set(runs[-2]["studies"]) if len(runs) > 1 else set()
    return len(set(study_ids) - previous)


def campaign_counts(site: SiteConfig, settings: RoundSettings, run_id: str) -> dict[str, int]:
    """The campaign counts of a training reply (before the privacy floor): studies new since the previous run (every
    accepted study, all splits), training studies labelled by feedback, feedback conflicting with labels.csv."""
    manifest, counts = site_manifest(site, settings)
    return {
        NEW_STUDIES: new_studies(site.site_dir, run_id, [s.id for s in manifest.studies]),
        FEEDBACK_LABELS: counts.used,
        FEEDBACK_CONFLICTS: counts.conflicts,
    }
