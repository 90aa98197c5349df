"""The ``obliviate`` command line: argument parsing and printing only; the work is in the library.

Every failure leaves through one door (``Commands.invoke``): the library's refusals print their
message and exit with code 2, a bug prints one line asking for a report and exits with code 70,
and ``--debug`` shows the traceback instead. ``verify`` exits with 1 when it finds problems.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .errors import USER_ERRORS
from .models.zoo import DEFAULT_JUDGE, DEFAULT_T2I

USAGE_ERROR, INTERNAL_ERROR = 2, 70  # 70: EX_SOFTWARE in sysexits.h


class Commands(TyperGroup):
    """Runs a command and turns any exception it raises into a message and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
            raise  # typer prints these itself, with the usage line where it helps
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            if isinstance(error, USER_ERRORS):
                typer.echo(f"error: {error}", err=True)
                raise typer.Exit(USAGE_ERROR) from None
            where = traceback.extract_tb(error.__traceback__)[-1]
            typer.echo(f"internal error: {type(error).__name__}: {error} (at {Path(where.filename).name}:{where.lineno}). "
                       "This is a bug in obliviate; rerun with --debug and report the traceback.", err=True)
            raise typer.Exit(INTERNAL_ERROR) from None


app = typer.Typer(help="Continual unlearning for text-to-image diffusion models and classifiers.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=Commands)
world_app = typer.Typer(help="The embedded concept world.", no_args_is_help=True)
zoo_app = typer.Typer(help="Models that ship with obliviate.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(zoo_app, name="zoo")
request_app = typer.Typer(help="Deletion requests of a store.", no_args_is_help=True)
app.add_typer(request_app, name="request")
console = Console()


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="Show the traceback when a command fails.")) -> None:
    """Continual unlearning for text-to-image diffusion models and classifiers."""


def _number_between(low: float, high: float):
    """A typer callback for a float option (typer's own range check lets NaN through)."""
    def check(value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise typer.BadParameter(f"{value} is not a number from {low:g} to {high:g}.")
        return value
    return check


SEED = dict(min=0, max=2**32 - 1, help="Random seed, 0 to 2^32-1.")
WAIT = dict(callback=_number_between(0, 86400), help="Seconds to wait for a busy store (up to a day).")


def _sequence_names() -> list[str]:
    from .bench import SEQUENCES
    return list(SEQUENCES)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(x) for x in row])
    console.print(table)


@app.command()
def env() -> None:
    """Print the versions that matter for a bug report."""
    from .environment import environment_report
    for key, value in environment_report().items():
        typer.echo(f"{key}: {value}")


# ------------------------------------------------------------------ world
@world_app.command("render")
def world_render(out: Path = typer.Option(Path("world.png"), help="PNG file to write."),
                 n: int = typer.Option(32, min=1, max=4096, help="Number of scenes."),
                 seed: int = typer.Option(0, **SEED)) -> None:
    """Render a labelled grid of random scenes."""
    import torch
    from .viz import image_grid
    from .world import render, sample_scenes
    scenes = sample_scenes(n, seed)
    image_grid(torch.from_numpy(render(scenes)), scenes.captions(), columns=8, scale=4).save(out)
    typer.echo(f"wrote {out}")


@world_app.command("concepts")
def world_concepts() -> None:
    """List every concept with its domain, supertype and synonyms."""
    from .world import DEFAULT_ONTOLOGY
    _table("concepts", ["domain", "concept", "supertype", "training synonyms", "held-out synonyms"],
           [[c.domain, c.name, c.parent, ", ".join(c.train_synonyms), ", ".join(c.heldout_synonyms)]
            for c in DEFAULT_ONTOLOGY.concepts])


# ------------------------------------------------------------------ zoo
@zoo_app.command("list")
def zoo_list() -> None:
    """List the shipped models."""
    from .models.zoo import ZOO
    _table("zoo", ["name", "kind", "weights", "description"],
           [[e.name, e.kind, "yes" if e.available else "no", e.description] for e in ZOO.values()])


