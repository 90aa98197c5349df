"""The benchmark runner: methods x regularizers over a named request sequence, evaluated after
every request, with the unedited base model as reference rows.

Each cell (sequence, method, regularizer) is saved as JSON when it finishes, so a stopped run
resumes where it left off. Tables are rebuilt from all finished cells: ``<sequence>.csv`` with one
row per request, and ``<sequence>.md`` with the last row of every cell.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .engine import RegularizerSpec, Store
from .evaluation.evaluator import EvalConfig, Evaluator

# Each sequence is a list of requests; a request is a tuple of target terms.
SEQUENCES: dict[str, dict] = {
    "s1": {"fresh_store_per_request": True, "requests": [("striped",), ("triangle",), ("red",)],
           "about": "one request per domain, each on a fresh copy of the base model"},
    "s3": {"fresh_store_per_request": False, "requests": [("striped",), ("triangle",), ("red",)],
           "about": "the s1 requests applied one after another"},
    "s10": {"fresh_store_per_request": False,
            "requests": [("striped",), ("triangle",), ("red",), ("dotted",), ("circle",), ("blue",), ("star",),
                         ("checkered",), ("yellow",), ("heart",)],
            "about": "ten requests mixing the three domains, applied one after another"},
}

COLUMNS = ["sequence", "method", "regularizer", "step", "targets", "ua", "ua_min", "ua_heldout_template",
           "ua_heldout_synonym", "ira", "cra", "fd", "seconds", "unet_forward_passes", "unet_backward_passes", "edit_bytes"]


def _cell_name(sequence: str, method: str, regularizer: str) -> str:
    return f"{sequence}__{method.replace(':', '@').replace('=', '-').replace(',', '+')}__{regularizer or 'none'}"


def split_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"uce:incremental=false,lam=1"`` -> ``("uce", {"incremental": "false", "lam": "1"})``: a
    method with options of its own, so one bench can compare variants of a method."""
    name, _, options = spec.partition(":")
    pairs = [o.split("=", 1) for o in options.split(",") if o]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"Expected METHOD:key=value,key=value, got {spec!r}.")
    return name.strip(), {k.strip(): v.strip() for k, v in pairs}


def parse_method_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``["esd.steps=60", "uce.lam=1"]`` -> ``{"esd": {"steps": "60"}, "uce": {"lam": "1"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"Expected METHOD.option=value, got {item!r} (e.g. esd.steps=60).")
        out.setdefault(method.strip(), {})[option.strip()] = value.strip()
    return out


def run_bench(methods: list[str], regularizers: list[str], sequence: str, out: Path, work: Path,
              model: str = "shapes-t2i", method_options: dict[str, dict[str, str]] | None = None,
              eval_config: EvalConfig = EvalConfig(), judge: str = "shapes-judge", oracles: Path | None = None,
              echo=print) -> list[dict]:
    if sequence not in SEQUENCES:
        raise ValueError(f"Unknown sequence {sequence!r}; choose one of {', '.join(SEQUENCES)}.")
    spec = SEQUENCES[sequence]
    out, work = Path(out), Path(work)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = [("base", ""), ("oracle", "")] + [(m, r) for m in methods for r in (regularizers or [""])]
    for method, regularizer in cells:
        path = out / "cells" / f"{_cell_name(sequence, method, regularizer)}.json"
        if path.is_file():
            echo(f"skip {path.name} (done)")
            continue
        echo(f"run {sequence} / {method} / {regularizer or 'no regularizer'}")
        name, own_options = split_method_spec(method)
        options = {**(method_options or {}).get(name, {}), **own_options}
        rows = _run_cell(method, regularizer, sequence, spec, work, model, options, eval_config, judge, echo, oracles)
        if not rows:
            continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, "eval_config": asdict(eval_config)}, indent=2))
        tmp.replace(path)
    return write_tables(out, sequence)


