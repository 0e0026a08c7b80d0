"""The demo page in a real browser: Debian's Chromium, headless, driven by Playwright."""

import shutil

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    # Only its own script runs (by hash), it talks only to this server, and no other site may frame it.
    policy = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"


def test_uploading_a_fashion_mnist_image_shows_its_label_and_heat_map(server, browser, samples, tmp_path):
    sample = next(s for s in samples if s.label == "Trouser")
    image = tmp_path / "trouser.png"
    image.write_bytes(sample.encoded("PNG"))
    page = browser.new_page()
    refused = []  # what the page's Content-Security-Policy blocked: nothing it needs
    page.on(
        "console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None
    )
    page.goto(server.url + "/")
    page.set_input_files("#file", str(image))
    first_label = page.locator("#predictions li .label").first
    first_label.wait_for(timeout=15_000)
    assert first_label.inner_text() == "Trouser"
    assert page.locator("#predictions li").count() == 5
    heatmap = page.locator("#heatmap")
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("document.getElementById('heatmap').naturalWidth === 28")  # the model's 28x28 view
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    assert refused == []
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    page.close()


def test_the_page_shows_the_servers_error_for_a_bad_file(server, browser, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a picture")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error", timeout=15_000)
    assert "not a supported image format" in page.locator("#status").inner_text()
    page.close()
