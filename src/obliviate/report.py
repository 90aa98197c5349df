"""One self-contained HTML page for a store: the request ledger, metric curves per request,
before/after image grids for forgotten and retained concepts (for a classifier: forgotten and
retained test images with the base model's and the current model's predictions), and attack
results. The plots are also written as PNG files beside the page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .viz import image_grid

# Per model family: the curves of the left panel, the one on the right, and the table's metric columns.
CURVES = {
    "t2i": ((("ua", "UA (forgotten, mean)"), ("ua_min", "UA (worst target)"), ("ira", "IRA"), ("cra", "CRA")),
            ("fd", "Fréchet distance (lower is better)"),
            ("ua", "ua_train_synonym", "ua_heldout_template", "ua_heldout_synonym", "ua_short", "ira", "cra", "fd",
             "unasked", "clip_score", "clip_score_forgotten", "relearn_auc", "relearn_auc_gap")),
    "classifier": ((("ua", "UA (forget set)"), ("ra", "RA (retained)"), ("ta", "TA (test)"), ("mia", "MIA efficacy")),
                   ("gap", "gap to the retrain oracle, points (lower is better)"), ("ua", "ra", "ta", "mia", "gap")),
}
HEADERS = {"ua": "UA", "ua_train_synonym": "UA train syn", "ua_heldout_template": "UA held-out tmpl",
           "ua_heldout_synonym": "UA held-out syn", "ua_short": "UA short", "unasked": "forgotten drawn unasked", "relearn_auc": "relearn AUC", "relearn_auc_gap": "AUC gap to oracle",
           "clip_score": "CLIP score", "clip_score_forgotten": "CLIP score (forgotten)"}


def _png_bytes(figure_or_image) -> bytes:
    buffer = io.BytesIO()
    if hasattr(figure_or_image, "savefig"):
        figure_or_image.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    else:
        figure_or_image.save(buffer, format="PNG")
    return buffer.getvalue()


def _img_tag(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def metric_curves(status: dict):
    """Matplotlib figure of the family's metrics after each applied request (request 0 = base)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    applied = [r for r in status["requests"] if r["status"] == "applied" and r["metrics"]]
    points = ([("base", status["base_metrics"])] if status.get("base_metrics") else []) + \
             [(f"{r['id']}: {r['label']}", r["metrics"]) for r in applied]
    left_keys, (right_key, right_title), _ = CURVES[status["kind"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [p[0] for p in points]
    for key, name in left_keys:
        values = [p[1].get(key) for p in points]
        left.plot(range(len(points)), [np.nan if v is None else v for v in values], marker="o", label=name)
    left.set_ylim(-0.02, 1.02)
    left.set_title("after each request")
    left.legend(fontsize=8)
    right.plot(range(len(points)), [np.nan if p[1].get(right_key) is None else p[1][right_key] for p in points],
               marker="o", color="black")
    right.set_title(right_title)
    for axis in (left, right):
        axis.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def before_after_grid(store, prompt_rows: list[list[str]], seed: int = 0):
    """For each row of prompts, the base model's images, then the current model's."""
    import torch
    base, current = store.base_model(), store.load_model()
    images, captions = [], []
    for texts in prompt_rows:
        for name, model in (("base", base), ("now", current)):
            images.append(model.sample(texts, steps=20, seed=seed, solver="dpm"))
            captions += [f"{name}: {t}" for t in texts]
    return image_grid(torch.cat(images), captions, columns=max(len(r) for r in prompt_rows), scale=4, caption_height=14)


def t2i_grids(store, retained_examples: int, images_per_concept: int) -> list[tuple[str, object]]:
    """Prompts of each forgotten target, and rows of retained prompts, from the store's prompt
    source: world prompts for the embedded world, the store's concept list for free text."""
    forgotten = tuple(dict.fromkeys(store.forgotten()))
    prompts, rng = store.prompts(), np.random.default_rng(0)
    forgotten_rows = [[p.target for p in prompts.forget_pairs((c,), None, images_per_concept, rng)] for c in forgotten]
    kept = prompts.retain_prompts(forgotten, images_per_concept * retained_examples, rng)
    retained_rows = [kept[i:i + images_per_concept] for i in range(0, len(kept), images_per_concept)]
    return [(f"{title}: base model vs now", before_after_grid(store, rows))
            for title, rows in (("Forgotten concepts", forgotten_rows), ("Retained concepts", retained_rows)) if rows]


def classifier_grids(store, retained_examples: int, images_per_concept: int) -> list[tuple[str, object]]:
    """Forgotten and retained test images (forgotten training samples for sample requests),
    captioned with the base model's and the current model's predictions."""
    targets = store.prompts()
    split = targets.split(tuple(store.forgotten()))
    base, current = store.family.load(store.root / "base"), store.load_model()
    names = targets.dataset.class_names
    per_row = max(images_per_concept, 8)
    forgotten_x = split.forget_test_x if len(split.forget_test_y) else split.forget_x
    grids = []
    for title, x in (("Forgotten data", forgotten_x[:per_row]), ("Retained test data", split.test_x[:per_row * retained_examples])):
        if len(x):
            captions = [f"{names[a]} > {names[b]}" for a, b in zip(base.predict(x).tolist(), current.predict(x).tolist())]
            images = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            scale = max(1, 64 // x.shape[-1])
            grids.append((f"{title}: base model's prediction > now", image_grid(images.clamp(0, 1), captions,
                                                                                  columns=per_row, scale=scale,
                                                                                  caption_height=14)))
    return grids


GRIDS = {"t2i": t2i_grids, "classifier": classifier_grids}


def write_report(store, out: str | Path, retained_examples: int = 2, images_per_concept: int = 4) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    status = store.status()
    curves_png = _png_bytes(metric_curves(status))
    (out.with_name(out.stem + "_metrics.png")).write_bytes(curves_png)
    sections = [f"<h2>Metrics per request</h2>{_img_tag(curves_png, 'metric curves')}"]
    for title, grid in GRIDS[status["kind"]](store, retained_examples, images_per_concept):
        grid_png = _png_bytes(grid)
        out.with_name(f"{out.stem}_{title.split()[0].lower()}.png").write_bytes(grid_png)
        sections.append(f"<h2>{html.escape(title)}</h2>{_img_tag(grid_png, title)}")

    columns = [k for k in CURVES[status["kind"]][2] if any(_fmt(r["metrics"], k) for r in status["requests"])]
    rows = "".join(
        f"<tr><td>{r['id']}</td><td>{html.escape(r['label'])}</td><td>{r['method']}</td>"
        f"<td>{', '.join(r['regularizers']) or '-'}</td><td>{r['status']}</td><td>{(r['model_hash'] or '')[:12]}</td>"
        + "".join(f"<td>{_fmt(r['metrics'], k)}</td>" for k in columns)
        + f"<td>{'' if not r['cost'] else round(r['cost']['seconds'], 1)}</td></tr>" for r in status["requests"])
    attacks = [e for e in store.ledger.events() if e.kind == "attack"]
    attack_rows = "".join(
        f"<tr><td>{e.payload['after']}</td><td>{e.payload['result']['attack']}</td><td>{html.escape(e.payload['result']['concept'])}</td>"
        f"<td>{e.payload['result']['before']:.3f}</td><td>{e.payload['result']['after']:.3f}</td>"
        f"<td>{_oracle_cell(e.payload['result'].get('oracle'))}</td></tr>" for e in attacks)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>obliviate report: {html.escape(str(store.root))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} img{{max-width:100%}}</style></head>
<body><h1>obliviate report</h1>
<p>Store <code>{html.escape(str(store.root))}</code>, model <code>{status['model_hash'][:16]}</code>,
{len(status['applied'])} request(s) applied, {len(status['pending'])} pending.</p>
<h2 id="requests">Requests</h2>
<table><tr><th>id</th><th>forget</th><th>method</th><th>regularizers</th><th>status</th><th>model</th>
{''.join(f"<th>{HEADERS.get(k, k.upper())}</th>" for k in columns)}<th>seconds</th></tr>{rows}</table>
{''.join(sections)}
<h2 id="attacks">Attacks</h2>
{'<table><tr><th>after request</th><th>attack</th><th>concept</th><th>seen before</th><th>seen after</th><th>retrain oracle, before / after</th></tr>' + attack_rows + '</table>'
 if attacks else '<p>No attacks recorded; run <code>obliviate attack STORE CONCEPT</code>.</p>'}
</body></html>
"""
    out.write_text(page)
    return out


def _fmt(metrics, key) -> str:
    if not metrics or metrics.get(key) is None:
        return ""
    return f"{metrics[key]:.3f}"


def _oracle_cell(oracle: dict | None) -> str:
    if not oracle:
        return "no oracle trained"
    return f"{oracle['before']:.3f} / {oracle['after']:.3f} ({html.escape(oracle['details'].get('model', ''))})"
