"""`merg explore`: the JSON endpoints with a test client, the by-key-only file serving, and the real
page in headless Chromium (skipped with its reason where Chromium or its driver is absent)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances

DIM = 16
HOST = "http://127.0.0.1:8765"  # the test client's requests carry Host 127.0.0.1:8765, a name the app answers
ESCAPE = "train/dia77_utt0"  # its clip file is a link to /etc/passwd; its text is script-bearing
LINKED = "train/dia77_utt1"  # its clip file is a link to a clip in the same folder (allowed)
SWAPPED = "train/dia77_utt2"  # a real clip a test replaces by a link to /etc/passwd while the app runs
SCRIPT_TEXT = "<script>document.title='pwned'</script><img/src=x/onerror=\"document.title='pwned';//" + "A" * 80 + "\">"  # long and unbroken
SCORE = 0.7451440095901489  # a float32 asd_score as JSON gives it


@pytest.fixture(scope="module")
def explore_store(tmp_path_factory, mini_meld) -> Path:
    """The generated mini-MELD's utterances (keys, labels, clip paths) with synthetic embeddings,
    failures, one sweep's results (what the preprocessing job and a sweep would have written), and
    three clips in a folder of their own: one a link out to /etc/passwd, one a link inside the folder."""
    truth = [json.loads(line) for line in (mini_meld / "ground_truth.jsonl").read_text().splitlines()]
    truth = [t for t in truth if t.get("clip")]
    good = mini_meld / next(t["clip"] for t in truth if t["fault"] is None)
    linked = tmp_path_factory.mktemp("linked") / "train_splits"
    linked.mkdir()
    shutil.copy(good, linked / "real.mp4")
    (linked / "dia77_utt0.mp4").symlink_to("/etc/passwd")
    (linked / "dia77_utt1.mp4").symlink_to("real.mp4")
    shutil.copy(good, linked / "dia77_utt2.mp4")
    extra = [dict(key=k, split="train", speaker="Ross", text=SCRIPT_TEXT if k == ESCAPE else "a linked clip", emotion="neutral",
                  clip=str(linked / f"{k.split('/')[1]}.mp4")) for k in (ESCAPE, LINKED, SWAPPED)]  # fmt: skip
    paths = [str(mini_meld / t["clip"]) for t in truth] + [e["clip"] for e in extra]
    truth = truth + extra
    rows = synthetic_utterances(len(truth), DIM, seed=1)
    replace = {
        "key": [t["key"] for t in truth], "split": [t["split"] for t in truth], "speaker": [t["speaker"] for t in truth],
        "text": [t["text"] for t in truth], "emotion": [t["emotion"] for t in truth],
    }  # fmt: skip
    for name, values in replace.items():
        rows = rows.set_column(rows.column_names.index(name), name, pa.array(values))
    rows = rows.append_column("clip_path", pa.array(paths))
    rows = rows.append_column("speaker_box", pa.array([[0.25, 0.2, 0.6, 0.7]] * len(truth), pa.list_(pa.float32(), 4)))
    rows = rows.append_column("asd_score", pa.array([SCORE] * len(truth), pa.float32()))
    rows = rows.append_column("asd_method", pa.array(["sync"] * len(truth)))
    root = tmp_path_factory.mktemp("explore") / "store"
    store = Store.open(root, create=True, embedding_dim=DIM)
    store.write_utterances(rows)
    not_mp4 = next(t["key"] for t in truth if t.get("fault") == "not_a_video")
    store.record_failures([(truth[1]["key"], "decode", "truncated", "29 of 76 frames present"),
                           (not_mp4, "decode", "not_mp4", "no ftyp box")])  # fmt: skip
    key = truth[2]["key"]
    store.write_records(EVAL_RESULTS, [
        dict(cell=c, sweep="demo", system=s, preset="default", split="test", status="done", examples=1,
             metrics=json.dumps({"bertscore_f1": {"value": 0.5, "ci": [0.4, 0.6]}, "dist_1": {"value": 0.8, "ci": [float("nan")] * 2},
                                 "ppl": {"value": float("nan")}}))  # fmt: skip
        for c, s in (("c1", "text"), ("c2", "audio+video"))
    ])  # fmt: skip
    store.write_records(EVAL_OUTPUTS, [
        dict(id=f"{c}:{key}", cell=c, key=key, history=["Ross: hi"], next_speaker="Rachel", reference="hello",
             reply=f"reply of {c}", bertscore_f1=0.5)
        for c in ("c1", "c2")
    ])  # fmt: skip
    return root


def _truth(mini_meld: Path, fault: str | None) -> str:
    """The key of a generated utterance with the named fault (None: a clean one)."""
    rows = [json.loads(line) for line in (mini_meld / "ground_truth.jsonl").read_text().splitlines()]
    return next(r["key"] for r in rows if r.get("clip") and r.get("fault") == fault)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A report folder with a leak (a link to /etc/passwd), a link inside the folder, and an HTML page
    carrying a script (served, but under a policy that runs no script)."""
    report = tmp_path_factory.mktemp("report")
    (report / "report.md").write_text("# report\n")
    (report / "metrics.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (report / "page.html").write_text("<html><head><title>report</title></head><body>"
                                      "<script>document.title='pwned'</script><p id=ok>report page</p></body></html>")  # fmt: skip
    (report / "leak.csv").symlink_to("/etc/passwd")
    (report / "same.md").symlink_to("report.md")
    (report / "plot.png").symlink_to("metrics.png.bak")  # typed by its listed name, not its target's
    (report / "metrics.png.bak").write_bytes(b"\x89PNG\r\n\x1a\n")
    return report


