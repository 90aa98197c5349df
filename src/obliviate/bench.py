"""The benchmark runner: methods x regularizers over a named request sequence, evaluated after
every request, with the unedited base model as reference rows.

Each cell (sequence, method, regularizer) is saved as JSON when it finishes, so a stopped run
resumes where it left off; inside a cell, its store and ``progress.json`` (the rows so far) in the
work folder let a long sequence resume at the request it stopped at. Tables are rebuilt from all
finished cells: ``<sequence>.csv`` with one row per request, and ``<sequence>.md`` with the last
row of every cell.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

from .config import parse_spec
from .engine import RegularizerSpec, Request, Store
from .executors import Executor, SerialExecutor
from .models.zoo import DEFAULT_JUDGE, DEFAULT_T2I
from .progress import RequestProgress

# Each sequence is a list of requests (a request is a tuple of targets) and the model it runs on.
SEQUENCES: dict[str, dict] = {
    "s1": {"model": DEFAULT_T2I, "fresh_store_per_request": True, "requests": [("striped",), ("triangle",), ("red",)],
           "about": "one request per domain, each on a fresh copy of the base model"},
    "s3": {"model": DEFAULT_T2I, "fresh_store_per_request": False, "requests": [("striped",), ("triangle",), ("red",)],
           "about": "the s1 requests applied one after another"},
    # One concept on a fresh store, beside the retrain oracle that ships for it: attacks beside the oracle.
    **{f"s1-{concept}": {"model": DEFAULT_T2I, "fresh_store_per_request": True, "requests": [(concept,)],
                         "about": f"forget {concept}, beside its shipped retrain oracle; for attacks beside the oracle"}
       for concept in ("striped", "triangle", "red")},
    "s10": {"model": DEFAULT_T2I, "fresh_store_per_request": False,
            "requests": [("striped",), ("triangle",), ("red",), ("dotted",), ("circle",), ("blue",), ("star",),
                         ("checkered",), ("yellow",), ("heart",)],
            "about": "ten requests mixing the three domains, applied one after another"},
    "s50": {"model": DEFAULT_T2I, "fresh_store_per_request": False, "requests": lambda: combination_requests(50),
            "about": "fifty requests, each a combination of two concepts (e.g. 'striped triangle'), one after another"},
    "s30": {"model": DEFAULT_T2I, "fresh_store_per_request": False, "requests": lambda: combination_requests(30),
            "evaluate_every": 10, "about": "s100's first thirty requests, evaluated after every tenth"},
    "s100": {"model": DEFAULT_T2I, "fresh_store_per_request": False, "requests": lambda: combination_requests(100),
             "evaluate_every": 10,
             "about": "a hundred two-concept combinations one after another, evaluated after every tenth (forgetting "
                      "every concept alone would leave nothing retained)"},
    "d5": {"model": "digits-cnn", "fresh_store_per_request": False, "requests": [("3",), ("8",), ("1",), ("5",), ("0",)],
           "about": "five digit classes forgotten one after another"},
    "d5-samples": {"model": "digits-cnn", "fresh_store_per_request": False,
                   "requests": lambda: random_sample_requests("digits", requests=5, per_request=40),
                   "about": "five requests, each forgetting 40 random training samples of the digits"},
}


def combination_requests(n: int, seed: int = 0) -> list[tuple[str, ...]]:
    """``n`` distinct two-concept combinations of the world ("striped triangle": one concept from
    each of two domains), in a fixed random order."""
    import itertools

    import numpy as np
    from .world import DEFAULT_ONTOLOGY as onto
    pairs = [f"{a} {b}" for d1, d2 in itertools.combinations(reversed(onto.domains), 2)  # as prompts say it
             for a in onto.names(d1) for b in onto.names(d2)]
    order = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [(pairs[i],) for i in order]


def random_sample_requests(dataset: str, requests: int, per_request: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Disjoint random training samples per request (``sample:INDEX`` targets), fixed by ``seed``."""
    import numpy as np
    from .classifiers.data import load_dataset
    order = np.random.default_rng(seed).permutation(len(load_dataset(dataset).train_y))
    return [tuple(f"sample:{i}" for i in sorted(order[k * per_request:(k + 1) * per_request])) for k in range(requests)]


def sequence_requests(sequence: str) -> list[tuple[str, ...]]:
    requests = SEQUENCES[sequence]["requests"]
    return requests() if callable(requests) else requests


