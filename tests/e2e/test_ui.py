"""The /ui page in a real browser (headless Chromium driven by selenium) on a real
`bentoml serve`: the recommendations it shows are /recommend's, and with API keys set it
shows no data without the key. Set RECSYS_UI_SCREENSHOT=docs/ui.png to refresh the
README's screenshot."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.core.schema import FEATURE_NAMES
from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)"
)
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

KEY = "ui-test-key-0123456789"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 30
# Nothing of the browser's own talks to the network (there is none here), and no state is
# carried over between runs.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,1800",
)  # fmt: skip
MAX_SCREENSHOT_BYTES = 300_000


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(f"needs Debian's chromium and chromium-driver (found chromium={CHROMIUM}, "
                    f"chromedriver={CHROMEDRIVER}); `apt-get install -y chromium chromium-driver`")  # fmt: skip
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def guarded(trained: TrainResult, bentoml_home: Path) -> Iterator[ServerProcess]:
    assert trained.tag is not None
    proc = start_server(["service:ApiService"], cwd=PROJECT_ROOT, env={
        "BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": trained.tag,
        "RECSYS_API_KEYS": KEY, "RECSYS_API_WORKERS": "1",
    })  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


def wait_for(driver: WebDriver, what: str, condition: Any) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d))
    except TimeoutException as err:
        state = driver.execute_script("return document.body.dataset.state")
        shown = driver.find_element(By.ID, "status").text
        raise AssertionError(
            f"{what}: not within {WAIT_S} s (page state {state!r}, status {shown!r})"
        ) from err


def page_state(driver: WebDriver) -> str | None:
    return driver.execute_script("return document.body.dataset.state")


def open_page(driver: WebDriver, url: str) -> None:
    """A fresh load with no key remembered (the page keeps it in sessionStorage)."""
    driver.get(f"{url}/ui")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{url}/ui")


def show_user(driver: WebDriver, user_id: str) -> None:
    box = driver.find_element(By.ID, "user-input")
    box.clear()
    box.send_keys(user_id)
    driver.find_element(By.ID, "show-user").click()


def shown_recommendations(driver: WebDriver) -> list[dict[str, str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#recs tbody tr")
    names = ("rank", "title", "item_id", "score", "source")
    return [dict(zip(names, (c.text for c in row.find_elements(By.TAG_NAME, "td")))) for row in rows]


def save_screenshot(driver: WebDriver, path: Path) -> None:
    """A palette PNG: the page is flat colours and text, so it stays small for the README."""
    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=128).save(path, optimize=True)


def test_the_shell_is_public_and_its_data_needs_the_key(guarded: ServerProcess) -> None:
    page = httpx.get(f"{guarded.url}/ui", follow_redirects=True, timeout=10)
    assert page.status_code == 200 and "<title>recsys" in page.text
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/ui/api/users", "/ui/api/history?user_id=u1", "/ui/api/reports"):
        assert httpx.get(f"{guarded.url}{path}", timeout=10).status_code == 401, path
        assert httpx.get(f"{guarded.url}{path}", headers=auth, timeout=10).status_code == 200, path
    reports = httpx.get(f"{guarded.url}/ui/api/reports", headers=auth, timeout=10).json()
    png = reports["champion"]["files"][0]
    assert httpx.get(f"{guarded.url}/ui/api/reports/champion/{png}", timeout=10).status_code == 401
    got = httpx.get(f"{guarded.url}/ui/api/reports/champion/{png}", headers=auth, timeout=10)
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("path", "status", "named"),
    [
        ("/ui/api/users?limit=0", 400, "limit"),
        ("/ui/api/users?limit=ten", 400, "limit"),
        ("/ui/api/history", 400, "user_id"),
        ("/ui/api/reports/nobody/x.png", 400, "champion"),
        # In the folder, but not a report: only the PNGs are served.
        ("/ui/api/reports/champion/saved_model.ubj", 404, "valid names"),
        # A path never reaches the file system (no route matches a name with a slash).
        ("/ui/api/reports/champion/..%2F..%2Fsaved_model.ubj", 404, None),
    ],
)
def test_page_routes_name_what_is_wrong(
    guarded: ServerProcess, path: str, status: int, named: str | None
) -> None:
    resp = httpx.get(f"{guarded.url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert resp.status_code == status
    if named is not None:
        assert named in resp.json()["error"]


def test_no_data_is_shown_without_the_key(browser: WebDriver, guarded: ServerProcess, tmp_path: Path) -> None:
    open_page(browser, guarded.url)
    wait_for(browser, "the page asks for a key", lambda d: page_state(d) == "needs-key")
    show_user(browser, "u1")
    for key in ("", "not-the-key"):
        browser.find_element(By.ID, "key-input").clear()
        browser.find_element(By.ID, "key-input").send_keys(key)
        browser.find_element(By.ID, "key-save").click()
        wait_for(browser, f"key {key!r} refused", lambda d: page_state(d) == "needs-key")
    save_screenshot(browser, tmp_path / "ui-without-key.png")
    assert (
        browser.find_elements(By.CSS_SELECTOR, "#recs tbody tr, #history tbody tr, #user-list option") == []
    )
    assert (
        browser.find_element(By.ID, "models").text == "" and browser.find_element(By.ID, "drift").text == ""
    )


def test_the_page_shows_what_recommend_answers(
    browser: WebDriver, guarded: ServerProcess, tmp_path: Path
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    open_page(browser, guarded.url)
    wait_for(browser, "the key prompt", lambda d: page_state(d) == "needs-key")
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-save").click()
    wait_for(browser, "the page loaded with the key", lambda d: page_state(d) == "ready")
    # Pick a user the page offers, one whose list mixes candidate sources.
    offered = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#user-list option")]
    assert len(offered) > 10
    answers = {}
    for user_id in offered:
        body = {"user_id": user_id, "k": 10}
        answers[user_id] = httpx.post(f"{guarded.url}/recommend", json=body, headers=auth, timeout=10).json()
        if len({i["source"] for i in answers[user_id]["items"]}) >= 2:
            break
    user_id, expected = next(reversed(answers.items()))
    # Reloaded: the tab keeps its key, and the drift chart now counts the requests above.
    browser.refresh()
    wait_for(browser, "the page reloaded with the kept key", lambda d: page_state(d) == "ready")
    show_user(browser, user_id)
    wait_for(browser, f"recommendations for {user_id}",
             lambda d: d.find_element(By.ID, "recs").get_attribute("data-user") == user_id)  # fmt: skip

    shown = shown_recommendations(browser)
    assert [r["item_id"] for r in shown] == [i["item_id"] for i in expected["items"]]
    assert shown == [
        {"rank": str(i["rank"]), "title": i["title"], "item_id": i["item_id"], "score": f"{i['score']:.4f}", "source": i["source"]}
        for i in expected["items"]
    ]  # fmt: skip
    note = browser.find_element(By.ID, "recs-note").text
    assert expected["model_tag"] in note and expected["variant"] in note

    history = httpx.get(
        f"{guarded.url}/ui/api/history", params={"user_id": user_id}, headers=auth, timeout=10
    ).json()
    titles = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#history tbody tr td:nth-child(2)")]
    assert titles == [i["title"] for i in history["items"]] and titles

    model = httpx.post(f"{guarded.url}/model", json={}, headers=auth, timeout=10).json()
    assert model["tag"] in browser.find_element(By.ID, "models").text
    images = browser.find_elements(By.CSS_SELECTOR, "#models img")
    assert images and all(
        browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images
    )
    bars = browser.find_elements(By.CSS_SELECTOR, "#drift svg rect[data-feature]")
    assert [b.get_attribute("data-feature") for b in bars] == [*FEATURE_NAMES, "(score)"]

    save_screenshot(browser, tmp_path / "ui.png")
    if target := os.environ.get("RECSYS_UI_SCREENSHOT"):
        save_screenshot(browser, PROJECT_ROOT / target)
        assert (PROJECT_ROOT / target).stat().st_size <= MAX_SCREENSHOT_BYTES


def test_without_keys_the_page_needs_none(browser: WebDriver, server: ServerProcess) -> None:
    open_page(browser, server.url)
    wait_for(browser, "the page loaded without a key", lambda d: page_state(d) == "ready")
    assert not browser.find_element(By.ID, "key-panel").is_displayed()
