"""The clinicians' review page (inference/review.py): routes, path safety, feedback storage, escaping, loopback only,
and one end-to-end run in headless Chromium (skipped only when the chromium / chromedriver binaries are absent).

Every server runs in a thread on port 0 over a fake results folder in ``tmp_path`` and is shut down afterwards.
"""

from __future__ import annotations

import getpass
import html
import json
import re
import shutil
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from federation import pids_matching, stop_pids
from matplotlib import image as mpimg

from inference.review import MAX_COMMENT_CHARS, ReviewServer, make_server, serve
from inference.review_store import Feedback, FeedbackStore
from inference.wording import IDENTIFIERS_HIDDEN, IDENTIFIERS_LOCAL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECRET = "TOP-SECRET-OUTSIDE-THE-STUDY-FOLDER"
XSS = "<script>alert(1)</script>"
#: Study A's local identifiers (its site-local local_identity.json), as predict writes them.
ACCESSION = "ACC-20261123-0042"
IDENTITY = {"AccessionNumber": ACCESSION, "PatientName": "Brennholt^Anna<b>", "PatientID": "MRN-0042"}


# ---------------------------------------------------------------------------------------------------------------
# Fake results folder
# ---------------------------------------------------------------------------------------------------------------


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mpimg.imsave(path, rng.random((16, 16)), cmap="inferno")


def _prediction(key: str, diagnosis: str, probs: dict[str, float], group: str, **extra) -> dict:
    return {
        "study_key": key,
        "StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{abs(hash(key)) % 10**8}",
        "diagnosis": diagnosis,
        "probabilities": probs,
        "risk_score": 0.42,
        "risk_group": group,
        "model": {"name": "densenet121", "fedct_version": "0.1.0", "round": 7},
        "created_utc": "2026-11-23T13:12:47Z",
        **extra,
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Three studies (one without report, one without an overlays list, one with nested overlay paths), a refused
    scan in summary.json, a secret file outside the study folders and symlinks pointing at it."""
    root = tmp_path / "results"
    root.mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_text(SECRET)

    a = root / "study-a"
    a.mkdir()
    _png(a / "overlay_axial.png", 0)
    _png(a / "overlay_coronal.png", 1)
    (a / "prediction.json").write_text(
        json.dumps(
            _prediction(
                "study-a",
                "covid",
                {"covid": 0.82, "other_pneumonia": 0.12, "normal": 0.06},
                "high",
                overlays=[str(a / "overlay_axial.png"), "overlay_coronal.png"],
            )
        )
    )
    (a / "report.html").write_text("<!DOCTYPE html><html><body><h1>Report of study A</h1></body></html>")
    (a / "local_identity.json").write_text(json.dumps(IDENTITY))
    (a / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (a / "linkdir").symlink_to(tmp_path / "outside", target_is_directory=True)

    b = root / "study-b"
    b.mkdir()
    _png(b / "overlay_heat.png", 2)  # no "overlays" field: found by *.png
    (b / "prediction.json").write_text(
        json.dumps(
            _prediction(
                "study-b",
                "normal",
                {"covid": 0.03, "other_pneumonia": 0.06, "normal": 0.91},
                "low",
                local_identifiers="hidden",
            )
        )
    )  # a research copy
    (b / "report.html").write_text("<!DOCTYPE html><html><body><h1>Report of study B</h1></body></html>")
    (b / "extra").mkdir()
    (b / "extra" / "notes.txt").write_text("nested file inside the study folder")

    c = root / "study-c"  # minimal prediction, no report, no image
    c.mkdir()
    (c / "prediction.json").write_text(
        json.dumps({"study_key": "study-c", "diagnosis": "other_pneumonia", "probabilities": {"other_pneumonia": 0.55}})
    )
    (c / "local_identity.json").symlink_to(tmp_path / "secret.txt")  # not followed: no identifiers shown

    (root / "not-a-study").mkdir()  # no prediction.json: not listed
    (root / "linked-study").symlink_to(a, target_is_directory=True)  # a symlinked folder is not a study
    (root / "summary.json").write_text(
        json.dumps(
            {
                "results": [],
                "refused": [{"path": "/import/scan-0042", "reason": "not_ct", "message": "The series is not CT."}],
            }
        )
    )
    return root


@pytest.fixture
def server(results: Path) -> Iterator[ReviewServer]:
    srv = make_server(results, port=0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def fetch(
    srv: ReviewServer, path: str, *, data: dict | bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; redirects are not followed."""
    host, port = srv.server_address[:2]
    body = urlencode(data).encode() if isinstance(data, dict) else data
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=body, headers=headers or {})
    if isinstance(data, dict):
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def page(srv: ReviewServer, path: str = "/") -> str:
    status, headers, body = fetch(srv, path)
    assert status == 200, (path, status, body[:500])
    assert headers["Content-Type"].startswith("text/html")
    return body.decode("utf-8")


