"""inference.report: a self-contained, one-screen HTML report whose numbers match prediction.json."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_inference_predict import make_bundle

from inference.local_identity import LocalIdentity
from inference.predict import PREDICTION_NAME, run_predict
from inference.report import DISCLAIMER, percent, render_report, write_report
from inference.wording import IDENTIFIERS_HIDDEN, IDENTIFIERS_LOCAL


class Page(HTMLParser):
    """Collects tags with their attributes, the visible text, and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag not in ("img", "meta", "br", "link", "input"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())

    def find(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag]


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert not page.open, f"unclosed tags: {page.open}"
    return page


@pytest.fixture(scope="module")
def reported(tmp_path_factory, series_writer):
    root = tmp_path_factory.mktemp("report")
    for i in range(2):
        series_writer(
            root / "in" / f"s{i}",
            n_slices=12,
            rows=28,
            cols=28,
            pixel_spacing_mm=(8.0, 8.0),
            slice_spacing_mm=8.0,
            seed=i,
        )
    bundle = make_bundle(root / "bundle", quantiles=(-0.25, 0.25))
    summary = run_predict(bundle, root / "in", root / "out", device="cpu", progress=False)
    assert len(summary.results) == 2
    return summary, root


def test_report_is_self_contained_and_embeds_every_overlay(reported):
    summary, root = reported
    for result in summary.results:
        text = (root / "out" / result.study_key / "report.html").read_text(encoding="utf-8")
        page = parse(text)
        for tag, attrs in page.tags:
            for name in ("src", "href", "action", "srcset", "data"):
                value = attrs.get(name, "")
                assert not value or value.startswith("data:image/png;base64,"), (tag, name, value[:40])
        assert "http:" not in text and "https:" not in text and "url(" not in text
        assert not page.find("script") and not page.find("link") and not page.find("iframe")
        images = [a["src"] for a in page.find("img")]
        assert len(images) == len(result.overlays) >= 1
        for overlay in result.overlays:
            encoded = base64.b64encode(Path(overlay).read_bytes()).decode("ascii")
            assert f"data:image/png;base64,{encoded}" in images


def test_report_says_what_matters_and_numbers_match_prediction_json(reported, fake_patient):
    summary, root = reported
    for result in summary.results:
        folder = root / "out" / result.study_key
        stored = json.loads((folder / PREDICTION_NAME).read_text())
        text = (folder / "report.html").read_text(encoding="utf-8")
        page = parse(text)
        words = page.words
        assert DISCLAIMER in words
        rows = {a["data-class"]: float(a["data-probability"]) for a in page.find("tr") if "data-class" in a}
        assert rows.keys() == stored["probabilities"].keys()
        for name, p in stored["probabilities"].items():
            assert rows[name] == pytest.approx(p, abs=1e-6)
        shown = [percent(p) for p in stored["probabilities"].values()]
        assert all(s in words for s in shown)
        p_top = stored["probabilities"][stored["diagnosis"]]
        assert f"(probability {percent(p_top)})" in words
        (risk,) = [a for a in page.find("p") if a.get("id") == "risk"]
        assert float(risk["data-risk-score"]) == pytest.approx(stored["risk_score"], abs=1e-6)
        assert risk["data-risk-group"] == stored["risk_group"] != "unavailable"
        assert f"score {stored['risk_score']:+.2f}" in words
        assert "-0.25 and +0.25" in words and "training population" in words
        assert stored["StudyInstanceUID"] in words and stored["model"]["fedct_version"] in words
        assert "smallcnn" in words and stored["model"]["created_utc"] in words
        for _overlay, k in zip(stored["overlays"], stored["key_slices"]):
            assert f"slice {k + 1} of {len(stored['series']['paths'])}" in words
        # The site-local report shows the identifiers that find the patient (read from the study's own DICOM) and no
        # other patient data: not the birth date, not the file paths.
        (identity,) = [a for a in page.find("div") if a.get("id") == "identity"]
        assert "data-hidden" not in identity
        assert "Patient name: Qzvorak, Ylvenne" in words and f"Patient ID: {fake_patient.PatientID}" in words
        assert "Accession number: not recorded" in words and IDENTIFIERS_LOCAL in words
        for phi in (fake_patient.PatientBirthDate, str(root)):
            assert phi not in text


def _result(tmp_path: Path, **changes) -> dict:
    result = {
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.4",
        "series": {"paths": ["a"] * 10},
        "study_key": "study-000000000000",
        "probabilities": {"covid": 0.82, "other_pneumonia": 0.15, "normal": 0.03},
        "diagnosis": "covid",
        "risk_score": 1.234,
        "risk_group": "unavailable",
        "model": {
            "name": "densenet121",
            "fedct_version": "0.1.0",
            "created_utc": "2025-01-01T00:00:00Z",
            "round_of_weights": 7,
        },
        "created_utc": "2025-01-02T00:00:00Z",
        "overlays": [],
        "key_slices": [],
        "risk_quantiles": None,
    }
    result.update(changes)
    return result


def test_sentences_for_covid_uncertain_and_no_risk_reference(tmp_path):
    words = parse(render_report(_result(tmp_path))).words
    assert "Findings suggest a COVID-19-like pattern (probability 82%)." in words
    assert "no risk group" in words and "score +1.23" in words
    assert "No heat-map images were produced" in words
    uncertain = _result(tmp_path, probabilities={"covid": 0.4, "other_pneumonia": 0.35, "normal": 0.25})
    assert (
        "Uncertain result: the most likely is a COVID-19-like pattern (probability 40%)."
        in parse(render_report(uncertain)).words
    )
    high = _result(tmp_path, risk_group="high", risk_quantiles=[0.1, 0.9])
    assert "higher than about two thirds of the training population" in parse(render_report(high)).words
    with pytest.raises(ValueError, match="diagnosis 'flu'"):
        render_report(_result(tmp_path, diagnosis="flu"))


def test_identifiers_shown_escaped_or_hidden_on_a_research_copy(tmp_path):
    identity = LocalIdentity(AccessionNumber="A<b>1</b>", PatientName="O'NEIL^ANN", PatientID="ID&7")
    text = render_report(_result(tmp_path), identity=identity)
    words = parse(text).words
    assert (
        "Accession number: A<b>1</b>" in words and "Patient name: O'NEIL, ANN" in words and "Patient ID: ID&7" in words
    )
    assert "<b>1</b>" not in text and IDENTIFIERS_HIDDEN not in words
    hidden = render_report(_result(tmp_path, local_identifiers="hidden"), identity=identity)
    assert IDENTIFIERS_HIDDEN in parse(hidden).words
    assert not any(s in hidden for s in ("A&lt;b&gt;1", "NEIL", "ID&amp;7"))
    assert 'id="identity"' not in render_report(_result(tmp_path))  # results from before identifiers: no line


def test_percent_and_escaping(tmp_path):
    assert [percent(p) for p in (0.0, 0.004, 0.5, 0.996, 1.0)] == ["<1%", "<1%", "50%", ">99%", ">99%"]
    odd = _result(tmp_path, study_key="<script>x</script>", model={"name": "<b>m</b>", "fedct_version": "1"})
    text = render_report(odd)
    assert "<script>" not in text and "&lt;script&gt;" in text
    path = write_report(odd, tmp_path / "r")
    assert path.name == "report.html" and path.read_text(encoding="utf-8") == text