# Columns of each model family's tables: (header, row key, decimals).
T2I_COLUMNS = [("UA", "ua", 3), ("UA min", "ua_min", 3), ("UA train syn", "ua_train_synonym", 3), ("UA held-out tmpl", "ua_heldout_template", 3),
               ("UA held-out syn", "ua_heldout_synonym", 3), ("IRA", "ira", 3), ("CRA", "cra", 3), ("FD", "fd", 2),
               ("unasked", "unasked", 3), ("supertype acc", "supertype_accuracy", 3), ("relearn AUC", "relearn_auc", 3),
               ("AUC gap", "relearn_auc_gap", 3),
               ("NLL forgotten", "nll_forgotten", 3), ("NLL gap", "nll_forgotten_gap", 3), ("NLL retained", "nll_retained", 3)]
CLASSIFIER_COLUMNS = [("UA", "ua", 3), ("UA test", "ua_test", 3), ("RA", "ra", 3), ("TA", "ta", 3), ("MIA", "mia", 3),
                      ("gap", "gap", 2), ("relearn", "relearn_steps", 0), ("oracle relearn", "oracle_relearn_steps", 0),
                      ("probe", "probe", 3), ("oracle probe", "oracle_probe", 3), ("retrain s", "retrain_seconds", 2)]
FAMILY_COLUMNS = {"t2i": T2I_COLUMNS, "classifier": CLASSIFIER_COLUMNS}
COST_COLUMNS = ["seconds", "forward_passes", "backward_passes", "edit_bytes"]
LEGENDS = {
    "t2i": "UA: share of images for forgotten prompts the judge does not see as the target (mean over targets so far; "
           "min = worst target). IRA/CRA: judge accuracy on retained prompts in / outside the targets' domains. "
           "FD: Fréchet distance of judge features to renders. supertype acc: share of images for prompts naming a "
           "forgotten concept's supertype (\"a round shape\") that show a member of it (evaluation option supertypes=true). "
           "relearn AUC: the relearning attack's mean share of images "
           "showing each target forgotten so far over its fine-tuning checkpoints (AUC gap: minus the retrain oracle's, "
           "the oracle without everything forgotten so far if one ships, else each target's own). "
           "NLL: bits/dim of renders of the forgotten targets (gap: minus the retrain oracle's) and of retained ones, "
           "through the probability-flow ODE. "
           "Passes: UNet forward / backward calls.",
    "classifier": "UA: 1 - accuracy on all training data forgotten so far (UA test: on forgotten classes' test images). "
                  "RA/TA: accuracy on retained training data / test images of known classes. MIA: share of forget examples "
                  "a confidence-based membership attack calls non-members (0.5: members are no more confident than test images, "
                  "so the attack has no signal). gap: mean |UA, RA, TA, MIA - retrain oracle| in "
                  "points. relearn: optimizer steps on the forget set until 90% accuracy (SGD at 0.01 with momentum 0.9 "
                  "unless the command sets relearn_optimizer / relearn_learning_rate). probe: linear-probe accuracy on "
                  "forgotten classes' test images from penultimate features. Passes: network forward / backward calls.",
}


ATTACK_LEGEND = ("Attack columns: share of images in which the judge sees the step's target after the attack "
                 "(relearn: after its last fine-tuning checkpoint; paraphrase: the best wording found, re-measured; probe: linear-probe accuracy). Base rows show what it "
                 "recovers from a model never made to forget, oracle rows what it gets from one that never learned.")


def _file_safe(spec: str) -> str:
    """A spec as one file name: "meta:steps=2/5" -> "meta@steps-2_5" (a tuple's "/" must not make a folder)."""
    return spec.replace(':', '@').replace('=', '-').replace(',', '+').replace('/', '_')


def _cell_name(sequence: str, method: str, regularizer: str) -> str:
    return f"{sequence}__{_file_safe(method)}__{_file_safe(regularizer) if regularizer else 'none'}"