def _run_cell(method, regularizer, sequence, spec, work, model, options, eval_config, judge, echo,
              oracles: Path | None = None) -> list[dict]:
    """Rows of one cell. ``base`` evaluates the unedited model; ``oracle`` the model retrained
    without the forgotten concepts, where one exists for every step (else no rows)."""
    from .models.zoo import find_oracle
    rows = []
    cell_dir = work / _cell_name(sequence, method, regularizer)
    shutil.rmtree(cell_dir, ignore_errors=True)
    store, forgotten = None, ()
    for step, targets in enumerate(spec["requests"], start=1):
        if store is None or spec["fresh_store_per_request"]:
            store = Store.init(cell_dir / f"store-{step}", model)
            evaluator = Evaluator.for_store(store, eval_config, judge)
            forgotten = ()
        forgotten = forgotten + tuple(targets)
        start = time.time()
        if method == "base":
            metrics, cost = evaluator(store.load_model(), store, forgotten=forgotten), {}
        elif method == "oracle":
            folder = find_oracle(forgotten, oracles) if oracles else None
            if folder is None:
                echo(f"  no retrain oracle for {', '.join(forgotten)} in {oracles}; oracle rows skipped")
                return []
            metrics, cost = evaluator(store.family.load(folder), store, forgotten=forgotten), {}
        else:
            regs = (RegularizerSpec(regularizer),) if regularizer else ()
            store.add_request(list(targets), split_method_spec(method)[0], options, regularizers=regs)
            outcome = store.apply(evaluator=evaluator)[0]
            metrics, cost = outcome.metrics, outcome.cost
        row = {"sequence": sequence, "method": method, "regularizer": regularizer or "-", "step": step,
               "targets": "+".join(targets), **{k: metrics.get(k) for k in ("ua", "ua_min", "ua_heldout_template",
                                                                               "ua_heldout_synonym", "ira", "cra", "fd")},
               "seconds": cost.get("seconds"), "unet_forward_passes": cost.get("unet_forward_passes"),
               "unet_backward_passes": cost.get("unet_backward_passes"), "edit_bytes": cost.get("edit_bytes")}
        rows.append(row)
        echo(f"  step {step} {row['targets']}: ua {row['ua']} ira {row['ira']} cra {row['cra']} fd {row['fd']} "
             f"({time.time() - start:.0f}s)")
    return rows


def write_tables(out: Path, sequence: str) -> list[dict]:
    rows = []
    for path in sorted((out / "cells").glob(f"{sequence}__*.json")):
        rows.extend(json.loads(path.read_text())["rows"])
    with open(out / f"{sequence}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{sequence}.md").write_text(markdown_table(rows, sequence))
    return rows


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], sequence: str) -> str:
    spec = SEQUENCES[sequence]
    lines = [f"# Benchmark `{sequence}`: {spec['about']}", "",
             "UA: share of images for forgotten prompts the judge does not see as the target (mean over targets so far; "
             "min = worst target). IRA/CRA: judge accuracy on retained prompts in / outside the targets' domains. "
             "FD: Fréchet distance of judge features to renders. Passes: UNet forward / backward calls.", ""]
    header = ["method", "regularizer", "step", "targets", "UA", "UA min", "UA held-out tmpl", "UA held-out syn", "IRA", "CRA",
              "FD", "seconds", "passes f/b"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        passes = f"{r['unet_forward_passes']}/{r['unet_backward_passes']}" if r["unet_forward_passes"] is not None else "-"
        lines.append("| " + " | ".join([r["method"], r["regularizer"], str(r["step"]), r["targets"], _fmt(r["ua"]),
                                        _fmt(r["ua_min"]), _fmt(r["ua_heldout_template"]), _fmt(r["ua_heldout_synonym"]),
                                        _fmt(r["ira"]), _fmt(r["cra"]), _fmt(r["fd"], 2), _fmt(r["seconds"], 1), passes]) + " |")
    return "\n".join(lines) + "\n"