@pytest.fixture(scope="module")
def client(explore_store, report_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from infra.explore.app import ExploreSources, create_app

    runs = tmp_path_factory.mktemp("runs")
    (runs / "fake").mkdir()
    (runs / "fake" / "run.json").write_text("{}")  # listed (a reply box choice); never loaded by these tests
    with TestClient(create_app(ExploreSources(store=explore_store, report=report_dir, runs=runs)), base_url=HOST) as test_client:
        yield test_client


def _first(client, **params) -> dict:
    return client.get("/api/utterances", params=params).json()["items"][0]


def test_facets_and_filtered_paging(client):
    facets = client.get("/api/facets").json()
    assert facets["rows"] > 10 and "neutral" in facets["emotion"] and facets["failure"] == {"truncated": 1, "not_mp4": 1}
    assert sorted(facets["report"]) == ["metrics.png", "page.html", "plot.png", "report.md", "same.md"]  # not leak.csv
    emotion = next(iter(facets["emotion"]))
    page = client.get("/api/utterances", params={"emotion": emotion, "limit": 2}).json()
    assert page["total"] == facets["emotion"][emotion] and len(page["items"]) <= 2
    assert all(item["emotion"] == emotion and "clip_path" not in item for item in page["items"])
    assert client.get("/api/utterances", params={"failure": "truncated"}).json()["total"] == 1
    assert client.get("/api/utterances", params={"failure": "trunc"}).json()["total"] == 0  # a reason, not a substring
    visible = sum(client.get("/api/utterances", params={"face_visible": v}).json()["total"] for v in facets["face_visible"])
    assert visible == facets["rows"]
    word = _first(client)["text"].split()[0]
    found = client.get("/api/utterances", params={"q": word.upper()}).json()
    assert found["total"] >= 1 and all(word.lower() in i["text"].lower() for i in found["items"])


def test_utterance_page_neighbours_and_results(client):
    key = _first(client)["key"]
    row = client.get(f"/api/utterance/{key}").json()
    assert row["clip_url"] == f"/media/clip/{key}" and "clip_path" not in row and row["fused_emb"] == DIM
    assert row["speaker_box"] == pytest.approx([0.25, 0.2, 0.6, 0.7])
    clip = client.get(row["clip_url"])
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4" and len(clip.content) > 1000
    for column in ("fused_emb", "audio_emb", "vision_emb"):
        near = client.get(f"/api/similar/{key}", params={"column": column, "k": 3}).json()
        assert len(near["items"]) == 3 and key not in [n["key"] for n in near["items"]]
    emotion = row["emotion"]
    near = client.get(f"/api/similar/{key}", params={"emotion": emotion, "k": 50}).json()["items"]
    assert near and {n["emotion"] for n in near} == {emotion}
    results = client.get("/api/results", params={"sweep": "demo"}).json()
    assert results["sweeps"] == ["demo"] and len(results["cells"]) == 2
    assert set(results["pairs"][0]["replies"]) == {"text / default", "audio+video / default"}
    assert client.get("/media/report/report.md").text == "# report\n"
    assert client.get("/media/report/same.md").text == "# report\n"  # a link that stays in the folder is served
    assert client.get("/media/report/plot.png").headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    "path",
    [
        "/media/clip/../../etc/passwd", "/media/clip/%2e%2e/%2e%2e/etc/passwd", "/media/clip/..%2f..%2fetc%2fpasswd",
        "/media/clip//etc/passwd", "/media/clip/%2Fetc%2Fpasswd", "/media/clip/train/dia999_utt0",
        "/media/clip/train%2Fdia999_utt0", "/media/report/../report.md", "/media/report/%2e%2e%2fstore",
        "/media/report/unknown.png", "/media/sheet/../../etc/passwd", "/media/sheet/train/dia999_utt0", "/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/index.html",
        "/api/utterance/../../etc/passwd", "/api/utterance/train/dia999_utt0", "/api/similar/%2e%2e%2fx",
        f"/media/clip/{ESCAPE}", f"/media/sheet/{ESCAPE}", "/media/report/leak.csv",  # links out of their folder
    ],
)
def test_files_only_by_key_everything_else_404(client, path):
    answer = client.get(path)
    assert answer.status_code == 404 and b"root:" not in answer.content