def split_regularizer_spec(spec: str) -> tuple[RegularizerSpec, ...]:
    """``"gradproj:rank=96+l2sp:weight=100"`` -> both regularizers, applied together in each request."""
    return tuple(RegularizerSpec(*parse_spec(part)) for part in spec.split("+") if part.strip())


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
              model: str | None = None, method_options: dict[str, dict[str, str]] | None = None,
              eval_options: dict | None = None, oracles: Path | None = None, echo=print,
              evaluate: bool = True, attacks: dict[str, dict[str, str]] | None = None,
              executor: Executor = SerialExecutor()) -> list[dict]:
    """``eval_options`` are the fields of the family's evaluation config (EvalConfig or
    ClassifierEvalConfig); ``model`` defaults to the sequence's. Without ``evaluate`` only the
    cost columns are filled (a speed benchmark), and there are no base or oracle rows.
    ``attacks`` ({kind: options}, text-to-image) run after every step on each of its targets.
    ``executor`` runs the cells (``executors``); each cell's file is written as it finishes."""
    if sequence not in SEQUENCES:
        raise ValueError(f"Unknown sequence {sequence!r}; choose one of {', '.join(SEQUENCES)}.")
    spec = SEQUENCES[sequence]
    model = model or spec["model"]
    out, work = Path(out), Path(work)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    references = [("base", ""), ("oracle", "")] if evaluate else []
    cells = references + [(m, r) for m in methods for r in (regularizers or [""])]
    calls, files = [], []
    for method, regularizer in cells:
        cell = _cell_name(sequence, method, regularizer)
        path = out / "cells" / f"{cell}.json"
        if path.is_file():
            echo(f"skip {path.name} (done)")
            continue
        echo(f"run {sequence} / {method} / {regularizer or 'no regularizer'}")
        name, own_options = parse_spec(method)
        options = {**(method_options or {}).get(name, {}), **own_options}
        calls.append((method, regularizer, sequence, spec, work, model, options, eval_options or {}, echo, oracles,
                      evaluate, attacks or {}))
        files.append((cell, path))
    for i, rows in executor.run(_run_cell, calls):
        cell, path = files[i]
        if rows:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rows": rows, "eval_options": eval_options or {}}, indent=2))
            tmp.replace(path)
        # only now may the cell's progress go: a stop before the write resumes from it, not from scratch
        _CellProgress.clear(work / cell)
    return write_tables(out, sequence)


