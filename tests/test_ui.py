"""The gallery page at /ui, driven in a real headless Chromium (Debian's `chromium`, through Playwright):
load it, submit a task with the form, watch it complete, play the output."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hwgp_testing import running_app

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "ui.png"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("ui")
    config = {
        "db": f"sqlite:///{root / 'tasks.db'}",
        "storage": {"root": str(root / "files")},
        "models": "tiny",
    }
    with running_app(config) as client:
        yield str(client.base_url).rstrip("/")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Debian's chromium is needed: apt-get install chromium (.ci/run installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_submit_watch_and_play(app_url: str, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{app_url}/ui")
    assert page.title() == "Headless-Wan2GP Serve"

    page.fill("#prompt", "a red ball bouncing")
    page.fill("#model", "tiny-t2v")
    page.fill("#resolution", "64x48")
    page.fill("#frames", "9")
    page.fill("#steps", "2")
    page.click("#submit")
    page.wait_for_selector("#message:has-text('queued')", timeout=10_000)
    task_id = page.inner_text("#message").split()[-1]

    row = page.locator(f"tr[data-task-id='{task_id}']")
    row.locator(".status.Complete").wait_for(timeout=120_000)
    video = page.locator(f"tr[data-detail-of='{task_id}'] video")
    video.wait_for(timeout=10_000)
    # Playable: the browser decoded the MP4's metadata and frames (9 frames at the model's fps).
    page.wait_for_function(
        "v => v.readyState >= 2 && v.duration > 0 && v.videoWidth === 64",
        arg=video.element_handle(),
        timeout=30_000,
    )
    played = video.evaluate("v => v.play().then(() => true)")
    assert played is True
    # The result and where the time went, as the task reports them.
    details = page.locator(f"tr[data-detail-of='{task_id}']")
    assert details.locator("table.result tr[data-key='seed'] td").nth(1).inner_text().isdigit()
    assert details.locator("table.result tr[data-key='resolution'] td").nth(1).inner_text() == "64x48"
    assert details.locator("table.result tr[data-key='steps'] td").nth(1).inner_text() == "2"
    assert "tiny-t2v" in details.locator("table.result tr[data-key='model'] td").nth(1).inner_text()
    for stage in ("queue wait", "load", "denoise", "decode", "encode", "save"):
        assert details.locator(f"table.timings tr[data-key='{stage}'] .timing").count() == 1, stage
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert errors == []


def test_bad_input_is_shown_next_to_the_form(app_url: str, browser) -> None:
    page = browser.new_page()
    page.goto(f"{app_url}/ui")
    page.fill("#extra", '{"seed": ')
    page.click("#submit")
    assert "not valid JSON" in page.inner_text("#message")
    page.fill("#extra", '{"guidance_scale": "loud"}')
    page.click("#submit")
    page.wait_for_selector("#message.error:has-text('guidance_scale')", timeout=10_000)


def test_cancel_button_cancels(app_url: str, browser) -> None:
    import httpx

    # A task waiting on an unfinished dependency stays Queued until the button is pressed.
    with httpx.Client(base_url=app_url) as client:
        slow = {"prompt": "y", "model": "tiny-t2v", "resolution": "64x48", "num_inference_steps": 200}
        created = client.post("/tasks", json={"task_type": "t2v", "params": slow})
        assert created.status_code == 201, created.text
        first = created.json()["id"]
        body = {"task_type": "t2v", "params": {"prompt": "x", "model": "tiny-t2v"}, "dependant_on": first}
        waiting = client.post("/tasks", json=body).json()["id"]
        page = browser.new_page()
        page.goto(f"{app_url}/ui")
        page.locator(f"tr[data-task-id='{waiting}'] button:has-text('cancel')").click()
        page.locator(f"tr[data-task-id='{waiting}'] .status.Cancelled").wait_for(timeout=10_000)
        assert client.get(f"/tasks/{waiting}").json()["status"] == "Cancelled"
        client.post(f"/tasks/{first}/cancel")  # clean-up: it may have finished already (409)