def token_of(html_text: str) -> str:
    match = re.search(r'name="token" value="([^"]+)"', html_text)
    assert match, "no form token on the page"
    return match.group(1)


def post_feedback(srv: ReviewServer, key: str, **fields: str) -> tuple[int, dict[str, str], bytes]:
    fields.setdefault("token", token_of(page(srv)))
    return fetch(srv, f"/study/{key}/feedback", data=fields)


# ---------------------------------------------------------------------------------------------------------------
# Pages and files
# ---------------------------------------------------------------------------------------------------------------


def test_list_page_shows_every_study(server: ReviewServer) -> None:
    text = page(server)
    for key in ("study-a", "study-b", "study-c"):
        assert f'data-study-key="{key}"' in text
    assert text.count('<tr class="study"') == 3  # not-a-study and the symlinked folder are not listed
    assert "Findings suggest a COVID-19-like pattern (probability 82%)." in text
    assert "Findings suggest no pneumonia pattern (normal lungs) (probability 91%)." in text
    assert "Findings suggest another (non-COVID-19) pneumonia pattern (probability 55%)." in text
    assert ">High<" in text and ">Low<" in text
    assert "fedct 0.1.0 (densenet121)" in text
    assert 'src="/study/study-a/file/overlay_axial.png"' in text  # first listed overlay is the thumbnail
    assert 'src="/study/study-b/file/overlay_heat.png"' in text  # found by *.png
    assert 'href="/study/study-a/report"' in text and 'href="/study/study-c/report"' not in text
    assert "Not reviewed yet" in text
    assert "scan-0042" in text and "The series is not CT." in text  # refused by the prediction step
    assert "research model" in text and "Nothing is sent anywhere" in text
    assert "<script" not in text  # the page runs no script
    rows = {
        key: text.split(f'data-study-key="{key}"', 1)[1].split("</tr>", 1)[0]
        for key in ("study-a", "study-b", "study-c")
    }
    assert f'Accession number: <span class="id-value">{ACCESSION}</span>' in rows["study-a"]
    assert 'Patient name: <span class="id-value">Brennholt, Anna&lt;b&gt;</span>' in rows["study-a"]
    assert "MRN-0042" in rows["study-a"] and IDENTIFIERS_HIDDEN not in rows["study-a"]
    assert IDENTIFIERS_HIDDEN in rows["study-b"] and "Accession" not in rows["study-b"]
    assert "identity" not in rows["study-c"] and SECRET not in text  # no identifiers recorded; symlink not followed


def test_study_page_shows_local_identifiers_or_that_they_are_hidden(server: ReviewServer) -> None:
    text = page(server, "/study/study-a")
    card = text.split('<div class="card identity">', 1)[1].split("</div>", 1)[0]
    assert (
        ACCESSION in card
        and "Brennholt, Anna&lt;b&gt;" in card
        and "MRN-0042" in card
        and html.escape(IDENTIFIERS_LOCAL) in card
    )
    assert "<b>" not in card and ACCESSION not in text.split("<title>", 1)[1].split("</title>", 1)[0]
    assert IDENTIFIERS_HIDDEN in page(server, "/study/study-b") and "Accession" not in page(server, "/study/study-b")
    other = page(server, "/study/study-c")
    assert 'class="card identity' not in other and IDENTIFIERS_HIDDEN not in other and SECRET not in other


