"""The memory inspector page in headless Chromium: it renders scopes, spans with LRU state, gate values, fallback
events and training curves from the live API, and its screenshot is not blank.

Needs the Debian `chromium` package (CI installs it); skipped where there is none. Set
MEMSPLICE_UPDATE_SCREENSHOTS=1 to also write the screenshot to docs/inspector.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tests.serve.harness import Harness, live

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DOCS = Path(__file__).resolve().parents[2] / "docs"


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--virtual-time-budget=15000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_inspector_renders_in_headless_chromium(tmp_path):
    # a small token cap so that some spans are evicted, and attention tracking to drive the LRU clock
    h = Harness(tmp_path, memory_max_live_tokens=160, memory_track_attention=True)
    svc = h.service
    with live(h) as url:
        import httpx

        with httpx.Client(base_url=url, headers=h.headers(), timeout=60) as http:
            for i in range(10):
                http.post(
                    "/v1/memory/scopes/alice/text",
                    json={"text": f"Fact {i}: Ada lives in Lisbon, works as a carpenter."},
                )
            http.post(
                "/v1/chat/completions",
                json={
                    "model": h.model,
                    "user": "alice",
                    "max_tokens": 6,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": "Where does Ada live?"}],
                },
            )
            http.post("/v1/memory/scopes/alice:work/text", json={"text": "The quick brown fox."})
        # one real fallback event of alice's (a non-finite latent), and a short training curve
        bad = torch.full((1, h.memory.config.num_slots, h.memory.reasoner.shapes.hidden_size), float("inf"))
        h.memory.inject(bad, scope="alice")
        h.store.add_events("alice", svc._take_events("alice"))
        for step, loss in enumerate([3.2, 2.9, 2.5, 2.4, 2.1, 2.0], 1):
            h.store.add_metrics(step, {"loss": loss})

        page = f"{url}/inspector#key={h.key}&scope=alice"
        dom = chromium(["--dump-dom", page], tmp_path / "profile-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'data-ready="1"' in html, html[-3000:]
        assert "Fact 9: Ada lives in Lisbon" in html and "Where does Ada live?" in html  # spans
        assert 'class="pill resident"' in html and 'class="pill evicted"' in html  # LRU state of spans
        assert "non_finite" in html  # the fallback event
        assert 'aria-label="gate values"' in html and "<rect" in html  # gate bars
        assert "loss" in html and "<path" in html  # training curve
        assert "alice:work" in html  # the scope list

        shot = tmp_path / "inspector.png"
        result = chromium([f"--screenshot={shot}", page], tmp_path / "profile-shot")
        assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]

    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 900)
    small = image.resize((160, 112))
    colors = small.getcolors(maxcolors=160 * 112)
    assert len(colors) > 20  # not a blank page: text, bars and tables give many distinct colours
    dominant = max(colors)[0] / (160 * 112)
    assert dominant < 0.9
    if os.environ.get("MEMSPLICE_UPDATE_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS / "inspector.png")
