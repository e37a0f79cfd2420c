"""``topocam app``: a small web page over an exported model, for people who will not use curl.

Upload an image file (the formats of ``topocam predict``); the page shows the
predicted class, the probability of every class, the fused CAM as a heat map
with the ROI contour, and the model's provenance (study, chosen trial,
validation and test metrics). FastAPI and uvicorn come with MLflow; the page
is one self-contained HTML document (no external scripts, fonts or styles),
so it works offline. The upload is sent as the raw request body (no form
encoding, so no extra dependency), written to a temporary file, and read with
the same code as ``topocam predict``.

Endpoints: ``GET /`` the page, ``GET /api/model`` the model's description,
``POST /api/predict?filename=NAME`` (body: the file) the prediction as JSON,
``GET /healthz``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..core.errors import TopoCAMError
from .files import ALL_SUFFIXES, suffix_of
from .predict import predict_one

MAX_UPLOAD_BYTES = 64 * 2**20


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def model_card(model, model_uri: str) -> dict[str, Any]:
    """What the page shows about the model (from its bundle's ``topocam.json``)."""
    info = model.info
    p = info.get("provenance", {})
    return {
        "model_uri": model_uri,
        "classes": info["classes"],
        "input": model.bundle.input.describe(),
        "study": p.get("study"), "sampler": p.get("sampler"), "seed": p.get("seed"), "trial": p.get("trial"),
        "selection": p.get("selection"), "objective": p.get("objective"),
        "val": p.get("val") or {}, "test": p.get("test") or {},
        "dataset": (p.get("dataset") or {}).get("name"),
        "backbone": (p.get("backbone") or {}).get("arch"),
        "cam": info["cam"]["variant"], "weights": info["cam"]["weights"], "tau": info["tau"], "outside": info["outside"],
        "exported_at": p.get("exported_at"), "git_commit": p.get("git_commit"),
    }


def _provenance_rows(card: dict[str, Any]) -> str:
    val, test = card["val"], card["test"]
    rows = [
        ("model", card["model_uri"]),
        ("study", card["study"]),
        ("chosen trial", f"trial {card['trial']} of sampler {card['sampler']}, seed {card['seed']}"),
        ("chosen by", card["selection"]),
        ("validation AUC / ACC", f"{_fmt(val.get('auc'))} / {_fmt(val.get('acc'))}"),
        ("test AUC / ACC", f"{_fmt(test.get('auc'))} / {_fmt(test.get('acc'))} (held out; not used to choose)"),
        ("dataset", card["dataset"]),
        ("backbone", card["backbone"]),
        ("CAM", f"{card['cam']}, layer weights {', '.join(f'{w:.2f}' for w in card['weights'])}, τ = {card['tau']:.3f}"),
        ("input", card["input"]),
        ("exported", f"{card['exported_at']} (code {card['git_commit'] or 'unknown'})"),
    ]
    return "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TopoCAM — __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
 body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
 header{background:#17324d;color:#fff;padding:14px 24px} header h1{margin:0;font-size:20px}
 header p{margin:4px 0 0;font-size:13px;opacity:.85}
 main{display:flex;gap:20px;padding:20px 24px;flex-wrap:wrap;align-items:flex-start}
 section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:16px 20px}
 #upload{flex:1 1 540px;min-width:340px} #about{flex:1 1 340px;min-width:300px}
 h2{font-size:16px;margin:0 0 12px}
 .drop{border:2px dashed #8aa4bf;border-radius:8px;padding:16px;text-align:center;background:#f9fbfd}
 .drop input{margin-top:8px}
 #result{margin-top:16px;display:none} #result[data-state=done],#result[data-state=busy],#result[data-state=error]{display:block}
 #pred{font-size:22px;font-weight:600;margin:4px 0 10px} #pred-class{color:#0b5cad}
 .bar{display:flex;align-items:center;gap:8px;margin:4px 0;font-size:14px}
 .bar .name{width:180px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
 .bar .track{flex:1;height:14px;background:#e6ebf0;border-radius:7px;overflow:hidden}
 .bar .fill{height:100%;background:#0b5cad} .bar.top .fill{background:#d9480f} .bar .val{width:52px;text-align:right}
 #overlay{display:block;margin-top:12px;max-width:100%;image-rendering:auto;border-radius:4px}
 .muted{color:#5b6876;font-size:13px} #error{color:#b00020;font-weight:600}
 table{border-collapse:collapse;font-size:13px;width:100%} th{text-align:left;color:#5b6876;font-weight:500;padding:5px 10px 5px 0;vertical-align:top;white-space:nowrap}
 td{padding:5px 0;word-break:break-word}
 .note{margin-top:12px;font-size:12px;color:#5b6876}
</style></head>
<body>
<header><h1>TopoCAM · __TITLE__</h1>
<p>Research prototype: the prediction, heat map and region are for discussion, not for diagnosis.</p></header>
<main>
<section id="upload">
 <h2>Image</h2>
 <div class="drop"><div>Choose a __KIND__ file (__FORMATS__).</div>
  <input id="file" type="file" accept="__ACCEPT__"></div>
 <div id="result" data-state="idle">
  <div id="status" class="muted"></div>
  <div id="error"></div>
  <div id="pred">Predicted: <span id="pred-class"></span></div>
  <div id="bars"></div>
  <div class="muted" id="roi"></div>
  <img id="overlay" alt="CAM heat map and ROI contour">
  <div class="note">Left: the image, outside the region of interest dimmed. Right: the fused class
   activation map (red = most attended). White contour: the region of interest (map ≥ τ), whose
   topology the classifier reads.</div>
  <div class="muted" id="prep"></div>
 </div>
</section>
<section id="about">
 <h2>About this model</h2>
 <table>__ROWS__</table>
</section>
</main>
<script>
const classes = __CLASSES__;
const kind = "__NOUN__";
const $ = (id) => document.getElementById(id);
function bar(name, p, top) {
  const row = document.createElement("div"); row.className = "bar" + (top ? " top" : "");
  const n = document.createElement("span"); n.className = "name"; n.textContent = name;
  const t = document.createElement("span"); t.className = "track";
  const f = document.createElement("span"); f.className = "fill"; f.style.display = "block"; f.style.width = (100 * p).toFixed(1) + "%";
  t.appendChild(f);
  const v = document.createElement("span"); v.className = "val"; v.textContent = p.toFixed(3);
  row.append(n, t, v); return row;
}
$("file").addEventListener("change", async () => {
  const file = $("file").files[0]; if (!file) return;
  const res = $("result"); res.dataset.state = "busy";
  $("status").textContent = "Analysing " + file.name + " …"; $("error").textContent = "";
  $("pred").style.display = "none"; $("bars").replaceChildren(); $("roi").textContent = ""; $("prep").textContent = "";
  $("overlay").removeAttribute("src"); $("overlay").style.display = "none";
  try {
    const r = await fetch("api/predict?filename=" + encodeURIComponent(file.name),
                          {method: "POST", body: file, headers: {"Content-Type": "application/octet-stream"}});
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
    $("status").textContent = data.file;
    $("pred-class").textContent = data.class_name; $("pred-class").dataset.class = data["class"];
    $("pred").style.display = "block";
    data.probabilities.forEach((p, i) => $("bars").appendChild(bar(classes[i], p, i === data["class"])));
    $("roi").textContent = data.roi_fraction > 0
      ? "Region of interest: " + (100 * data.roi_fraction).toFixed(1) + "% of the " + kind
      : "Region of interest: empty (no pixel of the heat map reaches τ), so the classifier saw no region";
    $("prep").textContent = data.preprocessing.length ? "Prepared: " + data.preprocessing.join("; ") : "";
    $("overlay").onload = () => { res.dataset.state = "done"; };
    $("overlay").src = data.overlay; $("overlay").style.display = "block";
  } catch (e) {
    $("status").textContent = file.name; $("error").textContent = "Could not analyse this file: " + e.message;
    res.dataset.state = "error";
  }
});
</script>
</body></html>
"""


def render_page(card: dict[str, Any], title: str, ndim: int) -> str:
    fmts = (".png", ".jpg", ".jpeg", ".npy") if ndim == 2 else (".npy", ".nii", ".nii.gz")
    return (PAGE.replace("__TITLE__", html.escape(title))
            .replace("__KIND__", "2D image" if ndim == 2 else "3D volume")
            .replace("__NOUN__", "image" if ndim == 2 else "volume")
            .replace("__FORMATS__", html.escape(", ".join(fmts)))
            .replace("__ACCEPT__", ",".join(fmts))
            .replace("__ROWS__", _provenance_rows(card))
            .replace("__CLASSES__", json.dumps(card["classes"]).replace("</", "<\\/")))


def predict_upload(model, filename: str, data: bytes) -> dict[str, Any]:
    """One uploaded file -> the page's JSON (TopoCAMError on bad input)."""
    name = Path(filename or "").name
    sfx = suffix_of(name)
    if sfx not in ALL_SUFFIXES:
        raise TopoCAMError(f"unsupported file type {sfx or '(none)'!r}; upload {', '.join(ALL_SUFFIXES)}")
    if not data:
        raise TopoCAMError("the uploaded file is empty")
    with tempfile.TemporaryDirectory(prefix="topocam-app-") as tmp:
        path = Path(tmp) / f"upload{sfx}"
        path.write_bytes(data)
        rec, png = predict_one(model, path, titled=False)  # the page shows class and ROI size itself
    return {"file": name, **rec, "overlay": "data:image/png;base64," + base64.b64encode(png).decode()}


def create_app(model, model_uri: str, title: str | None = None):
    """The FastAPI application over a TopoCAMModel."""
    card = model_card(model, model_uri)
    page = render_page(card, title or model_uri, model.bundle.input.ndim)
    app = FastAPI(title="TopoCAM", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/api/model")
    def about() -> dict:
        return card

    @app.post("/api/predict")
    async def predict(request: Request, filename: str = "") -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"file too large (limit {MAX_UPLOAD_BYTES // 2**20} MB)"}, status_code=413)
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"file too large (limit {MAX_UPLOAD_BYTES // 2**20} MB)"}, status_code=413)
        try:
            result = await run_in_threadpool(predict_upload, model, filename, body)
        except TopoCAMError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # a reader failing in an unforeseen way: say so, keep serving
            return JSONResponse({"error": f"internal error ({type(exc).__name__}: {exc})"}, status_code=500)
        return JSONResponse(result)

    return app


def run_app(model, model_uri: str, host: str = "127.0.0.1", port: int = 8000, title: str | None = None) -> None:
    import uvicorn

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uvicorn.run(create_app(model, model_uri, title), host=host, port=port, log_level="info")