def test_study_page_report_and_files(server: ReviewServer) -> None:
    text = page(server, "/study/study-a")
    assert "Findings suggest a COVID-19-like pattern (probability 82%)." in text
    assert '<iframe class="report" sandbox src="/study/study-a/report"' in text
    assert "overlay_coronal.png" in text and 'name="verdict"' in text

    status, headers, body = fetch(server, "/study/study-a/report")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"Report of study A" in body

    status, headers, body = fetch(server, "/study/study-a/file/overlay_axial.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(PNG_MAGIC)
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = fetch(server, "/study/study-a/file/prediction.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["study_key"] == "study-a"

    status, headers, body = fetch(server, "/study/study-b/file/extra/notes.txt")  # sub-folders are fine
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8" and body.startswith(b"nested")

    assert fetch(server, "/study/study-c/report")[0] == 404  # no report written
    assert fetch(server, "/study/study-a/file/missing.png")[0] == 404
    assert "Not available" in page(server, "/study/study-c")  # no risk group: tolerated


@pytest.mark.parametrize(
    "path",
    [
        "/study/study-a/file/../../secret.txt",
        "/study/study-a/file/..%2F..%2Fsecret.txt",
        "/study/study-a/file/%2e%2e/%2e%2e/secret.txt",
        "/study/study-a/file/..",
        "/study/study-a/file/%2Fetc%2Fpasswd",
        "/study/study-a/file//etc/passwd",
        "/study/study-a/file/..%5C..%5Csecret.txt",
        "/study/study-a/file/leak.txt",  # symlink to a file outside the folder
        "/study/study-a/file/linkdir/secret.png",  # through a symlinked folder
        "/study/study-a/file/%00",
        "/study/..%2Fstudy-a/report",
        "/study/%2e%2e/secret.txt",
        "/study/linked-study/report",  # symlinked study folder
        "/study/not-a-study",
        "/study/nope/file/overlay_axial.png",
        "/elsewhere",
    ],
)
def test_path_traversal_and_unknown_paths_are_404(server: ReviewServer, path: str) -> None:
    status, _, body = fetch(server, path)
    assert status == 404
    assert SECRET.encode() not in body and b"root:" not in body


# ---------------------------------------------------------------------------------------------------------------
# Feedback
# ---------------------------------------------------------------------------------------------------------------


def test_feedback_is_stored_escaped_and_latest_shown(server: ReviewServer, results: Path) -> None:
    status, headers, _ = post_feedback(server, "study-b", verdict="agree", comment="Looks right.", next="list")
    assert status == 303 and headers["Location"] == "/#study-study-b"
    status, headers, _ = post_feedback(
        server, "study-b", verdict="disagree", comment=f"Ground glass missed {XSS}", next="study"
    )
    assert status == 303 and headers["Location"] == "/study/study-b#review"

    listing = page(server)
    row = listing.split('data-study-key="study-b"', 1)[1].split("</tr>", 1)[0]
    assert "Disagrees with the finding" in row and "Looks right." not in row  # the latest is shown
    assert "Ground glass missed &lt;script&gt;alert(1)&lt;/script&gt;" in row
    assert XSS not in listing
    study_page = page(server, "/study/study-b")
    assert "Earlier reviews (1)" in study_page and "Looks right." in study_page and XSS not in study_page

    with sqlite3.connect(results / "feedback.sqlite") as con:
        rows = con.execute("SELECT study_key, verdict, comment, created_utc FROM feedback ORDER BY rowid").fetchall()
    assert [r[:3] for r in rows] == [
        ("study-b", "agree", "Looks right."),
        ("study-b", "disagree", f"Ground glass missed {XSS}"),
    ]
    assert all(r[3].endswith("Z") for r in rows)


def test_feedback_validation(server: ReviewServer, results: Path) -> None:
    status, _, body = post_feedback(server, "study-a", verdict="maybe", comment="")
    assert status == 400 and "I agree" in body.decode()
    assert post_feedback(server, "study-a", comment="no verdict")[0] == 400
    status, _, body = post_feedback(server, "study-a", verdict="agree", comment="x" * (MAX_COMMENT_CHARS + 1))
    assert status == 400 and "too long" in body.decode()
    assert post_feedback(server, "study-a", verdict="agree", comment="x" * MAX_COMMENT_CHARS)[0] == 303
    assert post_feedback(server, "no-such-study", verdict="agree")[0] == 404
    assert post_feedback(server, "not-a-study", verdict="agree")[0] == 404
    assert post_feedback(server, "study-a", verdict="agree", token="forged")[0] == 403
    status = fetch(server, "/study/study-a/feedback", data=b"verdict=agree", headers={"Content-Type": "text/plain"})[0]
    assert status == 415
    with sqlite3.connect(results / "feedback.sqlite") as con:
        assert con.execute("SELECT count(*) FROM feedback").fetchone()[0] == 1  # only the valid one


def test_a_corrected_diagnosis_is_stored_with_its_provenance(server: ReviewServer, results: Path) -> None:
    prediction = json.loads((results / "study-a" / "prediction.json").read_text())
    prediction["model"].update(registry_version="v0002", content_sha256="ab" * 32)
    (results / "study-a" / "prediction.json").write_text(json.dumps(prediction))
    assert 'name="corrected"' in page(server, "/study/study-a") and '<option value="normal">' in page(server)
    status, _, _ = post_feedback(
        server, "study-a", verdict="disagree", corrected="normal", reader="  Dr   Who ", comment="clear lungs"
    )
    assert status == 303
    assert post_feedback(server, "study-b", verdict="agree")[0] == 303  # no name entered: the account
    listing = page(server)
    row = listing.split('data-study-key="study-a"', 1)[1].split("</tr>", 1)[0]
    assert "Corrected diagnosis: normal" in row and "Dr Who" in row and "model v0002" in row
    with sqlite3.connect(results / "feedback.sqlite") as con:
        con.row_factory = sqlite3.Row
        a, b = [dict(r) for r in con.execute("SELECT * FROM feedback ORDER BY rowid")]
    assert a["corrected_diagnosis"] == "normal" and a["reader"] == "Dr Who" and a["model_finding"] == "covid"
    assert a["model_version"] == "v0002" and a["model_sha256"] == "ab" * 32
    assert a["study_uid"] == prediction["StudyInstanceUID"] and a["created_utc"].endswith("Z")
    assert b["corrected_diagnosis"] == "" and b["reader"] == getpass.getuser() and b["model_version"] == ""


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"verdict": "agree", "corrected": "normal"}, "I disagree"),
        ({"verdict": "disagree", "corrected": "covid"}, "the model&#x27;s own finding"),
        ({"verdict": "disagree", "corrected": "flu"}, "one of the model"),
        ({"verdict": "disagree", "reader": "x" * 101}, "name is too long"),
    ],
)
def test_a_bad_corrected_diagnosis_or_name_is_refused(server: ReviewServer, results: Path, fields, needle) -> None:
    status, _, body = post_feedback(server, "study-a", **fields)
    assert status == 400 and needle in body.decode()
    with sqlite3.connect(results / "feedback.sqlite") as con:
        assert con.execute("SELECT count(*) FROM feedback").fetchone()[0] == 0