def _run_cell(method, regularizer, sequence, spec, work, model, options, eval_options, echo,
              oracles: Path | None = None, evaluate: bool = True, attacks: dict | None = None) -> list[dict]:
    """Rows of one cell. ``base`` evaluates the unedited model; ``oracle`` the model retrained
    without the forgotten concepts, at the steps where one exists. Classifier
    rows carry their oracle's numbers already, so they have no oracle cell."""
    from .evaluation import evaluator_for
    from .evaluation.attacks import get_attack
    from .models.zoo import find_oracle, load_judge
    attackers = {kind: get_attack(kind).from_options(opts) for kind, opts in (attacks or {}).items()}
    judge = load_judge(eval_options.get("judge", DEFAULT_JUDGE)) if attackers else None
    cell_dir = work / _cell_name(sequence, method, regularizer)
    requests = sequence_requests(sequence)
    fresh = spec["fresh_store_per_request"]
    progress = _CellProgress(cell_dir, {"model": str(model), "options": options, "eval_options": eval_options,
                                        "oracles": str(oracles),
                                        "evaluate": evaluate, "attacks": attacks or {},
                                        "requests": [list(r) for r in requests]})
    rows = progress.rows
    store, forgotten = None, ()
    for step, targets in enumerate(requests, start=1):
        measured = evaluate and (step % spec.get("evaluate_every", 1) == 0 or step == len(requests))
        forgotten = (() if fresh else forgotten) + tuple(targets)
        if step <= progress.done:  # recorded before a stop
            continue
        if store is None or fresh:
            store = _cell_store(cell_dir / f"store-{step if fresh else 1}", model)
            evaluator = evaluator_for(store, eval_options) if evaluate else None
            if method == "oracle" and store.info["kind"] == "classifier":
                return []
        start, outcome_hash = time.time(), None
        if method in ("base", "oracle") and not measured:
            continue
        if method == "base":
            model_now = store.load_model()
            metrics, cost = evaluator(model_now, store, forgotten=forgotten), {}
        elif method == "oracle":
            folder = find_oracle(forgotten, store.language, oracles)
            if folder is None:  # the step has no row; delete the cell to rerun it once the oracle is trained
                echo(f"  no retrain oracle for {', '.join(forgotten)} in {oracles}; that step's oracle row is skipped")
                continue
            model_now = store.family.load(folder).eval()
            metrics, cost = evaluator(model_now, store, forgotten=forgotten), {}
        else:
            state, position = store.state(), 1 if fresh else step
            try:
                if len(state.applied) < position:
                    if not state.pending:  # else the stop came while this step's request was applied
                        store.add_request(list(targets), parse_spec(method)[0], options,
                                          regularizers=split_regularizer_spec(regularizer))
                    with RequestProgress(echo=echo) as bar:
                        outcome = store.apply(evaluator=evaluator if measured else None, on_start=bar.start,
                                              progress=bar.advance)[0]
                else:  # applied before a stop, its row not yet written
                    outcome = store.outcome(state.applied[position - 1])
            except ValueError as error:  # a method's own limit (ErasePro's constraint count): the cell ends here
                echo(f"  step {step}: {Request(tuple(targets), '-').label} refused, the cell stops: {error}")
                break
            metrics, cost, outcome_hash = outcome.metrics, outcome.cost, outcome.model_hash
            model_now = store.load_model() if attackers else None
        prompts = store.prompts() if attackers else None
        attacked = {kind: _attack_success(attack, model_now, judge, prompts, targets) for kind, attack in attackers.items()}
        oracle = metrics.get("oracle", {})
        row = {"sequence": sequence, "method": method, "regularizer": regularizer or "-", "step": step,
               "targets": Request(tuple(targets), "-").label,
               **{key: metrics.get(key) for columns in FAMILY_COLUMNS.values() for _, key, _ in columns},
               "oracle_relearn_steps": oracle.get("relearn_steps"), "oracle_probe": oracle.get("probe"),
               "retrain_seconds": oracle.get("retrain_seconds"), "seconds": cost.get("seconds"),
               "forward_passes": cost.get("unet_forward_passes", cost.get("forward_passes")),
               "backward_passes": cost.get("unet_backward_passes", cost.get("backward_passes")),
               "edit_bytes": cost.get("edit_bytes"), "model_hash": outcome_hash,
               "ua_per_target": _per_target(metrics.get("ua_per_target")),
               "relearn_curves": _relearn_curves(metrics.get("relearn")),
               **{f"attack_{kind}": result["after"] for kind, result in attacked.items()},
               **{f"attack_{kind}_auc": result["auc"] for kind, result in attacked.items() if result["auc"] is not None},
               **({"attack_results": attacked} if attacked else {})}
        rows.append(row)
        shown = FAMILY_COLUMNS[store.info["kind"]]
        echo(f"  step {step} {row['targets']}: " + " ".join(f"{h} {row[k]}" for h, k, _ in shown if row[k] is not None)
             + f" ({time.time() - start:.0f}s)")
        progress.record(step)
    return rows


class _CellProgress:
    """The rows a cell has so far and the last step they cover, in ``progress.json`` beside its
    store, so a stopped cell resumes at the step after. Anything else in the folder (a cell run
    with other settings) is cleared first."""

    FILE = "progress.json"

    def __init__(self, cell_dir: Path, identity: dict):
        self.path, self.identity = cell_dir / self.FILE, json.loads(json.dumps(identity))
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if saved.get("identity") == self.identity:
            self.rows, self.done = saved["rows"], saved["done"]
        else:
            shutil.rmtree(cell_dir, ignore_errors=True)
            self.rows, self.done = [], 0

    def record(self, step: int) -> None:
        self.done = step
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"identity": self.identity, "done": step, "rows": self.rows}))
        tmp.replace(self.path)

    @staticmethod
    def clear(cell_dir: Path) -> None:
        """Once the cell's rows are in its JSON in the output folder: a rerun starts afresh."""
        (cell_dir / _CellProgress.FILE).unlink(missing_ok=True)