@zoo_app.command("train")
def zoo_train(name: str = typer.Argument(..., help="A zoo name (`obliviate zoo list`)."),
              out: Path = typer.Option(None, help="Run folder (default runs/NAME); resumes if it holds a run."),
              steps: Optional[int] = typer.Option(None, help="Override the recipe's step count (epochs for classifiers)."),
              exclude: List[str] = typer.Option([], help="Concepts to leave out of the data: trains the retrain "
                                                         "oracle for them (shapes-t2i models; repeatable)."),
              oracles: Path = typer.Option(Path("runs/oracles"), help="Where oracles go when --exclude is given."),
              seed: int = typer.Option(0, **SEED)) -> None:
    """Train a zoo model from its recipe (resumable for shapes-t2i)."""
    import dataclasses
    from .classifiers.train import ZOO_RECIPES, train_classifier
    from .models.judge import JUDGE_RECIPES, train_judge
    from .models.train_t2i import T2I_RECIPES, train_t2i
    from .models.zoo import oracle_key
    out = out or (oracles / oracle_key(exclude) if exclude else Path("runs") / name)
    if name in T2I_RECIPES:
        from .world import DEFAULT_ONTOLOGY
        excluded = tuple(c.name for term in exclude for c in DEFAULT_ONTOLOGY.resolve(term))
        recipe = dataclasses.replace(T2I_RECIPES[name], seed=seed, exclude=excluded, **({"steps": steps} if steps else {}))
        train_t2i(recipe, out)
        typer.echo(f"model written to {out / 'model'}")
    elif name in JUDGE_RECIPES:
        judge, card = train_judge(dataclasses.replace(JUDGE_RECIPES[name], seed=seed, **({"steps": steps} if steps else {})))
        judge.save(out, card)
        typer.echo(f"judge written to {out}")
    elif name in ZOO_RECIPES:
        recipe = dataclasses.replace(ZOO_RECIPES[name], seed=seed, **({"epochs": steps} if steps else {}))
        train_classifier(recipe, exclude=tuple(exclude), log=typer.echo).save(out / "model")
        typer.echo(f"model written to {out / 'model'}")
    else:
        raise typer.BadParameter(f"no recipe for {name!r}; choose one of {', '.join([*T2I_RECIPES, *JUDGE_RECIPES, *ZOO_RECIPES])}")


@zoo_app.command("install")
def zoo_install(name: str = typer.Argument(..., help="A zoo name (`obliviate zoo list`)."),
                run: Path = typer.Option(..., help="The run folder `zoo train` wrote."),
                compare: Optional[str] = typer.Option(None, help="A text-to-image zoo model put beside it in the card, "
                                                                 "judged the same way (its shipped numbers when they were)."),
                images_per_prompt: int = typer.Option(16, min=1, help="Images per prompt when judging a text-to-image model.")) -> None:
    """Copy a trained run into the package's weights and write its model card (with quality numbers); a
    `--exclude` run of shapes-t2i goes to the shipped retrain oracles."""
    from . import cards as card
    from .models.zoo import ZOO
    excluded = _excluded_concepts(run) if name in ZOO and ZOO[name].kind == "t2i" else ()
    if name in ZOO and ZOO[name].kind == "classifier":
        typer.echo(f"installed {card.install_classifier(name, run)}")
    elif name in ZOO and ZOO[name].kind == "judge":
        typer.echo(f"installed {card.install_judge(name, run)}")
    elif excluded:  # a shapes-t2i retrain oracle: evaluated beside the base model on the same prompts
        from .evaluation.evaluator import EvalConfig, Evaluator
        from .models.t2i import T2IModel
        from .models.zoo import load_judge, load_t2i
        evaluator = Evaluator(load_judge(), EvalConfig(forget_prompts=8, images_per_prompt=4, ua_splits="train"))
        oracle, base = (evaluator.evaluate(m, excluded) for m in (T2IModel.load(run / "model"), load_t2i(name)))
        typer.echo(f"installed retrain oracle {card.install_oracle(name, run, oracle, base)}")
    elif name in ZOO and ZOO[name].kind == "t2i":
        from .evaluation.quality import judge_t2i
        from .models.t2i import T2IModel
        from .models.zoo import load_judge
        judge = load_judge()
        quality = judge_t2i(T2IModel.load(run / "model"), judge, images_per_prompt=images_per_prompt)
        _print_quality(quality)
        comparison = {**_shipped_or_judged(compare, quality, judge), "model": compare} if compare else None
        typer.echo(f"installed {card.install_t2i(name, run, quality, comparison)}")
    else:
        raise typer.BadParameter(f"no zoo model {name!r}; `obliviate zoo list` shows them")