def test_a_feedback_database_made_before_the_provenance_columns_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "feedback.sqlite"
    with sqlite3.connect(db) as con:
        con.execute(
            "CREATE TABLE feedback (study_key TEXT NOT NULL, verdict TEXT NOT NULL CHECK (verdict IN ('agree', "
            "'disagree')), comment TEXT NOT NULL DEFAULT '', created_utc TEXT NOT NULL)"
        )
        con.execute("INSERT INTO feedback VALUES ('old', 'agree', 'kept', '2026-01-01T00:00:00Z')")
    store = FeedbackStore(db)
    assert store.history("old")[0] == Feedback("old", "agree", "kept", "2026-01-01T00:00:00Z")
    store.add("new", "disagree", "", corrected_diagnosis="normal", model_finding="covid", reader="r")
    assert store.latest_all()["new"].corrected_diagnosis == "normal"
    with pytest.raises(ValueError, match="goes with a disagreement"):
        store.add("new", "agree", "", corrected_diagnosis="normal")


def test_foreign_host_header_is_refused(server: ReviewServer) -> None:
    assert fetch(server, "/", headers={"Host": "attacker.example:8765"})[0] == 400  # DNS rebinding
    assert fetch(server, "/", headers={"Host": "localhost:9999"})[0] == 200  # e.g. through an SSH tunnel


