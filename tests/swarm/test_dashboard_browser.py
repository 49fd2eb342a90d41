"""The coordinator's dashboard in a real headless browser, against a live swarm of real peers.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh`` installs them when run
as root). Set ``P2PDILOCO_DASHBOARD_SCREENSHOT=PATH`` to keep the screenshot (docs/dashboard.png
is made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

from tests.swarm.conftest import _free_port

pytestmark = pytest.mark.swarm

# DESIGN.md 5b: without the background-networking flags chromium floods the closed network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1300")


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the dashboard test needs Debian's chromium and chromium-driver: "
                    "run scripts/setup.sh as root, or apt-get install chromium chromium-driver")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path: selenium must not try to download one (no internet).
    service = webdriver.ChromeService(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    session = webdriver.Chrome(options=options, service=service)
    try:
        yield session
    finally:
        session.quit()


def _points(browser, chart: str) -> int:
    return browser.execute_script(f"return document.querySelectorAll('#{chart} .pt').length")


def test_dashboard_shows_a_live_three_peer_swarm(local_swarm, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    swarm = local_swarm(coordinator_args=["--dashboard-port", str(port), "--dashboard-refresh", "1"])
    for _ in range(3):
        swarm.add_peer(12)
    url = f"http://127.0.0.1:{port}/"
    browser.get(url)
    wait = WebDriverWait(browser, 180, poll_frequency=0.5)
    # The page refreshes by itself: nothing below reloads it.
    wait.until(lambda b: b.find_elements(By.ID, "peer-count") and b.find_element(By.ID, "peer-count").text == "3")
    wait.until(lambda b: _points(b, "chart-val") >= 3 and _points(b, "chart-allreduce") >= 2 and _points(b, "chart-throughput") >= 3)
    rows = browser.find_elements(By.CSS_SELECTOR, "table.peers tr.peer")
    assert len(rows) == 3
    ids = {r.find_element(By.TAG_NAME, "td").get_attribute("title") for r in rows}
    state = json.loads(urllib.request.urlopen(url + "api/state", timeout=10).read())
    run = state["runs"][0]
    assert run["run"] == "test" and run["peers_online"] == 3 and {p["peer"] for p in run["peers"]} == ids
    assert all(r["group_size"] >= 2 and r["bytes_sent"] > 0 for r in run["rounds"])
    assert [p["epoch"] for p in run["val_curve"]] == sorted(p["epoch"] for p in run["val_curve"])
    before = browser.find_element(By.TAG_NAME, "body").get_attribute("data-updated")
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-updated") != before)
    shot = os.environ.get("P2PDILOCO_DASHBOARD_SCREENSHOT") or str(swarm.out / "dashboard.png")
    assert browser.save_screenshot(shot)
    # Read-only: no method but GET (and HEAD) is served.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url + "api/state", data=b"{}", method="POST"), timeout=10)
    assert refused.value.code == 405
    assert swarm.wait_exit(range(3), 240) == [0, 0, 0]
    swarm.assert_consistent(range(3))