def _cell_store(folder: Path, model) -> Store:
    """The cell's store: reopened when a stopped run left one, else created (a half-built one cleared)."""
    if Store.exists(folder):
        return Store(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return Store.init(folder, model)


def _per_target(ua: dict | None) -> str | None:
    """UA of each forgotten target on the training wording, as "striped 1.000; triangle 0.875":
    which concept a sequence lost, where ``ua_min`` says only how far."""
    return "; ".join(f"{target} {splits['train']:.3f}" for target, splits in ua.items()) if ua else None


def _relearn_curves(relearn: dict | None) -> str | None:
    """Each forgotten target's relearning curve beside its oracle's, as
    "striped 0:0.00 5:0.06 10:0.75 (oracle 0:0.00 5:0.06 10:0.38)": the area says how much
    comes back, the curve at which step it does."""
    if not relearn:
        return None

    def points(curve):
        return " ".join(f"{step}:{share:.2f}" for step, share in curve)
    parts = []
    for target, entry in relearn.items():
        oracle = f" (oracle {points(entry['oracle_curve'])})" if "oracle_curve" in entry else ""
        parts.append(f"{target} {points(entry['curve'])}{oracle}")
    return "; ".join(parts)


def _attack_success(attack, model, judge, prompts, targets) -> dict:
    """The attack on each target of a step (mean success), run on the model itself: the base
    row shows what an attack recovers from a model never made to forget, the oracle row what
    it gets from one that never learned."""
    results = [attack.run(model, target, judge, prompts).to_dict() for target in targets]
    return {"after": sum(r["after"] for r in results) / len(results),
            "before": sum(r["before"] for r in results) / len(results), "curves": [r["curve"] for r in results],
            "details": [r["details"] for r in results],
            "auc": None if any(r["details"].get("auc") is None for r in results)
            else sum(r["details"]["auc"] for r in results) / len(results)}


def _attack_keys(rows: list[dict]) -> list[str]:
    """Row keys of the attack columns (``attack_relearn``, ...) that some row has."""
    return sorted({k for r in rows for k in r if k.startswith("attack_") and k != "attack_results"})


def write_tables(out: Path, sequence: str) -> list[dict]:
    rows = []
    for path in sorted((out / "cells").glob(f"{sequence}__*.json")):
        rows.extend(json.loads(path.read_text())["rows"])
    family = _family(sequence)
    keys = [k for _, k, _ in FAMILY_COLUMNS[family]]
    keys += _attack_keys(rows)
    with open(out / f"{sequence}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sequence", "method", "regularizer", "step", "targets", *keys, *COST_COLUMNS,
                                            "ua_per_target", "relearn_curves"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{sequence}.md").write_text(markdown_table(rows, sequence))
    measured = any(r.get(key) is not None for r in rows for key, _ in PLOT_PANELS[family])
    if not SEQUENCES[sequence]["fresh_store_per_request"] and measured:
        write_plot(rows, family, out / f"{sequence}.png", sequence)
    return rows


# What the plot of a sequential benchmark shows per family: (row key, panel title).
PLOT_PANELS = {"t2i": [("ua_min", "UA, worst forgotten concept"), ("ira", "IRA"), ("cra", "CRA"), ("fd", "FD")],
               "classifier": [("ua", "UA"), ("ra", "RA"), ("ta", "TA"), ("gap", "gap to retrain (points)")]}


def write_plot(rows: list[dict], family: str, path: Path, sequence: str) -> None:
    """One line per cell (method + regularizer) over the requests, one panel per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[str, list[dict]] = {}
    for r in rows:
        name = r["method"] if r["regularizer"] == "-" else f"{r['method']} + {r['regularizer']}"
        cells.setdefault(name, []).append(r)
    panels = PLOT_PANELS[family]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    names = sorted(cells)
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))  # distinct up to 20 cells
    for axis, (key, title) in zip(axes, panels):
        for i, name in enumerate(names):
            measured = [r for r in cells[name] if r.get(key) is not None]  # sequences may evaluate every k-th step
            steps, values = [r["step"] for r in measured], [r[key] for r in measured]
            base = name == "base"
            axis.plot(steps, values, marker="os^vD"[i % 5], markersize=3, label=name, linestyle="-" if base else ("-", "--")[i % 2],
                      color="black" if base else colours[i], linewidth=2.5 if base else 1.2)
        axis.set_title(title)
        axis.set_xlabel("request")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{sequence}: {SEQUENCES[sequence]['about']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _family(sequence: str) -> str:
    """The model family a sequence's default model belongs to (its tables' columns)."""
    from .models.zoo import ZOO
    return "classifier" if ZOO[SEQUENCES[sequence]["model"]].kind == "classifier" else "t2i"


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _attack_header(key: str) -> str:
    """``attack_relearn`` -> "relearn attack", ``attack_relearn_auc`` -> "relearn attack AUC"."""
    kind = key[len("attack_"):]
    return f"{kind[:-len('_auc')]} attack AUC" if kind.endswith("_auc") else f"{kind} attack"


def markdown_table(rows: list[dict], sequence: str) -> str:
    spec = SEQUENCES[sequence]
    family = _family(sequence)
    attack_keys = _attack_keys(rows)
    columns = [c for c in FAMILY_COLUMNS[family] if any(r.get(c[1]) is not None for r in rows)]  # what was measured
    columns = columns + [(_attack_header(k), k, 3) for k in attack_keys]
    lines = [f"# Benchmark `{sequence}`: {spec['about']}", "", LEGENDS[family], ""]
    if spec.get("evaluate_every", 1) > 1:  # the steps between evaluations have only their cost, in the CSV
        rows = [r for r in rows if any(r.get(k) is not None for _, k, _ in columns)]
        lines += [f"Rows: the evaluated requests (every {spec['evaluate_every']}th and the last); "
                  f"`{sequence}.csv` has every request's cost.", ""]
    if attack_keys:
        lines += [ATTACK_LEGEND, ""]
    header = ["method", "regularizer", "step", "targets", *(h for h, _, _ in columns), "seconds", "passes f/b"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        passes = f"{r['forward_passes']}/{r['backward_passes']}" if r.get("forward_passes") is not None else "-"
        cells = [r["method"], r["regularizer"], str(r["step"]), r["targets"], *(_fmt(r.get(k), d) for _, k, d in columns),
                 _fmt(r["seconds"], 2), passes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _best_paraphrases(rows)) + "\n"


def _best_paraphrases(rows: list[dict]) -> list[str]:
    """The wording the paraphrase attack found strongest for each row's target, if it ran."""
    found = [(r, d["best_prompts"][0]) for r in rows
             for d in r.get("attack_results", {}).get("paraphrase", {}).get("details", []) if d.get("best_prompts")]
    if not found:
        return []
    lines = ["", "Paraphrase attack: the strongest wording found per row (its success re-measured on fresh rows and noise).", "",
             "| method | regularizer | step | targets | wording | success |", "|---|---|---|---|---|---|"]
    return lines + [f"| {r['method']} | {r['regularizer']} | {r['step']} | {r['targets']} | {best['prompt']} | {best['measured']:.3f} |"
                    for r, best in found]


# ------------------------------------------------------------------ samplers
def sampler_benchmark(model_name: str, solvers: list[str], step_counts: list[int], out: Path, n_prompts: int = 40,
                      images_per_prompt: int = 4, inversion_images: int = 16, echo=print) -> str:
    """Judge accuracy and FD of ``model_name`` per solver and step count (training prompts), the
    UNet evaluations and seconds each took, and O-BELM's inversion round-trip error; writes
    ``out/MODEL.md`` and returns the table."""
    import torch
    from .evaluation.quality import judge_t2i
    from .models.zoo import load_judge, load_t2i
    from .world import render, sample_scenes
    model, judge = load_t2i(model_name), load_judge()
    scenes = sample_scenes(inversion_images, seed=7)
    renders, texts = torch.from_numpy(render(scenes)), [f"a {caption}" for caption in scenes.captions()]
    lines = [f"# Samplers on `{model_name}`", "",
             f"Judge accuracy per domain on {n_prompts} training prompts x {images_per_prompt} images, FD to renders "
             "(judge features), UNet evaluations per image (two per step: classifier-free guidance) and seconds on "
             f"this machine. Round trip: the largest pixel error after O-BELM inverts {inversion_images} renders "
             "and regenerates them.", "",
             "| solver | steps | shape | colour | texture | FD | UNet evals | seconds | round trip |", "|---|---|---|---|---|---|---|---|---|"]
    for solver in solvers:
        for steps in step_counts:
            quality = judge_t2i(model, judge, n_prompts, images_per_prompt, splits=("train",), steps=steps, solver=solver)
            round_trip = "-"
            if solver == "o-belm":
                regenerated = model.regenerate(model.invert(renders, texts, steps), texts, steps)
                round_trip = f"{float((regenerated - renders).abs().max()):.1e}"
            train = quality["train"]
            lines.append(f"| {solver} | {steps} | {train['shape']:.3f} | {train['colour']:.3f} | {train['texture']:.3f} | "
                         f"{train['fd']:.2f} | {2 * steps} | {quality['seconds']:.1f} | {round_trip} |")
            echo(lines[-1])
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{Path(model_name).name}.md").write_text(table)
    return table


def fisher_speed(model_name: str, out: Path, batch: int = 4, repeats: int = 5) -> str:
    """Milliseconds per diffusion-Fisher vector product on ``model_name``: forward mode (one
    tangent-carrying pass, ``models.fisher``) against autodiff's reverse over reverse; writes
    ``out/fisher.md``."""
    import torch
    from .models.fisher import fisher_vector_product, forward_mode_attention
    from .models.zoo import load_t2i
    model = load_t2i(model_name)
    encoding, t, sigma = model.encode(["a striped red triangle"] * batch), torch.full((batch,), 500), 0.5
    shape = (batch, model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    x, v = torch.randn(shape, generator=torch.Generator().manual_seed(0)), torch.randn(shape, generator=torch.Generator().manual_seed(1))
    eps_fn = lambda x: model.predict(x, t, encoding)  # noqa: E731
    ways = {"forward mode (ours)": lambda: fisher_vector_product(eps_fn, x, v, sigma),
            "central difference (ours)": lambda: fisher_vector_product(eps_fn, x, v, sigma, "difference"),
            "autodiff, reverse over reverse": lambda: torch.autograd.functional.jvp(eps_fn, x, v)[1] / sigma,
            "one plain forward pass (for scale)": lambda: torch.no_grad()(eps_fn)(x)}
    seconds = dict.fromkeys(ways, 0.0)
    with forward_mode_attention(model.unet):
        for name, run in ways.items():
            run()  # warm up
        for _ in range(repeats):  # round robin, so a busy machine slows every way alike
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                seconds[name] += (time.perf_counter() - start) / repeats
    ours = seconds["forward mode (ours)"]
    lines = [f"# Diffusion-Fisher vector products on `{model_name}`", "",
             f"Batch of {batch}, {repeats} rounds (the ways in turn), same attention kernel for all, no autograd graph "
             "kept; ratio = time / forward mode.", "",
             "| way | ms per product | ratio |", "|---|---|---|"]
    lines += [f"| {name} | {1000 * s:.1f} | {s / ours:.2f} |" for name, s in seconds.items()]
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fisher.md").write_text(table)
    return table


def heldout_words_benchmark(model_names: list[str], out: Path, echo=print) -> str:
    """Each world model's judge accuracy on held-out synonyms (its shipped quality numbers) beside
    what its frozen text encoder carries about those words (``heldout_word_readout`` in its
    language); writes ``out/heldout-words.md`` and returns the table."""
    from .evaluation.lexical import heldout_word_readout
    from .evaluation.quality import model_language
    from .models.zoo import load_t2i, zoo_entry
    from .world import DEFAULT_ONTOLOGY
    lines = ["# Held-out synonyms: the model against its text encoder", "",
             "`model`: the judge's accuracy on the model's held-out-synonym prompts (its shipped quality numbers). "
             "`readout`: how often an MLP reading the frozen encoder's token states of a word, trained on every word "
             "the model's language knows, names a held-out word's concept (`obliviate.evaluation.lexical`; 16 fresh "
             "prompts a word, three probes averaged). A readout below a target says the encoder, not the training "
             "recipe, is what stands in the way.", "",
             "| model | language | shape: model / readout | colour: model / readout | texture: model / readout |",
             "|---|---|---|---|---|"]
    per_word = {}
    for name in model_names:
        model = load_t2i(name)
        lang = model_language(model)
        readout = heldout_word_readout(model.text_encoder, lang)
        shipped = json.loads((zoo_entry(name).path / "quality.json").read_text()).get("heldout_synonym", {})
        cells = [f"{shipped[d]:.3f} / {readout.per_domain[d]:.3f}" if d in shipped else f"- / {readout.per_domain[d]:.3f}"
                 for d in DEFAULT_ONTOLOGY.domains]
        lines.append(f"| {name} | {lang.name} | " + " | ".join(cells) + " |")
        echo(lines[-1])
        per_word[name] = (shipped.get("per_concept", {}), readout.per_word)
    lines += ["", "One by one:", "", "| concept | held-out word | " + " | ".join(f"{n}: model / readout" for n in model_names) + " |",
              "|---|---|" + "---|" * len(model_names)]
    for concept in DEFAULT_ONTOLOGY.concepts:
        for word in concept.heldout_synonyms:
            cells = [(f"{drawn[concept.name]:.2f}" if concept.name in drawn else "-") + f" / {read[word]:.2f}"
                     for drawn, read in per_word.values()]
            lines.append(f"| {concept.name} | {word} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout-words.md").write_text(table)
    return table