def test_custom_db_path(results: Path, tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "fb.sqlite"
    srv = make_server(results, port=0, db_path=db)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert post_feedback(srv, "study-a", verdict="agree")[0] == 303
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
    assert db.is_file() and not (results / "feedback.sqlite").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.org", ""])
def test_non_loopback_host_is_refused(results: Path, host: str) -> None:
    with pytest.raises(ValueError, match="allow_remote=True"):
        make_server(results, host=host, port=0)
    with pytest.raises(ValueError, match="allow_remote=True"):
        serve(results, host=host, port=0)


def test_loopback_names_and_explicit_remote(results: Path) -> None:
    for host, kwargs in (("localhost", {}), ("127.0.0.1", {}), ("0.0.0.0", {"allow_remote": True})):
        srv = make_server(results, host=host, port=0, **kwargs)
        try:
            assert srv.server_address[1] > 0
        finally:
            srv.server_close()
    with pytest.raises(ValueError, match="does not exist"):
        make_server(results / "missing", port=0)


# ---------------------------------------------------------------------------------------------------------------
# End to end in headless Chromium
# ---------------------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="missing system tool or test dependency: chromium and chromedriver "
    "(Debian: apt-get install chromium chromium-driver)",
)
def test_review_in_headless_chromium(server: ReviewServer, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tmp_path / "chromium-profile"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    base = server.url.rstrip("/")
    comment = "Consolidation in the right lower lobe <b>not</b> covered"

    driver = None
    browser_pids: list[int] = []
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(20)
        wait = WebDriverWait(driver, 10)

        # the list shows every study
        driver.get(base + "/")
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.study")
        assert [r.get_attribute("data-study-key") for r in rows] == ["study-a", "study-b", "study-c"]
        assert (
            "Findings suggest a COVID-19-like pattern (probability 82%)."
            in driver.find_element(By.TAG_NAME, "body").text
        )
        identity = driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-a"] .identity')
        assert identity.is_displayed() and f"Accession number: {ACCESSION}" in identity.text
        assert "Brennholt, Anna<b>" in identity.text and "MRN-0042" in identity.text
        assert IDENTIFIERS_HIDDEN in driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-b"] .identity').text
        thumb = driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-a"] img.thumb')
        assert driver.execute_script("return arguments[0].naturalWidth", thumb) == 16  # the PNG loaded
        browser_pids = _descendants(service.process.pid)

        # open a report and come back
        driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-a"] a.report-link').click()
        wait.until(ec.url_to_be(base + "/study/study-a/report"))
        assert driver.find_element(By.TAG_NAME, "h1").text == "Report of study A"
        driver.back()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-study-key="study-b"]')))

        # record a disagreement with a comment on the list
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-b"]')
        row.find_element(By.CSS_SELECTOR, 'input[name="verdict"][value="disagree"]').click()
        row.find_element(By.CSS_SELECTOR, 'textarea[name="comment"]').send_keys(comment)
        row.find_element(By.CSS_SELECTOR, 'button[type="submit"]').click()
        wait.until(
            ec.text_to_be_present_in_element(
                (By.CSS_SELECTOR, 'tr[data-study-key="study-b"] .feedback'), "Disagrees with the finding"
            )
        )

        # reload: the review is kept, shown as text (not markup), and selected in the form
        driver.refresh()
        review = driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-b"] .feedback')
        assert "Disagrees with the finding" in review.text and comment in review.text
        assert not review.find_elements(By.TAG_NAME, "b")
        assert driver.find_element(
            By.CSS_SELECTOR, 'tr[data-study-key="study-b"] input[value="disagree"]'
        ).is_selected()
        assert "Not reviewed yet" in driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-a"]').text
        shot = tmp_path / "review_list.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 1000

        # the study page shows the same review and the report in a frame
        driver.find_element(By.CSS_SELECTOR, 'tr[data-study-key="study-b"] a.study-link').click()
        wait.until(ec.url_to_be(base + "/study/study-b"))
        assert comment in driver.find_element(By.CSS_SELECTOR, "#review .current").text
        assert IDENTIFIERS_HIDDEN in driver.find_element(By.CSS_SELECTOR, ".card.identity").text
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe.report"))
        assert driver.find_element(By.TAG_NAME, "h1").text == "Report of study B"
        driver.switch_to.default_content()

        # study A's page: the local identifiers at the top, on screen where the reader looks first
        driver.get(base + "/study/study-a")
        card = driver.find_element(By.CSS_SELECTOR, ".card.identity")
        accession = card.find_element(By.CSS_SELECTOR, ".id-accession .id-value")
        assert accession.text == ACCESSION and accession.is_displayed()
        top = driver.execute_script("return arguments[0].getBoundingClientRect().bottom", accession)
        assert 0 < top < driver.execute_script("return window.innerHeight")  # in the first screen, no scrolling
        assert "Brennholt, Anna<b>" in card.text and "MRN-0042" in card.text
        shot = tmp_path / "review_study_identity.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 1000
    finally:
        if driver is not None:
            if service.process is not None:
                browser_pids = sorted(set(browser_pids) | set(_descendants(service.process.pid)))
            driver.quit()
        elif service.process is not None:
            service.stop()

    deadline = time.monotonic() + 10
    leftover = []
    while time.monotonic() < deadline:
        leftover = [p for p in browser_pids if _running(p)] + pids_matching(str(profile))
        if not leftover:
            break
        time.sleep(0.2)
    if leftover:
        stop_pids(sorted(set(leftover)), timeout=5)
    assert not leftover, f"browser processes left running: {leftover}"