def _shipped_or_judged(name: str, like: dict, judge) -> dict:
    """Zoo model ``name``'s shipped quality numbers if they were measured as ``like`` was, else
    ``name`` judged afresh that way."""
    from .evaluation.quality import judge_t2i
    from .models.zoo import load_t2i, zoo_entry
    shipped_file = zoo_entry(name).path / "quality.json"
    shipped = json.loads(shipped_file.read_text()) if shipped_file.is_file() else {}
    if all(shipped.get(k) == like[k] for k in ("n_prompts", "images_per_prompt", "sampler", "guidance_scale")):
        return shipped
    return judge_t2i(load_t2i(name), judge, like["n_prompts"], like["images_per_prompt"])


def _excluded_concepts(run: Path) -> tuple[str, ...]:
    """What a shapes-t2i run left out of its data (non-empty for a retrain oracle)."""
    return tuple(json.loads((run / "train_state.json").read_text())["recipe"].get("exclude", ()))


# ------------------------------------------------------------------ models
@app.command()
def sample(model: str = typer.Argument(..., help="Zoo name, model folder or store."),
           prompt: List[str] = typer.Argument(..., help="One or more prompts."),
           n: int = typer.Option(8, min=1, max=256, help="Images per prompt."),
           out: Path = typer.Option(Path("samples.png"), dir_okay=False, help="PNG file to write."),
           steps: int = typer.Option(25, min=1, max=1000, help="Sampling steps."),
           solver: str = typer.Option("ddim", help="ddim, dpm or o-belm (exactly invertible)."),
           guidance: Optional[float] = typer.Option(None, callback=_number_between(0, 100),
                                                    help="Classifier-free guidance scale."),
           seed: int = typer.Option(0, **SEED)) -> None:
    """Generate images for prompts and save them as a captioned grid."""
    from .viz import image_grid
    t2i = _load_t2i_or_store(model)
    prompts = [p for p in prompt for _ in range(n)]
    images = t2i.sample(prompts, steps=steps, guidance_scale=guidance, seed=seed, solver=solver)
    image_grid(images, prompts, columns=n, scale=3).save(out)
    typer.echo(f"wrote {out}")


def _load_t2i_or_store(name: str):
    """A store's current model (after verification), a zoo model, or a model folder."""
    from .engine.store import STORE_FILE, Store
    from .models.zoo import load_t2i
    if (Path(name) / STORE_FILE).is_file():
        store = Store(name)
        if store.info["kind"] != "t2i":
            raise ValueError(f"{name} holds a {store.info['kind']} model; `sample` draws images from text-to-image models.")
        return store.load_model(check=True)
    return load_t2i(name)