def test_read_only_no_endpoint_writes(client, explore_store):
    version = Store.open(explore_store).version
    assert client.post("/api/reply", json={"run": "nope", "key": None}).status_code == 404  # only listed runs
    for method in ("put", "delete", "patch"):
        assert getattr(client, method)("/api/utterances").status_code == 405
    assert Store.open(explore_store).version == version


# ---- under attack: Host check, policy, body cap, one reply at a time, links out, failed clips ----------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "localhost.evil.example", ""])
def test_a_foreign_or_empty_host_is_refused(client, host):
    """DNS rebinding: a page whose own name was rebound to 127.0.0.1 sends that name as Host."""
    key = _first(client)["key"]
    for path in ("/", "/api/facets", f"/api/utterance/{key}", f"/media/clip/{key}", "/media/report/report.md"):
        answer = client.get(path, headers={"host": host})
        assert answer.status_code == 400 and b"utterances" not in answer.content
    assert client.post("/api/reply", json={"run": "fake"}, headers={"host": host}).status_code == 400


def test_own_host_names_answer_under_a_strict_policy(client):
    for host in ("127.0.0.1", "127.0.0.1:8765", "localhost:9999", "LOCALHOST", "[::1]:8765"):
        assert client.get("/", headers={"host": host}).status_code == 200, host
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe" not in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\bstyle=|\son\w+=", page.text)  # nothing inline the policy would block
    for path in ("/api/facets", "/static/app.js", f"/media/clip/{_first(client)['key']}"):
        assert client.get(path).headers["content-security-policy"] == policy
    report = client.get("/media/report/page.html").headers["content-security-policy"]
    assert report.startswith("default-src 'none'") and "script" not in report  # a report page runs no script


