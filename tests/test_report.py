import shutil
import subprocess

import pytest

from obliviate.engine import Store
from obliviate.evaluation.attacks.base import AttackResult
from obliviate.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def reported_store(tmp_path, tiny_model_dir):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    store.add_request(["striped"], "esd", {"steps": "1", "forget_images": "2", "sampling_steps": "2", "batch_size": "2"})
    store.apply(evaluator=lambda model, s, forgotten: {"ua": 0.9, "ua_min": 0.9, "ira": 0.8, "cra": 0.95, "fd": 3.0})
    state = store.state()
    store.ledger.append("attack", {"after": 1, "result": AttackResult("relearn", "striped", 0.1, 0.4).to_dict(), "config": {}},
                        model_hash=state.model_event.model_hash)
    return store


def test_report_has_its_parts_and_plots(reported_store, tmp_path):
    out = write_report(reported_store, tmp_path / "r" / "report.html", images_per_concept=2)
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3  # curves, forgotten grid, retained grid
    assert "Requests" in page and "striped" in page and "relearn" in page and "0.400" in page
    assert (tmp_path / "r" / "report_metrics.png").stat().st_size > 1000


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(reported_store, tmp_path):
    out = write_report(reported_store, tmp_path / "report.html", images_per_concept=2)
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "<h1>obliviate report</h1>" in dom
    assert dom.count("<img") == 3 and 'id="requests"' in dom and 'id="attacks"' in dom
    assert "relearn" in dom
