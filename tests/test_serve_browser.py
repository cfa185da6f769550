"""`zscir serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

The server runs uvicorn on a free 127.0.0.1 port with the trained tiny Stage-I model and a small shapes-world
gallery. The query is one the model gets right at rank 1, found by ranking in Python first, so the test is
deterministic; the page must show exactly the model's top-k in order. Skips only when no Chromium binary exists.
"""
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("fastapi", reason="zscir[serve] (FastAPI) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from zscir import Composer  # noqa: E402
from zscir.data.images import load_image  # noqa: E402
from zscir.serve import BackgroundServer, create_app, index_folder, load_examples, shapes_gallery  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
K = 5


def _find(names):
    for name in names:
        found = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through its driver; skips only when no Chromium binary can be found."""
    binary = os.environ.get("ZSCIR_CHROMIUM") or _find(BROWSERS)
    if not binary:
        pytest.skip(f"no Chromium binary found (looked for {', '.join(BROWSERS)} on PATH, or $ZSCIR_CHROMIUM); "
                    "install it with: apt-get install chromium chromium-driver")
    driver_path = os.environ.get("ZSCIR_CHROMEDRIVER") or _find(DRIVERS)
    if not driver_path:
        pytest.fail(f"Chromium is at {binary} but chromedriver is missing: apt-get install chromium-driver "
                    "(or set $ZSCIR_CHROMEDRIVER)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(stage1_model, tmp_path_factory):
    """(server, composer, index, gallery) serving the trained Stage-I model over a 40-query shapes gallery."""
    tmp = tmp_path_factory.mktemp("serve-browser")
    composer = Composer.from_pretrained(stage1_model[0])
    gallery = shapes_gallery(40, folder=tmp / "shapes", progress=False)
    index = index_folder(composer, gallery, index_dir=tmp / "index", cache_dir=tmp / "cache", progress=False)
    with BackgroundServer(create_app(composer, index)) as server:
        yield server, composer, index, gallery


def _ranking(composer, index, image, text, k, exclude=None):
    q = composer.encode_query([image], [text])
    return [i for i, _ in index.search(q, k, exclude_ids=[exclude] if exclude else None)[0]]


def _solved_query(composer, index, gallery):
    """An example query whose known target the model ranks first (reference excluded), and its top-k."""
    for example in load_examples(gallery):
        top = _ranking(composer, index, load_image(gallery / example.reference_id), example.text, K,
                       exclude=[example.reference_id])
        if top[0] in example.targets:
            return example, top
    pytest.fail("the tiny Stage-I model ranks no example's target first; the test needs one such query")


def _wait(driver, condition, what, timeout=30):
    try:
        return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        pytest.fail(f"timed out waiting for {what}; the page status says: {status!r}")


def _results(driver):
    cards = driver.find_elements(By.CSS_SELECTOR, "#results li.result")
    return [c.get_attribute("data-id") for c in cards], cards


def _search_and_wait(driver, before):
    driver.find_element(By.ID, "text").send_keys(Keys.ENTER)  # the keyboard path: Enter in the text field submits
    _wait(driver, lambda d: "results in" in d.find_element(By.ID, "status").text
          and d.find_element(By.ID, "status").text != before, "the results")
    return _results(driver)


def _set_value(driver, element_id, value):
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value)


def test_pick_type_search_and_see_the_model_top_k(browser, site, tmp_path):
    server, composer, index, gallery = site
    example, expected = _solved_query(composer, index, gallery)
    ref = example.reference_id
    browser.get(server.url + "/")
    _wait(browser, lambda d: "gallery images" in d.find_element(By.ID, "facts").text, "the health facts")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .thumb")) > 0, "the gallery")

    # "/" jumps to the gallery search; find the reference by its file name and pick it
    browser.find_element(By.TAG_NAME, "body").send_keys("/")
    assert browser.switch_to.active_element.get_attribute("id") == "gallery-query"
    browser.switch_to.active_element.send_keys(Path(ref).name[:10], Keys.ENTER)
    _wait(browser, lambda d: [t.get_attribute("data-id") for t in d.find_elements(By.CSS_SELECTOR, "#gallery .thumb")]
          == [ref], "the name filter")
    browser.find_element(By.CSS_SELECTOR, "#gallery .thumb").click()
    assert Path(ref).name in browser.find_element(By.ID, "ref-name").text

    # an empty text is refused on the page, before any request
    browser.find_element(By.ID, "text").send_keys(Keys.ENTER)
    assert "Type what should be different" in browser.find_element(By.ID, "status").text

    _set_value(browser, "text", example.text)
    _set_value(browser, "k", str(K))
    assert browser.find_element(By.ID, "exclude").is_selected()  # the reference is left out by default
    ids, cards = _search_and_wait(browser, "")
    assert ids == expected and ids[0] in example.targets and ref not in ids
    ranks = [int(c.get_attribute("data-rank")) for c in cards]
    scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards]
    assert ranks == list(range(1, K + 1)) and scores == sorted(scores, reverse=True)
    assert [c.find_element(By.CSS_SELECTOR, ".name").text for c in cards] == [Path(i).name for i in expected]
    for card in cards:  # every result image loaded
        img = card.find_element(By.TAG_NAME, "img")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
    status = browser.find_element(By.ID, "status").text
    assert f"{K} results in" in status and " ms " in status
    browser.save_screenshot(str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").stat().st_size > 10_000

    # the link reproduces the query: opening it runs the same search
    link = browser.find_element(By.ID, "link").get_attribute("href")
    assert "ref=" in link and f"k={K}" in link and "exclude=1" in link
    browser.get(link)
    _wait(browser, lambda d: "results in" in d.find_element(By.ID, "status").text, "the linked query")
    assert _results(browser)[0] == expected
    assert browser.find_element(By.ID, "text").get_attribute("value") == example.text

    # the toggle keeps the reference among the candidates
    browser.find_element(By.ID, "exclude").click()
    before = browser.find_element(By.ID, "status").text
    ids, _ = _search_and_wait(browser, before)
    assert ids == _ranking(composer, index, load_image(gallery / ref), example.text, K)

    # an uploaded reference (the same file) gives the same ranking as the gallery image with nothing excluded
    browser.find_element(By.ID, "tab-upload").click()
    browser.find_element(By.ID, "upload").send_keys(str((gallery / ref).resolve()))
    _wait(browser, lambda d: "Uploaded:" in d.find_element(By.ID, "ref-name").text, "the upload")
    before = browser.find_element(By.ID, "status").text
    ids, _ = _search_and_wait(browser, before)
    assert ids == _ranking(composer, index, load_image(gallery / ref), example.text, K)
    assert browser.find_element(By.ID, "link-row").get_attribute("hidden") is not None

    # nothing was blocked or failed: the page needs nothing from outside this server
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def test_examples_tab_frames_the_target_and_errors_show_on_the_page(browser, site):
    server, composer, index, gallery = site
    example, expected = _solved_query(composer, index, gallery)
    browser.get(server.url + "/")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples button")) > 0, "the examples")
    browser.find_element(By.ID, "tab-examples").click()
    position = [e.text for e in load_examples(gallery)].index(example.text)
    before = browser.find_element(By.ID, "status").text
    browser.find_elements(By.CSS_SELECTOR, "#examples button")[position].click()
    _wait(browser, lambda d: "results in" in d.find_element(By.ID, "status").text
          and d.find_element(By.ID, "status").text != before, "the example's results")
    framed = browser.find_elements(By.CSS_SELECTOR, "#results li.result.target")
    assert [f.get_attribute("data-id") for f in framed] == [expected[0]]
    assert "expected target at rank 1" in browser.find_element(By.ID, "status").text

    # an error from the server is shown, and the page keeps working
    _set_value(browser, "k", "1000")
    browser.find_element(By.ID, "text").send_keys(Keys.ENTER)
    time.sleep(0.2)
    assert "from 1 to" in browser.find_element(By.ID, "status").text
    _set_value(browser, "k", "3")
    browser.execute_script("document.getElementById('text').removeAttribute('maxlength')")
    _set_value(browser, "text", "x" * 400)
    browser.find_element(By.ID, "text").send_keys(Keys.ENTER)
    _wait(browser, lambda d: "over the limit" in d.find_element(By.ID, "status").text, "the server's refusal")
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    _set_value(browser, "text", example.text)
    before = browser.find_element(By.ID, "status").text
    ids, _ = _search_and_wait(browser, before)
    assert len(ids) == 3