def test_host_names_follow_the_bound_address(explore_store):
    from fastapi.testclient import TestClient

    from infra.explore.app import ExploreSources, allowed_hosts, create_app

    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "[::1]", "localhost"]
    assert "[fe80::1]" in allowed_hosts("fe80::1") and "*" not in allowed_hosts("0.0.0.0", ["*"])
    app = create_app(ExploreSources(store=explore_store), host="192.168.7.7", allow_hosts=["merg.lan"])
    with TestClient(app, base_url="http://merg.lan:8765") as lan:
        assert lan.get("/api/facets").status_code == 200
        assert lan.get("/api/facets", headers={"host": "192.168.7.7:8765"}).status_code == 200
        assert lan.get("/api/facets", headers={"host": "evil.example"}).status_code == 400


def test_request_bodies_are_capped(client):
    from infra.explore.app import MAX_BODY

    big = {"run": "fake", "history": ["Ross: " + "a" * MAX_BODY]}
    assert client.post("/api/reply", json=big).status_code == 413

    def streamed():  # no Content-Length: the cap counts what arrives
        yield b'{"run": "fake", "history": ["Ross: '
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"a" * 1024
        yield b'"]}'

    answer = client.post("/api/reply", content=streamed(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and str(MAX_BODY) in answer.json()["detail"]


def test_one_reply_at_a_time(client):
    """A reply asked for while one is generating gets 429 at once (it neither waits nor runs a second model)."""
    lock = client.app.state.explorer._reply_lock
    assert lock.acquire(timeout=5)
    try:
        busy = client.post("/api/reply", json={"run": "fake", "history": ["Ross: hi"]})
    finally:
        lock.release()
    assert busy.status_code == 429 and "one at a time" in busy.json()["detail"] and busy.headers["retry-after"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"run": "fake", "history": 5}, "history"), ({"run": "fake", "history": [1, 2]}, "history"),
        ({"run": "fake", "history": {"a": "b"}}, "history"), ({"run": "fake", "history": " \n "}, "history"),
        ({"run": "fake", "history": ["x"] * 1000}, "history"), ({"run": 5}, "run"), ({"history": ["Ross: hi"]}, "run"),
        ({"run": "fake", "key": 3}, "key"), ({"run": "fake", "speaker": ["Ross"]}, "speaker"),
        ({"run": "fake", "allow_text_only": "maybe"}, "allow_text_only"), ({"run": "fake", "surprise": 1}, "surprise"),
        ([1, 2], "body"),
    ],
)
def test_a_malformed_reply_body_is_422_naming_the_field(client, body, field):
    answer = client.post("/api/reply", json=body)
    assert answer.status_code == 422, answer.text
    assert any(field in error["loc"] for error in answer.json()["detail"])


def test_a_string_history_is_lines_not_characters():
    from infra.explore.app import ReplyRequest

    lines = ["Ross: I got the job!", "Rachel: You did?"]
    assert ReplyRequest(run="r", history="Ross: I got the job!\nRachel: You did?\n").history == lines
    assert ReplyRequest(run="r", history="Ross: I got the job!\\nRachel: You did?").history == lines  # as `merg reply --history`
    assert ReplyRequest(run="r", history=lines).history == lines and ReplyRequest(run="r").history is None


def test_links_out_of_their_folder_are_refused_and_logged(client, explore_store, report_dir, caplog):
    from infra.explore.app import Explorer, ExploreSources

    assert "leak.csv" not in client.get("/api/facets").json()["report"]
    row = client.get(f"/api/utterance/{ESCAPE}").json()
    assert row["clip_url"] is None and row["sheet_url"] is None
    linked = client.get(f"/media/clip/{LINKED}")  # a link to a clip in the same folder is fine
    assert linked.status_code == 200 and linked.content[4:8] == b"ftyp"
    with caplog.at_level(logging.WARNING, logger="infra.explore.app"):
        Explorer(ExploreSources(store=explore_store, report=report_dir))
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert any("leak.csv" in m and "/etc/passwd" in m for m in refused), refused
    assert any("dia77_utt0.mp4" in m and "/etc/passwd" in m for m in refused), refused


