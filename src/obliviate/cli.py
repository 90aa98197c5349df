"""The ``obliviate`` command line: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Continual unlearning for text-to-image diffusion models and classifiers.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
world_app = typer.Typer(help="The embedded concept world.", no_args_is_help=True)
zoo_app = typer.Typer(help="Models that ship with obliviate.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(zoo_app, name="zoo")
console = Console()


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
                 n: int = typer.Option(32, min=1, help="Number of scenes."),
                 seed: int = typer.Option(0, help="Scene seed.")) -> None:
    """Render a labelled grid of random scenes."""
    import torch
    from .viz import image_grid
    from .world import DEFAULT_ONTOLOGY as onto, render, sample_scenes
    scenes = sample_scenes(n, seed)
    captions = [" ".join(onto.names(d)[i] for d, i in zip(("texture", "colour", "shape"), (t, c, s)))
                for s, c, t in scenes.labels]
    image_grid(torch.from_numpy(render(scenes)), captions, columns=8, scale=4).save(out)
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
def zoo_train(name: str = typer.Argument(..., help="shapes-t2i or shapes-judge"),
              out: Path = typer.Option(None, help="Run folder (default runs/NAME); resumes if it holds a run."),
              steps: Optional[int] = typer.Option(None, help="Override the recipe's step count."),
              seed: int = typer.Option(0)) -> None:
    """Train a zoo model from its recipe (resumable for shapes-t2i)."""
    out = out or Path("runs") / name
    if name == "shapes-t2i":
        from .models.train_t2i import T2IRecipe, train_t2i
        recipe = T2IRecipe(seed=seed, **({"steps": steps} if steps else {}))
        train_t2i(recipe, out)
        typer.echo(f"model written to {out / 'model'}")
    elif name == "shapes-judge":
        from .models.judge import JudgeRecipe, train_judge
        judge, card = train_judge(JudgeRecipe(seed=seed, **({"steps": steps} if steps else {})))
        judge.save(out, card)
        typer.echo(f"judge written to {out}")
    else:
        raise typer.BadParameter(f"no recipe for {name!r}; choose shapes-t2i or shapes-judge")


# ------------------------------------------------------------------ models
@app.command()
def sample(model: str = typer.Argument(..., help="Zoo name, model folder or store."),
           prompt: List[str] = typer.Argument(..., help="One or more prompts."),
           n: int = typer.Option(8, min=1, help="Images per prompt."),
           out: Path = typer.Option(Path("samples.png")),
           steps: int = typer.Option(25), solver: str = typer.Option("ddim"),
           guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale."),
           seed: int = typer.Option(0)) -> None:
    """Generate images for prompts and save them as a captioned grid."""
    from .viz import image_grid
    t2i = _load_t2i_or_store(model)
    prompts = [p for p in prompt for _ in range(n)]
    images = t2i.sample(prompts, steps=steps, guidance_scale=guidance, seed=seed, solver=solver)
    image_grid(images, prompts, columns=n, scale=3).save(out)
    typer.echo(f"wrote {out}")


def _load_t2i_or_store(name: str):
    from .models.zoo import load_t2i
    return load_t2i(name)


@app.command()
def judge(model: str = typer.Argument("shapes-t2i", help="Zoo name or model folder."),
          judge_model: str = typer.Option("shapes-judge", "--judge"),
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
    run_demo(out, quick=quick, echo=typer.echo, print_quality=_print_quality)


def main() -> None:
    try:
        app()
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise SystemExit(2)
