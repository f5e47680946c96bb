"""The HTML reports in a real browser: headless Chromium loads each page from a ``file://`` URL over the DevTools
protocol (``--remote-debugging-pipe``, standard library only) and we check that nothing reached the console at
error level (console errors, uncaught exceptions, failed loads, CSP violations), that every section rendered
and that every image decoded.

Without Chromium the tests skip, except under ``CI`` (set), where they fail: CI installs it (``.ci/run``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cahp.reporting.html_report import (
    ANALYSIS_SECTIONS,
    BENCH_SECTIONS,
    PRUNE_SECTIONS,
    analysis_page,
    bench_page,
    prune_page,
)
from cahp.reporting.html_report import page as html_page
from tests.unit.test_html_report import synthetic_analysis, synthetic_prune_report

SECONDS_PER_PAGE = 20.0


def chromium_path() -> str:
    """The Chromium binary, or skip (fail under ``CI``) without one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "chromium is not installed: apt-get install -y --no-install-recommends chromium"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the browser tests must run)")
    pytest.skip(message)


class Browser:
    """One headless Chromium driven over the DevTools protocol on a pipe (fd 3: commands, fd 4: replies, each
    message JSON ended by a NUL byte)."""

    def __init__(self, binary: str, profile: Path) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def use_pipes() -> None:  # in the child: the two pipe ends become fds 3 and 4
            high_read, high_write = os.dup(commands_read), os.dup(replies_write)
            os.dup2(high_read, 3)
            os.dup2(high_write, 4)

        arguments = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        arguments += ["--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=use_pipes,
            pass_fds=(3, 4),
        )
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept in :attr:`events`)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise AssertionError(f"{method} failed: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._receive())

    def _receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + SECONDS_PER_PAGE
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"chromium did not answer within {SECONDS_PER_PAGE} s")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise AssertionError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            os.write(self._commands, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._commands)
            os.close(self._replies)


PAGE_STATE = """JSON.stringify({
  sections: Array.from(document.querySelectorAll('section')).map(s => ({id: s.id, height: s.offsetHeight})),
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth})),
})"""


def load(page: Path, profile: Path) -> tuple[dict[str, Any], list[str]]:
    """Load ``page`` in headless Chromium: its sections and images as rendered, and every error-level message."""
    browser = Browser(chromium_path(), profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        evaluated = browser.send("Runtime.evaluate", {"expression": PAGE_STATE, "returnByValue": True}, session)
        state = json.loads(evaluated["result"]["value"])
    finally:
        browser.close()
    return state, error_messages(browser.events)


def error_messages(events: list[dict[str, Any]]) -> list[str]:
    """The error-level messages among DevTools events: console.error/assert, uncaught exceptions, log errors."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(
                "console: " + " ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
    return errors


def _bench_folder(root: Path) -> Path:
    """A bench folder as ``cahp bench`` leaves it, written by hand (the real writer imports every method, which
    takes longer than the whole browser check): ``summary.md`` with two tables and three plots."""
    from cahp.reporting.plots import plot_layer_divergence

    (root / "plots").mkdir(parents=True)
    summary = [
        "# Head-pruning benchmark: tiny on toy",
        "",
        "Model `tiny`. Accuracy on `test`; dense model 0.6000 with 4 heads.",
        "",
        "## Accuracy after pruning (no recovery)",
        "",
        "| method | 0.5 | knee |",
        "|---|---|---|",
        "| cahp | 0.5500 ± 0.0100 | 0.5200 |",
        "| random | 0.5000 | – |",
        "",
        "## Heads kept (mean)",
        "",
        "| method | 0.5 | knee |",
        "|---|---|---|",
        "| cahp | 2.0 | 1.0 |",
        "",
    ]
    (root / "summary.md").write_text("\n".join(summary))
    pairs = [{"layers": [layer, layer + 1], "kl": 0.1 * layer, "js": 0.05 * layer} for layer in range(3)]
    for name in ("accuracy_vs_heads", "layer_retention", "kept_depth"):
        plot_layer_divergence(pairs, root / "plots" / f"{name}.png")
    return root


@pytest.mark.parametrize("kind", ["prune", "analyze", "bench"])
def test_the_page_renders_in_chromium_without_console_errors(kind: str, tmp_path: Path) -> None:
    chromium_path()
    if kind == "prune":
        text, sections, images = prune_page(synthetic_prune_report()), PRUNE_SECTIONS, 2
    elif kind == "analyze":
        text, sections, images = analysis_page(synthetic_analysis()), ANALYSIS_SECTIONS, 2
    else:
        text, sections, images = bench_page(_bench_folder(tmp_path / "bench")), BENCH_SECTIONS, 3
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")
    state, errors = load(page, tmp_path / "profile")
    assert errors == []
    assert state["sections"] and all(section["height"] > 0 for section in state["sections"]), state["sections"]
    assert [section["id"] for section in state["sections"]] == list(sections)
    assert len(state["images"]) == images
    assert all(image["complete"] and image["width"] > 0 for image in state["images"]), state["images"]


def test_the_check_catches_console_errors_broken_scripts_broken_images_and_outside_loads(tmp_path: Path) -> None:
    chromium_path()
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><section id="a">text</section>'
        '<img alt="broken" src="data:image/png;base64,iVBORw0KGgo=">'
        '<script>console.error("deliberate"); console.log("an ordinary message"); notDefined();</script></body></html>'
    )
    state, errors = load(page, tmp_path / "profile")
    assert any("deliberate" in error for error in errors), errors
    assert any("notDefined" in error for error in errors), errors
    assert not any("ordinary" in error for error in errors), "console.log is not an error"
    assert state["images"] == [{"complete": True, "width": 0}], "a PNG that does not decode has no width"

    outside = tmp_path / "outside.html"  # a report page that would load an image from outside the file
    outside.write_text(
        html_page("t", "s", ['<section id="a"><img alt="x" src="https://example.invalid/x.png"></section>'])
    )
    state, errors = load(outside, tmp_path / "profile")
    assert state["images"] == [{"complete": True, "width": 0}]
    assert any("Content Security Policy" in error for error in errors), errors