def test_a_clip_replaced_by_a_link_out_after_start_is_refused(client, explore_store, caplog):
    from featurestore.store import build_filter

    clip = Path(Store.open(explore_store).query(where=build_filter(key=SWAPPED), columns=["clip_path"]).column(0)[0].as_py())
    assert client.get(f"/media/clip/{SWAPPED}").status_code == 200
    kept = clip.with_name("kept.mp4")
    clip.rename(kept)
    try:
        clip.symlink_to("/etc/passwd")
        with caplog.at_level(logging.WARNING, logger="infra.explore.app"):
            answer = client.get(f"/media/clip/{SWAPPED}")
            sheet = client.get(f"/media/sheet/{SWAPPED}")
        assert answer.status_code == 404 and b"root:" not in answer.content and sheet.status_code == 404
        assert any("dia77_utt2.mp4" in r.getMessage() and "/etc/passwd" in r.getMessage() for r in caplog.records)
    finally:
        clip.unlink(missing_ok=True)
        kept.rename(clip)


def test_failed_clips_offer_no_sheet_and_say_why(client, mini_meld):
    recorded = {client.get("/api/utterances", params={"failure": r}).json()["items"][0]["key"]: r for r in ("truncated", "not_mp4")}
    for key, reason in recorded.items():
        row = client.get(f"/api/utterance/{key}").json()
        assert row["sheet_url"] is None and row["clip_url"]  # the clip is still there to look at
        answer = client.get(f"/media/sheet/{key}")
        assert answer.status_code == 404 and reason in answer.json()["detail"]
    empty = _truth(mini_meld, "empty_clip")  # broken, but no failure recorded: the render fails, said as a 404
    assert client.get(f"/api/utterance/{empty}").json()["sheet_url"]
    answer = client.get(f"/media/sheet/{empty}")
    assert answer.status_code == 404 and "rendering failed" in answer.json()["detail"]
    assert client.get(f"/api/utterance/{empty}").json()["sheet_url"] is None  # not offered again


def test_results_carry_the_intervals(client):
    cell = client.get("/api/results", params={"sweep": "demo"}).json()["cells"][0]
    assert cell["metrics"] == {"bertscore_f1": 0.5, "dist_1": 0.8, "ppl": None}  # no value: null (JSON has no NaN)
    assert cell["intervals"] == {"bertscore_f1": [0.4, 0.6]}  # an interval only where there is one


def test_cli_refuses_a_missing_store_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from infra.cli import app

    result = CliRunner().invoke(app, ["explore", "--store", str(tmp_path / "none")])
    assert result.exit_code == 2 and "error:" in result.output


# ---- the real page in a real browser ----------------------------------------------------------------
def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt; infra/setup.sh installs them where it can)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("needs selenium (pip; infra/setup.sh installs it)")
    return browser, driver