@app.command()
def judge(model: str = typer.Argument(DEFAULT_T2I, help="Zoo name or model folder."),
          judge_model: str = typer.Option(DEFAULT_JUDGE, "--judge", help="Zoo name or folder of the attribute judge."),
          prompts: int = typer.Option(40, help="Prompts per split, covering every concept."),
          images_per_prompt: int = typer.Option(16),
          steps: int = typer.Option(20), solver: str = typer.Option("dpm"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Judge a text-to-image model: per-domain accuracy on each prompt split, FD to renders."""
    from .evaluation.quality import judge_t2i
    from .models.zoo import load_judge, load_t2i
    result = judge_t2i(load_t2i(model), load_judge(judge_model), prompts, images_per_prompt, steps=steps, solver=solver)
    if as_json:
        _print_json(result)
    else:
        _print_quality(result)


def _print_quality(result: dict) -> None:
    from .world import DOMAINS, SPLITS
    _table(f"judge accuracy ({result['n_prompts']} prompts x {result['images_per_prompt']} images, {result['sampler']})",
           ["split", *DOMAINS, "FD"], [[s, *[f"{result[s][d]:.3f}" for d in DOMAINS], result[s]["fd"]] for s in SPLITS if s in result])


@app.command()
def demo(out: Path = typer.Option(Path("demo-output")), quick: bool = typer.Option(False, help="Fewer images.")) -> None:
    """The main job on the embedded world: real vs generated images and the judge's table."""
    from .demo import run_demo
    run_demo(out, quick=quick, echo=typer.echo, print_quality=_print_quality,
             print_status=lambda store: status(store, as_json=False))


# ------------------------------------------------------------------ the continual engine
@app.command()
def init(store: Path = typer.Argument(..., help="New store folder."),
         model: str = typer.Option(DEFAULT_T2I, help="Zoo name or model folder (obliviate, diffusers or a classifier)."),
         retain: List[str] = typer.Option([], help="Concepts to protect (Stable Diffusion stores; repeatable)."),
         evaluate: bool = typer.Option(False, help="Evaluate after every applied request (a Stable Diffusion store "
                                                    "needs a CLIP judge: --eval-set judge=FOLDER)."),
         set_: List[str] = typer.Option([], "--eval-set", help="Evaluation option key=value (repeatable), "
                                                                 "e.g. images_per_prompt=2 or oracle=false.")) -> None:
    """Create a store: the base model and an empty request ledger."""
    from .config import parse_assignments
    from .engine import Store
    options = parse_assignments(set_)
    if options.get("judge") and Path(options["judge"]).is_dir():  # later commands may run from another folder
        options["judge"] = str(Path(options["judge"]).resolve())
    from .evaluation import evaluator_for
    s = Store.init(store, model, tuple(retain), options if evaluate else None,  # a bad option fails now, not at apply
                   check=(lambda new: evaluator_for(new, new.info["evaluation"])) if evaluate else None)
    typer.echo(f"created {s.info['kind']} store {s.root} from {model} (model {s.state().model_event.model_hash[:12]})")


@app.command("methods")
def methods_list() -> None:
    """List the unlearning methods and regularizers."""
    from .methods import list_methods
    from .regularizers import REGULARIZERS
    _table("text-to-image methods", ["name", "description"], [[k, v] for k, v in list_methods("t2i").items()])
    _table("classifier methods", ["name", "description"], [[k, v] for k, v in list_methods("classifier").items()])
    _table("regularizers", ["name", "description"], [[k, c.description] for k, c in REGULARIZERS.items()])


@request_app.command("add")
def request_add(store: Path = typer.Argument(...),
                concepts: List[str] = typer.Argument(None, help="What to forget: concepts, supertypes or combinations; "
                                                               "for a classifier, class names or sample:INDEX."),
                method: str = typer.Option("esd", help="Unlearning method (`obliviate methods`)."),
                anchor: Optional[str] = typer.Option(None, help="What the targets should become instead."),
                set_: List[str] = typer.Option([], "--set", help="Method option key=value (repeatable)."),
                regularizer: List[str] = typer.Option([], help="NAME or NAME:key=value,key=value (repeatable)."),
                samples: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, readable=True,
                                                       help="Classifier stores: a file of training-sample indices "
                                                                    "to forget (whitespace or comma separated)."),
                seed: int = typer.Option(0, **SEED),
                no_limits: bool = typer.Option(False, "--no-limits", help="Accept step counts and sizes above the "
                                                                           "limits that catch typos."),
                wait: float = typer.Option(0.0, **WAIT)) -> None:
    """Record a pending deletion request (validated now, applied by `obliviate apply`)."""
    from .config import parse_assignments, parse_spec
    from .engine import RegularizerSpec, Store
    concepts = list(concepts or [])
    if samples is not None:
        words = samples.read_text().replace(",", " ").split()
        bad = [w for w in words if not w.isdigit()]
        if bad:
            raise typer.BadParameter(f"{samples} holds {bad[0]!r}, not a sample index; write non-negative integers.")
        concepts += [f"sample:{w}" for w in words]
    if not concepts:
        raise typer.BadParameter("Name what to forget: concepts (or classes) as arguments, or --samples FILE.")
    regs = []
    for spec in regularizer:
        regs.append(RegularizerSpec(*parse_spec(spec)))
    rid = Store(store).add_request(concepts, method, parse_assignments(set_), anchor, tuple(regs), seed, wait=wait,
                                   limits=not no_limits)
    what = " + ".join(concepts) if len(concepts) <= 6 else f"{len(concepts)} targets ({', '.join(concepts[:3])}, ...)"
    typer.echo(f"request {rid} added (pending): forget {what} with {method}")


@app.command()
def apply(store: Path = typer.Argument(...), wait: float = typer.Option(0.0, **WAIT),
          evaluate: Optional[bool] = typer.Option(None, help="Evaluate after each request (UA/IRA/CRA/FD); "
                                                             "default: as configured at init."),
          limit: Optional[int] = typer.Option(None, min=1, help="Apply at most this many pending requests.")) -> None:
    """Apply pending requests in order; each is all-or-nothing."""
    from .engine import Store
    from .evaluation import evaluator_for
    from .progress import RequestProgress
    s = Store(store)
    configured = s.info.get("evaluation")
    enabled = evaluate if evaluate is not None else configured is not None
    evaluator = evaluator_for(s, configured) if enabled else None
    with RequestProgress(echo=typer.echo) as progress:
        outcomes = s.apply(evaluator=evaluator, wait=wait, on_start=progress.start, progress=progress.advance, limit=limit)
    for o in outcomes:
        typer.echo(f"  request {o.request_id}: {o.cost['seconds']:.1f}s, "
                   f"{_passes(o.cost)} forward / backward passes, "
                   f"model {o.model_hash[:12]}" + (f", metrics {json.dumps(o.metrics)}" if o.metrics else ""))
    if not outcomes:
        typer.echo("nothing pending")


def _passes(cost: dict) -> str:
    """Forward/backward passes: UNet calls for diffusion, network calls for classifiers."""
    forward = cost.get("unet_forward_passes", cost.get("forward_passes", 0))
    return f"{forward} / {cost.get('unet_backward_passes', cost.get('backward_passes', 0))}"


@app.command()
def status(store: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """The ledger: requests, their state, costs and metrics, and the current model hash."""
    from .engine import Store
    info = Store(store).status()
    if as_json:
        _print_json(info)
        return
    typer.echo(f"store {info['store']} ({info['model_source']}), model {info['model_hash'][:12]}")
    typer.echo(f"ledger head {info['ledger_head']}" + (" (signed)" if info["signed"] else "")
               + ": keep it outside the store; `obliviate verify STORE --expect HEAD` proves history since is unchanged")
    rows = []
    for r in info["requests"]:
        cost = r["cost"] or {}
        metrics = r["metrics"] or {}
        rows.append([r["id"], r["label"], r["method"], ",".join(r["regularizers"]) or "-", r["status"],
                     (r["model_hash"] or "")[:12], f"{cost['seconds']:.1f}" if cost else "",
                     " ".join(f"{k}={metrics[k]:.3f}" for k in ("ua", "ira", "cra", "fd", "ra", "ta", "mia", "gap")
                              if metrics.get(k) is not None), _adapter_note(cost)])
    _table("requests", ["id", "forget", "method", "regularizers", "status", "model", "seconds", "metrics", "adapter"], rows)


def _adapter_note(cost: dict) -> str:
    """An adapter method's group (and LW2G's decision with its angles) from a ledger row's cost."""
    if "group" not in cost:
        return ""
    note = f"{cost['group']} rank {cost['group_rank']}"
    if "decision" in cost:
        angles = ", ".join(f"{g} {a:.1f}" for g, a in cost["hfc"].items()) or "no groups"
        note += f"; {cost['decision']} (HFC {angles}; threshold {cost['hfc_threshold']:.1f})"
    return note


@app.command()
def rollback(store: Path = typer.Argument(...), to: int = typer.Option(..., min=0, help="Request id to return to (0 = base)."),
             wait: float = typer.Option(0.0, **WAIT)) -> None:
    """Return to the model exactly as it was after request N."""
    from .engine import Store
    digest = Store(store).rollback(to, wait=wait)
    typer.echo(f"rolled back to request {to}; model {digest[:12]}")


@app.command()
def verify(store: Path = typer.Argument(...), quick: bool = typer.Option(False, help="Skip replaying the edits."),
           expect: Optional[str] = typer.Option(None, help="A ledger head `obliviate status` printed earlier (SEQ:HASH); "
                                                           "it must still be in the history.")) -> None:
    """Re-hash the ledger, every file of the store and the weights; report every mismatch. With
    OBLIVIATE_LEDGER_KEY (or _FILE) set, every ledger row's signature is checked too."""
    from .engine import Head, Store
    s = Store(store)
    problems = s.verify(replay=not quick, expect=Head.parse(expect) if expect else None, cached=False)
    if problems:
        for p in problems:
            typer.echo(f"FAIL {p}")
        raise typer.Exit(1)
    checked = ["ledger chain"] + (["signatures"] if s.key else []) + (["expected head"] if expect else [])
    typer.echo(f"ok: {', '.join(checked)}, store.json, base model files, edits, state and current weights match"
               + ("" if s.key or expect else " (without a key or an expected head, a rewritten and rechained "
                                               "history would pass too)"))


def _write_misses(judged: dict, folder: Path, suffix: str = "") -> None:
    from .viz import image_grid
    folder.mkdir(parents=True, exist_ok=True)
    for target, (images, prompts) in judged.items():
        path = folder / f"{target.replace(' ', '-')}{suffix}.png"
        if len(images):
            image_grid(images.clamp(0, 1), prompts, columns=6, scale=4, caption_height=14).save(path)
        where = f", in {path}" if len(images) else ""
        # on stderr: stdout may be --json's
        typer.echo(f"{target}{suffix}: {len(images)} image(s) judged to show it{where}", err=True)


@app.command("eval")
def eval_store(store: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json"),
               set_: List[str] = typer.Option([], "--set", help="Evaluation option key=value (repeatable), e.g. "
                                                                  "images_per_prompt=2, steps=20; judge=CLIP_FOLDER for "
                                                                  "Stable Diffusion; oracle=false for classifiers."),
               record: bool = typer.Option(True, help="Append the result to the ledger."),
               base: bool = typer.Option(False, "--base", help="Also evaluate the base model on the same prompts "
                                                               "(JSON: under the key 'base')."),
               likelihood: bool = typer.Option(False, "--likelihood", help="Also the bits/dim of forgotten and retained "
                                                                           "renders, beside the oracle's (text-to-image)."),
               misses: Optional[Path] = typer.Option(None, "--misses", file_okay=False,
                                                     help="Also write FOLDER/<concept>.png per forgotten concept: the "
                                                          "images UA counts as still showing it, with their prompts, to "
                                                          "check the judge's calls by eye (embedded world); with "
                                                          "short_prompts=true also <concept>-short.png.")) -> None:
    """Evaluate the store's current model: UA (per forgotten target), IRA, CRA, FD for text-to-image;
    UA, RA, TA, MIA and the gap to the retrain oracle for classifiers."""
    from .config import parse_assignments
    from .engine import Store
    from .evaluation import evaluator_for
    s = Store(store)
    options = {**(s.info.get("evaluation") or {}), **parse_assignments(set_)}
    if likelihood:
        options.setdefault("likelihood_steps", "50")
    evaluator = evaluator_for(s, options)
    if misses is not None and not hasattr(evaluator, "judged_as_target"):
        raise typer.BadParameter("--misses needs the embedded world's attribute judge; this store is judged otherwise. "
                                 "Leave --misses out.")
    metrics = s.evaluate(evaluator, record=record)
    if misses is not None:
        model, forgotten = s.load_model(), s.forgotten()
        _write_misses(evaluator.judged_as_target(model, forgotten), misses)
        if evaluator.config.short_prompts:
            _write_misses(evaluator.judged_as_target(model, forgotten, short=True), misses, suffix="-short")
    base_metrics = evaluator(s.base_model(), s, forgotten=s.forgotten()) if base else None
    if as_json:
        _print_json({**metrics, "base": base_metrics} if base else metrics)
        return
    shown = ("ua", "ua_train_synonym", "ua_heldout_template", "ua_heldout_synonym", "ua_short", "ira", "cra", "fd", "unasked", "unnamed", "supertype_accuracy", "clip_score",
             "clip_score_forgotten", "ua_test", "ra", "ta", "mia",
             "relearn_steps", "probe", "gap", "relearn_auc", "relearn_auc_gap", "nll_forgotten", "nll_forgotten_gap",
             "nll_retained")
    rows = [[k, metrics[k], *([base_metrics.get(k)] if base else [])] for k in shown if metrics.get(k) is not None]
    _table("evaluation of the current model", ["metric", "value", *(["base model"] if base else [])], rows)
    intervals = metrics.get("ua_interval_per_target") or {}
    for target, per_split in metrics.get("ua_per_target", {}).items():
        interval = (f" (train: 95% interval {intervals[target][0]:.3f}-{intervals[target][1]:.3f} over "
                    f"{metrics['ua_images']} images)" if target in intervals else "")
        typer.echo(f"UA {target}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_split.items()) + interval)
    for supertype, judged in metrics.get("supertype", {}).items():
        typer.echo(f"supertype {supertype}: {judged['accuracy']:.3f} of {judged['images']} images show a member, "
                   f"{judged['forgotten_share']:.3f} a forgotten one")
    for target, nll in metrics.get("nll", {}).items():
        oracle = f", retrain oracle {nll['oracle_bits_per_dim']:.3f}" if "oracle_bits_per_dim" in nll else ", no oracle"
        typer.echo(f"likelihood of {target} renders: {nll['bits_per_dim']:.3f} bits/dim{oracle}")
    for target, relearn in metrics.get("relearn", {}).items():
        oracle = f", retrain oracle {relearn['oracle_auc']:.3f} (gap {relearn['gap']:+.3f})" if "gap" in relearn else ", no oracle"
        typer.echo(f"relearnability {target}: AUC {relearn['auc']:.3f} over steps {[s for s, _ in relearn['curve']]}{oracle}")


@app.command()
def attack(store: Path = typer.Argument(...), concept: str = typer.Argument(..., help="A (forgotten) concept."),
           kind: str = typer.Option("relearn", help="relearn, resurgence, prompt, paraphrase, inversion, regenerate, completion, noise or probe."),
           set_: List[str] = typer.Option([], "--set", help="Attack option key=value (repeatable)."),
           oracles: Path = typer.Option(Path("runs/oracles"), help="Retrain oracles (`zoo train shapes-t2i-v2 --exclude`); "
                                                                   "the attack also runs on one that never saw the concept."),
           as_json: bool = typer.Option(False, "--json"), seed: int = typer.Option(0, **SEED)) -> None:
    """Try to bring a concept back; reports how often the judge sees it before and after."""
    from .config import parse_assignments
    from .engine import Store
    from .evaluation.attacks import get_attack
    from .models.zoo import load_judge
    attack_obj = get_attack(kind).from_options(parse_assignments(set_))
    result = Store(store).attack(attack_obj, concept, load_judge(), seed=seed, oracles_dir=oracles)
    if as_json:
        _print_json(result.to_dict())
        return
    for name, res in [("model", result)] + ([(f"retrain oracle {result.oracle.details['model']}", result.oracle)]
                                              if result.oracle else []):
        typer.echo(f"{kind} attack on {concept!r}, {name}: judge sees it in {res.before:.1%} of images before, "
                   f"{res.after:.1%} after")
        for best in res.details.get("best_prompts", []):
            typer.echo(f"  {best['measured']:.1%} with {best['prompt']!r} (screened at {best['screened']:.1%})")
        if "best_prompts" not in res.details:
            for steps, rate in res.curve:
                typer.echo(f"  {steps} {attack_obj.curve_axis}: {rate:.1%}")
        if res.auc is not None:
            typer.echo(f"  area under the curve (mean success): {res.auc:.1%}")
    if result.auc_gap is not None:
        typer.echo(f"area gap to the retrain oracle: {100 * result.auc_gap:+.1f} points")
    if result.oracle is None:
        typer.echo(f"(no retrain oracle for {concept!r} in {oracles}: `obliviate zoo train shapes-t2i-v2 --exclude {concept}` "
                   "trains one to compare with)")


@app.command()
def report(store: Path = typer.Argument(...), out: Path = typer.Option(Path("report.html"))) -> None:
    """Write a self-contained HTML report (plus PNG plots beside it)."""
    from .engine import Store
    from .report import write_report
    typer.echo(f"wrote {write_report(Store(store), out)}")


@app.command()
def export(store: Path = typer.Argument(...), out: Path = typer.Argument(..., help="New folder."),
           format: str = typer.Option("diffusers", "--format", help="diffusers (the whole model) or lora (the change to "
                                                                    "the base UNet, for load_lora_weights)."),
           rank: Optional[int] = typer.Option(None, min=1, max=4096, help="LoRA rank (default: exact, the delta's own rank).")) -> None:
    """Write the current model as a diffusers-loadable folder, or its change as a LoRA file."""
    from .engine import Store
    if format == "diffusers":
        typer.echo(f"exported to {Store(store).export(out)}")
    elif format == "lora":
        result = Store(store).export_lora(out, rank)
        typer.echo(f"exported {result['tensors']} LoRA pairs ({result['bytes'] / 2**20:.2f} MiB) to {result['path']}; "
                   f"largest relative reconstruction error {result['max_relative_error']:.2e}")
    else:
        raise typer.BadParameter(f"--format {format!r}: choose diffusers or lora.")


@app.command()
def bench(methods: List[str] = typer.Option(["esd"], "--method", help="Method to run (repeatable); METHOD:key=value,... "
                                                                        "runs a variant."),
          regularizers: List[str] = typer.Option([], "--regularizer", help="Regularizer (repeatable); none = plain; "
                                                                       "NAME:key=value,...+NAME composes several in one cell."),
          sequence: str = typer.Option("s1", help="Named request sequence: " + ", ".join(_sequence_names()) + "."),
          out: Path = typer.Option(Path("benchmarks"), help="Where tables and finished cells go."),
          work: Path = typer.Option(Path("runs/bench"), help="Scratch folder for the stores."),
          model: Optional[str] = typer.Option(None, help="Model to run on (default: the sequence's)."),
          set_: List[str] = typer.Option([], "--set", help="METHOD.option=value (repeatable)."),
          eval_set: List[str] = typer.Option([], "--eval-set", help="Evaluation option key=value (repeatable)."),
          images_per_prompt: Optional[int] = typer.Option(None, help="Text-to-image evaluation: images per prompt."),
          forget_prompts: Optional[int] = typer.Option(None, help="Text-to-image evaluation: prompts per forgotten target and split."),
          oracles: Path = typer.Option(Path("runs/oracles"), help="Retrain oracles (`zoo train shapes-t2i-v2 --exclude`)."),
          evaluate: bool = typer.Option(True, help="--no-evaluate: cost columns only (a speed benchmark)."),
          attack: List[str] = typer.Option([], "--attack", help="Attack to run after every step on its targets "
                                                                "(repeatable; text-to-image): relearn, resurgence, prompt, paraphrase, inversion, regenerate, completion, noise, probe."),
          attack_set: List[str] = typer.Option([], "--attack-set", help="KIND.option=value (repeatable)."),
          executor: str = typer.Option("serial", help="Where cells run: serial, or ray (a local Ray instance; "
                                                      "ray:address=auto joins a cluster, ray:num_gpus=1 per cell).")) -> None:
    """Run a resumable benchmark matrix; prints and writes a table to OUT/SEQUENCE.md (and .csv)."""
    from .bench import markdown_table, parse_method_options, run_bench
    from .config import parse_assignments
    from .executors import get_executor
    eval_options = parse_assignments(eval_set)
    eval_options.update({k: v for k, v in (("images_per_prompt", images_per_prompt), ("forget_prompts", forget_prompts))
                         if v is not None})
    plain_or_named = ["" if r == "none" else r for r in regularizers]
    rows = run_bench(list(methods), plain_or_named, sequence, out, work, model, parse_method_options(set_),
                     eval_options, oracles=oracles, echo=typer.echo, evaluate=evaluate,
                     attacks={kind: parse_method_options(attack_set).get(kind, {}) for kind in attack},
                     executor=get_executor(executor))
    typer.echo(markdown_table(rows, sequence))


@app.command("bench-store")
def bench_store(size: str = typer.Option("sd15", help="Component configs: sd15 (Stable Diffusion v1.5's, random "
                                                      "weights, about 4 GiB on disk per copy) or tiny."),
                work: Path = typer.Option(Path("runs/bench-store"), help="Scratch folder (emptied first)."),
                out: Path = typer.Option(Path("benchmarks/store"))) -> None:
    """Time init, a uce request, load, verify, rollback and export at a real model's size, against
    diffusers' save_pretrained / from_pretrained of the same components; writes OUT/SIZE.md."""
    from .store_bench import store_benchmark
    typer.echo(store_benchmark(size, work, out, echo=typer.echo))


@app.command("bench-samplers")
def bench_samplers(model: str = typer.Option(DEFAULT_T2I, help="Zoo name or model folder."),
                   solver: List[str] = typer.Option(["ddim", "ddim-lml:momentum=0.5", "dpm", "o-belm"],
                                                    help="Solver spec (repeatable), e.g. ddim-lml:momentum=0.3."),
                   steps: List[int] = typer.Option([5, 10, 20], min=1, max=1000, help="Step count (repeatable)."),
                   prompts: int = typer.Option(40, min=1, max=1000, help="Training prompts judged per cell."),
                   images_per_prompt: int = typer.Option(4, min=1, max=64),
                   out: Path = typer.Option(Path("benchmarks/samplers")),
                   fisher_only: bool = typer.Option(False, "--fisher-only", help="Only time diffusion-Fisher products."),
                   fisher: bool = typer.Option(True, "--fisher/--no-fisher", help="Also time diffusion-Fisher products.")) -> None:
    """Judge accuracy, FD, cost and O-BELM's inversion round trip per solver and step count; the
    speed of diffusion-Fisher vector products against autodiff."""
    from .bench import fisher_speed, sampler_benchmark
    if not fisher_only:
        typer.echo(sampler_benchmark(model, solver, steps, out, prompts, images_per_prompt, echo=typer.echo))
    if fisher or fisher_only:
        typer.echo(fisher_speed(model, out))


@app.command("bench-words")
def bench_words(model: List[str] = typer.Option(["shapes-t2i", DEFAULT_T2I], "--model", help="World model (repeatable)."),
                out: Path = typer.Option(Path("benchmarks/v2"))) -> None:
    """Each world model's accuracy on held-out synonyms beside what its frozen text encoder carries
    about those words; writes OUT/heldout-words.md."""
    from .bench import heldout_words_benchmark
    typer.echo(heldout_words_benchmark(model, out, echo=typer.echo))


def main() -> None:
    app(prog_name="obliviate")
