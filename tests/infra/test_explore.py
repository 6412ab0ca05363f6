"""`merg explore`: the JSON endpoints with a test client, the by-key-only file serving, and the real
page in headless Chromium (skipped with its reason where Chromium or its driver is absent)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurestore.schema import EVAL_OUTPUTS, EVAL_RESULTS
from featurestore.store import Store
from featurestore.synthetic import synthetic_utterances

DIM = 16


@pytest.fixture(scope="module")
def explore_store(tmp_path_factory, mini_meld) -> Path:
    """The generated mini-MELD's utterances (keys, labels, clip paths) with synthetic embeddings,
    a failure, and one sweep's results: what the preprocessing job and a sweep would have written."""
    truth = [json.loads(line) for line in (mini_meld / "ground_truth.jsonl").read_text().splitlines()]
    truth = [t for t in truth if t.get("clip")]
    rows = synthetic_utterances(len(truth), DIM, seed=1)
    replace = {
        "key": [t["key"] for t in truth], "split": [t["split"] for t in truth], "speaker": [t["speaker"] for t in truth],
        "text": [t["text"] for t in truth], "emotion": [t["emotion"] for t in truth],
    }  # fmt: skip
    for name, values in replace.items():
        rows = rows.set_column(rows.column_names.index(name), name, pa.array(values))
    rows = rows.append_column("clip_path", pa.array([str(mini_meld / t["clip"]) for t in truth]))
    rows = rows.append_column("speaker_box", pa.array([[0.25, 0.2, 0.6, 0.7]] * len(truth), pa.list_(pa.float32(), 4)))
    root = tmp_path_factory.mktemp("explore") / "store"
    store = Store.open(root, create=True, embedding_dim=DIM)
    store.write_utterances(rows)
    store.record_failures([(truth[1]["key"], "decode", "truncated", "29 of 76 frames present")])
    key = truth[2]["key"]
    store.write_records(EVAL_RESULTS, [
        dict(cell=c, sweep="demo", system=s, preset="default", split="test", status="done", examples=1,
             metrics=json.dumps({"bertscore_f1": {"value": 0.5, "ci": [0.4, 0.6]}}))
        for c, s in (("c1", "text"), ("c2", "audio+video"))
    ])  # fmt: skip
    store.write_records(EVAL_OUTPUTS, [
        dict(id=f"{c}:{key}", cell=c, key=key, history=["Ross: hi"], next_speaker="Rachel", reference="hello",
             reply=f"reply of {c}", bertscore_f1=0.5)
        for c in ("c1", "c2")
    ])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def client(explore_store, tmp_path_factory):
    from fastapi.testclient import TestClient

    from infra.explore.app import ExploreSources, create_app

    report = tmp_path_factory.mktemp("report")
    (report / "report.md").write_text("# report\n")
    (report / "metrics.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with TestClient(create_app(ExploreSources(store=explore_store, report=report))) as test_client:
        yield test_client


def _first(client, **params) -> dict:
    return client.get("/api/utterances", params=params).json()["items"][0]


def test_facets_and_filtered_paging(client):
    facets = client.get("/api/facets").json()
    assert facets["rows"] > 10 and "neutral" in facets["emotion"] and facets["failure"] == {"truncated": 1}
    assert sorted(facets["report"]) == ["metrics.png", "report.md"]
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


@pytest.mark.parametrize(
    "path",
    [
        "/media/clip/../../etc/passwd", "/media/clip/%2e%2e/%2e%2e/etc/passwd", "/media/clip/..%2f..%2fetc%2fpasswd",
        "/media/clip//etc/passwd", "/media/clip/%2Fetc%2Fpasswd", "/media/clip/train/dia999_utt0",
        "/media/clip/train%2Fdia999_utt0", "/media/report/../report.md", "/media/report/%2e%2e%2fstore",
        "/media/report/unknown.png", "/media/sheet/../../etc/passwd", "/media/sheet/train/dia999_utt0", "/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/index.html",
        "/api/utterance/../../etc/passwd", "/api/utterance/train/dia999_utt0", "/api/similar/%2e%2e%2fx",
    ],
)
def test_files_only_by_key_everything_else_404(client, path):
    assert client.get(path).status_code == 404


def test_read_only_no_endpoint_writes(client, explore_store):
    version = Store.open(explore_store).version
    assert client.post("/api/reply", json={"run": "nope", "key": None}).status_code == 404  # only listed runs
    for method in ("put", "delete", "patch"):
        assert getattr(client, method)("/api/utterances").status_code == 405
    assert Store.open(explore_store).version == version


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
def served(explore_store):
    import uvicorn

    from infra.explore.app import ExploreSources, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ExploreSources(store=explore_store)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_browser_filters_opens_an_utterance_plays_and_shows_neighbours(served, tmp_path):
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    artifacts = Path("test-artifacts")
    artifacts.mkdir(exist_ok=True)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(served)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tbody tr")) > 0)
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
        driver.save_screenshot(str(artifacts / "explore.png"))
        driver.save_screenshot(str(tmp_path / "explore.png"))
        assert (artifacts / "explore.png").stat().st_size > 1000
    finally:
        driver.quit()


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
    with TestClient(create_app(ExploreSources(store=explore_store, runs=tmp_path / "runs"))) as client:
        assert client.get("/api/facets").json()["runs"] == ["text"]
        key = _first(client)["key"]
        result = client.post("/api/reply", json={"run": "text", "key": key})
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["used"] == "text" and isinstance(body["reply"], str) and body["history"][-1].endswith(_first(client)["text"])