@pytest.fixture(scope="module")
def served(explore_store, report_dir):
    """The app on a real uvicorn server on 127.0.0.1 (its own Explorer: no sheet rendered yet)."""
    import uvicorn

    from infra.explore.app import ExploreSources, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ExploreSources(store=explore_store, report=report_dir))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium at 1400 x 1000 that resolves evil.example to 127.0.0.1 (a DNS-rebinding page's
    view), with its console log kept (policy violations show there)."""
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
                 "--window-size=1400,1000", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--host-resolver-rules=MAP evil.example 127.0.0.1"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open_page(driver, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tbody tr")) > 0)
    return wait


def _open_row(driver, wait, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#rows tbody tr[data-key='{key}']").click()
    wait.until(lambda d: d.find_element(By.ID, "detail-key").text == key)


def _policy_violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


@pytest.mark.slow
def test_browser_filters_opens_an_utterance_plays_and_shows_neighbours(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select

    driver = browser
    artifacts = Path("test-artifacts")
    artifacts.mkdir(exist_ok=True)
    wait = _open_page(driver, served)
    emotion = Select(driver.find_element(By.ID, "filter-emotion"))
    emotion.select_by_index(1)
    wanted = emotion.first_selected_option.get_attribute("value")
    wait.until(lambda d: all(tr.get_attribute("data-emotion") == wanted for tr in d.find_elements(By.CSS_SELECTOR, "#rows tbody tr")))
    driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr")[0].click()
    wait.until(ready.visibility_of_element_located((By.ID, "detail")))
    wait.until(lambda d: d.find_element(By.ID, "clip").get_attribute("src"))
    # the video's source decodes in the browser: a first frame (readyState 2), a duration, no media error
    wait.until(lambda d: d.execute_script("const v = document.getElementById('clip'); return v.readyState >= 2 && v.duration > 0 && !v.error;"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours li")) > 0)
    assert driver.find_element(By.ID, "speaker-box").is_displayed()
    assert f"sync (score {SCORE:.3f})" in driver.find_element(By.ID, "labels").text  # rounded, not 0.7451440095901489
    driver.save_screenshot(str(artifacts / "explore.png"))
    driver.save_screenshot(str(tmp_path / "explore.png"))
    assert (artifacts / "explore.png").stat().st_size > 1000
    assert not _policy_violations(driver)  # the whole page works under the strict policy


@pytest.mark.slow
def test_browser_refuses_a_page_under_a_foreign_host(served, browser):
    """DNS rebinding in a real browser: evil.example resolves to 127.0.0.1, the server refuses the name."""
    from selenium.webdriver.common.by import By

    port = served.rsplit(":", 1)[1]
    browser.get(f"http://evil.example:{port}/")
    assert "Invalid host header" in browser.find_element(By.TAG_NAME, "body").text
    assert not browser.find_elements(By.ID, "rows")
    browser.get(f"http://evil.example:{port}/api/facets")
    assert "utterances" not in browser.page_source and "rows" not in browser.page_source
    _open_page(browser, served.replace("127.0.0.1", "localhost"))  # the names it was started for still work


@pytest.mark.slow
def test_browser_tabs_hide_what_they_hide(served, browser, mini_meld):
    """Visibility as the user sees it (computed style), not the `hidden` attribute."""
    from selenium.webdriver.common.by import By

    driver = browser
    wait = _open_page(driver, served)
    shown = lambda element_id: driver.find_element(By.ID, element_id).is_displayed()  # noqa: E731
    display = lambda element_id: driver.execute_script(f"return getComputedStyle(document.getElementById('{element_id}')).display")  # noqa: E731
    assert shown("rows") and not shown("results") and display("results") == "none"
    driver.find_element(By.ID, "tab-results").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cells tbody td"))
    assert shown("results") and not shown("browse") and not shown("rows") and display("browse") == "none"
    cells = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#cells tbody td")]
    assert {"0.500 (0.400–0.600)", "0.800", "–"} <= set(cells)  # the interval, as the report prints it; none; no value
    driver.find_element(By.ID, "tab-browse").click()
    wait.until(lambda d: d.find_element(By.ID, "rows").is_displayed())
    assert not shown("results")
    _open_row(driver, wait, _truth(mini_meld, "missing_clip"))  # a row whose clip is gone
    assert shown("no-clip") and not shown("player") and not shown("clip") and not shown("sheet-go")
    _open_row(driver, wait, _first_key(driver))
    wait.until(lambda d: d.find_element(By.ID, "player").is_displayed())
    assert not shown("no-clip") and shown("sheet-go")
    assert not _policy_violations(driver)


def _first_key(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#rows tbody tr").get_attribute("data-key")


@pytest.mark.slow
def test_browser_detail_panel_clears_the_table_at_1400px(served, browser):
    from selenium.webdriver.common.by import By

    driver = browser
    assert driver.execute_script("return window.innerWidth") <= 1400
    wait = _open_page(driver, served)
    _open_row(driver, wait, ESCAPE)  # the longest unbroken text in the store
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours li")) > 0)
    detail_left = driver.execute_script("return document.getElementById('detail').getBoundingClientRect().left")
    rights = driver.execute_script(
        "return [...document.querySelectorAll('#rows tr > :last-child')].map((c) => c.getBoundingClientRect().right)")
    artifacts = Path("test-artifacts")
    artifacts.mkdir(exist_ok=True)
    driver.save_screenshot(str(artifacts / "explore-1400.png"))
    assert rights and max(rights) <= detail_left, (max(rights), detail_left)  # the failure column ends before the panel


@pytest.mark.slow
def test_browser_script_bearing_text_and_report_pages_run_no_script(served, browser):
    from selenium.webdriver.common.by import By

    driver = browser
    wait = _open_page(driver, served)
    _open_row(driver, wait, ESCAPE)
    assert SCRIPT_TEXT in driver.find_element(By.ID, "labels").text and driver.title == "merg explore"
    assert not driver.find_element(By.ID, "player").is_displayed()  # its clip (a link out) is not served
    driver.get(f"{served}/media/report/page.html")
    assert driver.find_element(By.ID, "ok").text == "report page" and driver.title == "report"  # its <script> did not run


@pytest.mark.slow
def test_twenty_first_requests_render_one_sheet(served, mini_meld, monkeypatch):
    """20 parallel first requests for a sheet not yet rendered: one render, and every answer is the same whole PNG."""
    import cv2
    import httpx

    import pipelines.asd.show as show

    renders = []
    render = show.contact_sheet

    def counted(clip, out_png, *args, **kwargs):
        renders.append(clip)
        return render(clip, out_png, *args, **kwargs)

    monkeypatch.setattr(show, "contact_sheet", counted)
    url = f"{served}/media/sheet/{_truth(mini_meld, None)}"
    start = threading.Barrier(20)

    def ask(_):
        start.wait()
        return httpx.get(url, timeout=120)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.content for a in answers}) == 1 and len(renders) == 1
    image = cv2.imdecode(np.frombuffer(answers[0].content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 100 and answers[0].content.endswith(b"IEND\xaeB`\x82")


@pytest.mark.slow
def test_contact_sheet_of_tracks_by_key(client):
    key = _first(client)["key"]
    url = client.get(f"/api/utterance/{key}").json()["sheet_url"]
    sheet = client.get(url)
    assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png" and sheet.content[:4] == b"\x89PNG"


@pytest.mark.slow
def test_reply_box_calls_merg_reply_with_a_listed_run(explore_store, dialogue_store, tiny_llm, tmp_path):
    from fastapi.testclient import TestClient

    from infra.explore.app import ExploreSources, create_app
    from tests.conftest import train_config
    from training import train

    train(train_config(dialogue_store, tmp_path / "runs", tiny_llm, name="text", modality="text", max_steps=1, quantization="none"))
    with TestClient(create_app(ExploreSources(store=explore_store, runs=tmp_path / "runs")), base_url=HOST) as client:
        assert client.get("/api/facets").json()["runs"] == ["text"]
        key = _first(client)["key"]
        result = client.post("/api/reply", json={"run": "text", "key": key})
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["used"] == "text" and isinstance(body["reply"], str) and body["history"][-1].endswith(_first(client)["text"])
        typed = client.post("/api/reply", json={"run": "text", "history": "Ross: I got the job!\nRachel: You did?"}).json()
        assert typed["history"] == ["Ross: I got the job!", "Rachel: You did?"] and typed["next_speaker"] == "Ross"  # lines, not characters
