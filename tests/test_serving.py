"""The exported model over HTTP (``mlflow models serve``) and on the web page, for real.

* ``topocam serve`` (which runs ``python -m mlflow models serve --env-manager
  local``) on 127.0.0.1 and a free port, started with a PATH that does NOT hold
  the virtual environment's ``bin``: plain ``mlflow models serve`` fails there
  ("uvicorn: command not found"). Real HTTP requests: one image, a batch, and
  malformed bodies, each answered 4xx with a message that names the problem,
  while the server keeps serving.
* ``topocam app`` in Debian's Chromium driven by Playwright: upload a PNG,
  wait for the result, check the class shown and the provenance, save a
  screenshot. Skipped, with the reason, where Chromium or Playwright is absent
  (``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .shipping import REPO, free_port, http, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _without_venv_bin(env: dict[str, str]) -> dict[str, str]:
    import sys

    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(venv_bin).resolve())
    return env


@pytest.fixture(scope="module")
def server(shipped, tmp_path_factory):
    import sys

    port = free_port()
    env = _without_venv_bin(shipped.env())
    log = tmp_path_factory.mktemp("serve") / "server.log"
    argv = [sys.executable, str(REPO / "cli.py"), "serve", "--model", shipped.uri, "--port", str(port),
            "--tracking-uri", shipped.tracking_uri]
    with running(argv, env, f"http://127.0.0.1:{port}/ping", log):
        yield f"http://127.0.0.1:{port}", log


def _invoke(url: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, text = http("POST", url + "/invocations", body)
    return status, json.loads(text)


def test_serves_one_image_and_a_batch_like_the_model_in_process(shipped, server):
    from topocam.deploy.serve import load_model

    url, _ = server
    model, _ = load_model(shipped.uri, shipped.tracking_uri)
    u8 = shipped.uint8("test")[:3]
    status, one = _invoke(url, {"inputs": u8[:1].tolist()})  # JSON integers: the 0-255 scale
    assert status == 200, one
    assert list(one) == ["predictions"] and len(one["predictions"]) == 1
    assert one["predictions"] == model.predict(u8[:1])
    status, batch = _invoke(url, {"inputs": u8.tolist()})
    assert status == 200 and len(batch["predictions"]) == 3
    assert batch["predictions"] == model.predict(u8)
    for p in batch["predictions"]:
        assert set(p) == {"class", "probabilities", "roi_fraction"} and p["class"] == int(np.argmax(p["probabilities"]))
    floats = shipped.data.x["test"][:2, 0]  # floats in [0, 1], with a channel axis, as "instances"
    status, fl = _invoke(url, {"instances": floats[..., None].tolist()})
    assert status == 200 and fl["predictions"] == model.predict(floats)


@pytest.mark.parametrize(
    "payload, words",
    [
        ({"inputs": np.zeros((16, 16), int).tolist()}, ["single image", "wrap it in a batch"]),
        ({"inputs": np.zeros((1, 16, 16, 5), int).tolist()}, ["wrong rank", "(1, 16, 16, 5)"]),
        ({"inputs": np.zeros((1, 20, 20), int).tolist()}, ["wrong size", "20×20", "16×16"]),
        ({"inputs": [[["a"] * 16] * 16]}, ["numbers only", "'a'"]),
        ({"inputs": [[[1] * 16] * 15 + [[1] * 15]]}, ["different lengths"]),
        ({"inputs": np.full((1, 16, 16), 2.5).tolist()}, ["[0, 1]"]),
        (b"{not json", ["valid JSON"]),
        ({"images": []}, ["inputs"]),
    ],
    ids=["rank-single-image", "rank-channels", "size", "non-numeric", "ragged", "range", "not-json", "wrong-key"],
)
def test_malformed_requests_get_4xx_with_the_reason_and_the_server_keeps_serving(shipped, server, payload, words):
    url, _ = server
    status, answer = _invoke(url, payload)
    assert 400 <= status < 500, (status, answer)
    msg = answer.get("message", "")
    for w in words:
        assert w in msg, f"{w!r} not in {msg[-400:]!r}"
    ok, good = _invoke(url, {"inputs": shipped.uint8("val")[:1].tolist()})
    assert ok == 200 and len(good["predictions"]) == 1


def test_plain_mlflow_serve_needs_the_venv_on_path_and_topocam_serve_provides_it(shipped):
    """What `topocam serve` fixes: `mlflow models serve` runs `uvicorn` through the shell."""
    from topocam.deploy.serve import serve_command

    argv, env = serve_command(shipped.uri, "127.0.0.1", 5000, shipped.tracking_uri)
    import sys

    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert shutil.which("uvicorn", path=env["PATH"]) is not None
    assert argv[:5] == [sys.executable, "-m", "mlflow", "models", "serve"] and "--env-manager" in argv
    assert env["MLFLOW_TRACKING_URI"] == shipped.tracking_uri


def test_serve_cli_fails_fast_on_a_missing_model(shipped):
    from .shipping import cli

    r = cli("serve", "--model", "models:/nope@champion", "--port", str(free_port()), "--tracking-uri",
            shipped.tracking_uri, env=shipped.env(), timeout=120)
    assert r.returncode != 0 and "cannot find model 'models:/nope@champion'" in r.stderr and "Traceback" not in r.stderr


# -------------------------------------------------------------------- the page


def test_web_page_in_headless_chromium(shipped, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    import sys

    from topocam.deploy.serve import load_model

    model, _ = load_model(shipped.uri, shipped.tracking_uri)
    u8 = shipped.uint8("test")
    Image.fromarray(u8[0]).save(tmp_path / "case0.png")
    expected = model.predict(u8[:1])[0]
    classes = shipped.data.class_names
    np.save(tmp_path / "volume.npy", np.zeros((16, 16, 16), np.float32))

    port = free_port()
    argv = [sys.executable, str(REPO / "cli.py"), "app", "--model", shipped.uri, "--port", str(port),
            "--tracking-uri", shipped.tracking_uri]
    shot = tmp_path / "app.png"
    with running(argv, shipped.env(), f"http://127.0.0.1:{port}/healthz", tmp_path / "app.log"):
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
                about = page.inner_text("#about")
                p = shipped.result.provenance
                assert "shiptiny" in about and f"trial {p['trial']} of sampler {p['sampler']}, seed {p['seed']}" in about
                assert f"{p['val']['auc']:.3f}" in about and f"{p['test']['auc']:.3f}" in about

                page.set_input_files("#file", str(tmp_path / "case0.png"))
                page.wait_for_selector("#result[data-state=done]", timeout=120_000)
                assert page.inner_text("#pred-class") == classes[expected["class"]]
                bars = page.inner_text("#bars")
                for name, prob in zip(classes, expected["probabilities"]):
                    assert name in bars and f"{prob:.3f}" in bars
                assert page.evaluate("document.getElementById('overlay').naturalWidth") > 100
                page.screenshot(path=str(shot), full_page=True)

                page.set_input_files("#file", str(tmp_path / "volume.npy"))  # wrong dimensionality: said on the page
                page.wait_for_selector("#result[data-state=error]", timeout=120_000)
                assert "3 dimension" in page.inner_text("#error")
            finally:
                browser.close()
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("TOPOCAM_APP_SCREENSHOT"):  # for the README: TOPOCAM_APP_SCREENSHOT=docs/app.png
        shutil.copy(shot, os.environ["TOPOCAM_APP_SCREENSHOT"])
