import re

from obliviate.bench import SEQUENCES, parse_method_options, run_bench
from obliviate.models.judge import AttributeJudge
from obliviate.world import DEFAULT_ONTOLOGY

import pytest

TINY_EVAL = {"forget_prompts": 1, "retain_prompts": 2, "images_per_prompt": 1, "steps": 2}


def test_bench_writes_tables_and_resumes(tmp_path, tiny_model_dir):
    judge_dir = tmp_path / "judge"
    AttributeJudge({d: len(DEFAULT_ONTOLOGY.in_domain(d)) for d in DEFAULT_ONTOLOGY.domains}).save(judge_dir)
    options = parse_method_options(["esd.steps=1", "esd.forget_images=2", "esd.sampling_steps=2", "esd.batch_size=2"])
    out = tmp_path / "bench"
    lines = []
    rows = run_bench(["esd"], ["", "l2sp"], "s3", out, tmp_path / "work", str(tiny_model_dir), options,
                     {**TINY_EVAL, "judge": str(judge_dir)}, echo=lines.append)
    assert len([r for r in rows if r["method"] != "oracle"]) == 3 * len(SEQUENCES["s3"]["requests"])  # base, esd, esd+l2sp
    # the shipped v1 oracle has forgotten striped only: a row for the first step alone
    assert [r["step"] for r in rows if r["method"] == "oracle"] == [1]
    # which concept a sequence lost, not only how far: one UA per target forgotten so far
    last = [r for r in rows if r["method"] == "esd" and r["step"] == 3][0]
    assert [part.split()[0] for part in last["ua_per_target"].split("; ")] == ["striped", "triangle", "red"]
    assert min(float(part.split()[1]) for part in last["ua_per_target"].split("; ")) == pytest.approx(last["ua_min"], abs=1e-3)
    table = (out / "s3.md").read_text()
    assert table.count("\n| esd |") == 6 and "| base |" in table
    assert (out / "s3.csv").read_text().count("\n") == len(rows) + 1
    assert (out / "s3.png").stat().st_size > 10_000  # the sequential plot, one line per cell

    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    lines.clear()
    run_bench(["esd"], ["", "l2sp"], "s3", out, tmp_path / "work", str(tiny_model_dir), options,
              {**TINY_EVAL, "judge": str(judge_dir)}, echo=lines.append)
    assert sum(line.startswith("skip") for line in lines) == 4  # base, oracle and the two esd cells
    assert cells == {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}


class _StopBeforeTheWrite:
    """Runs each cell, then stops the driver before it can write the cell's file (a kill there)."""

    def run(self, function, calls):
        for arguments in calls:
            function(*arguments)
            raise KeyboardInterrupt
        yield from ()


def test_a_stop_between_a_finished_cell_and_its_file_resumes_without_rerunning(tmp_path, tiny_model_dir):
    options = parse_method_options(["uce.preserve=none"])
    run = dict(sequence="s1-striped", out=tmp_path / "bench", work=tmp_path / "work", model=str(tiny_model_dir),
               method_options=options, eval_options=TINY_EVAL, evaluate=False)
    with pytest.raises(KeyboardInterrupt):
        run_bench(["uce"], [], executor=_StopBeforeTheWrite(), echo=lambda _: None, **run)
    assert not list((tmp_path / "bench" / "cells").glob("*.json"))
    lines = []
    rows = run_bench(["uce"], [], echo=lines.append, **run)
    assert [r["method"] for r in rows] == ["uce"]
    assert not any(line.startswith("applying") for line in lines)  # the rows came from the cell's progress
    assert not list((tmp_path / "work").rglob("progress.json"))  # written, so a rerun of a deleted cell starts afresh


def test_method_variants_are_separate_cells():
    from obliviate.bench import _cell_name
    from obliviate.config import parse_spec
    assert parse_spec("uce:incremental=false,lam=1") == ("uce", {"incremental": "false", "lam": "1"})
    assert parse_spec("esd") == ("esd", {})
    assert parse_spec("l2sp:anchor-weight=3") == ("l2sp", {"anchor_weight": "3"})  # keys as in --set
    assert _cell_name("s1", "uce:incremental=false", "") != _cell_name("s1", "uce", "")
    with pytest.raises(ValueError, match="NAME:key=value"):
        parse_spec("uce:lam")


def test_a_cell_composes_regularizers_with_options():
    from obliviate.bench import _cell_name, split_regularizer_spec
    from obliviate.engine import RegularizerSpec
    assert split_regularizer_spec("gradproj:rank=96+l2sp:weight=100,anchor=pretrained") == (
        RegularizerSpec("gradproj", {"rank": "96"}), RegularizerSpec("l2sp", {"weight": "100", "anchor": "pretrained"}))
    assert split_regularizer_spec("") == ()
    assert _cell_name("s10", "esd", "gradproj") == "s10__esd__gradproj"  # finished cells keep their names
    assert _cell_name("s10", "esd", "gradproj+l2sp:weight=100") != _cell_name("s10", "esd", "gradproj+l2sp")
    # a tuple option's "/" stays inside the one file name
    assert _cell_name("s1", "safegen", "meta:steps=2/5") == "s1__safegen__meta@steps-2_5"


def test_bench_rejects_unknown_sequence_and_bad_options(tmp_path):
    with pytest.raises(ValueError, match="Unknown sequence"):
        run_bench(["esd"], [], "s99", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="METHOD.option=value"):
        parse_method_options(["steps=3"])


def test_speed_bench_skips_evaluation_and_reference_rows(tmp_path, tiny_model_dir):
    out = tmp_path / "speed"
    rows = run_bench(["uce"], [], "s3", out, tmp_path / "work", str(tiny_model_dir), {"uce": {"preserve": "none"}},
                     evaluate=False, echo=lambda _: None)
    assert [r["method"] for r in rows] == ["uce"] * 3
    assert all(r["seconds"] is not None and r["ua"] is None for r in rows)
    assert not (out / "s3.png").exists()


def test_bench_attacks_every_row_including_base_and_oracle(tmp_path, tiny_model_dir):
    import shutil
    judge_dir = tmp_path / "judge"
    AttributeJudge({d: len(DEFAULT_ONTOLOGY.in_domain(d)) for d in DEFAULT_ONTOLOGY.domains}).save(judge_dir)
    oracles = tmp_path / "oracles"
    shutil.copytree(tiny_model_dir, oracles / "without-striped" / "model")
    quick = {"prompts": "1", "images_per_prompt": "1", "sampling_steps": "2"}
    attacks = {"relearn": {**quick, "renders": "2", "checkpoints": "0,1", "batch_size": "2"},
               "probe": {"samples": "16", "iterations": "10"}}
    out = tmp_path / "bench"
    rows = run_bench(["uce"], [], "s1-striped", out, tmp_path / "work", str(tiny_model_dir), {"uce": {"preserve": "none"}},
                     {**TINY_EVAL, "judge": str(judge_dir)}, oracles=oracles, echo=lambda _: None, attacks=attacks)
    assert [r["method"] for r in rows] == ["base", "oracle", "uce"]
    for row in rows:
        assert 0 <= row["attack_relearn"] <= 1 and 0 <= row["attack_probe"] <= 1
        assert [step for step, _ in row["attack_results"]["relearn"]["curves"][0]] == [0, 1]
    table = (out / "s1-striped.md").read_text()
    assert "| probe attack | relearn attack |" in table and "Attack columns" in table
    assert "attack_relearn" in (out / "s1-striped.csv").read_text().splitlines()[0]


class Stop(BaseException):
    """A kill, as far as the bench can tell."""


@pytest.mark.parametrize("stop_at", ["while step 2 is applied", "after step 2 is applied, before its row"])
def test_a_stopped_cell_resumes_at_the_step_it_stopped_at(tmp_path, tiny_model_dir, monkeypatch, stop_at):
    from obliviate.engine import Store
    args = (["uce"], [], "s3")
    options = dict(model=str(tiny_model_dir), method_options={"uce": {"preserve": "none"}}, evaluate=False)
    straight = run_bench(*args, tmp_path / "straight", tmp_path / "work-straight", echo=lambda _: None, **options)

    original, applied = Store.apply, []

    def stop_in_step_2(self, *a, **k):
        applied.append(1)
        if len(applied) == 2 and stop_at.startswith("while"):
            raise Stop()
        return original(self, *a, **k)

    def stop_after_step_2(line):
        if "step 2" in line and stop_at.startswith("after"):
            raise Stop()

    monkeypatch.setattr(Store, "apply", stop_in_step_2)
    with pytest.raises(Stop):
        run_bench(*args, tmp_path / "out", tmp_path / "work", echo=stop_after_step_2, **options)
    monkeypatch.setattr(Store, "apply", original)
    resumed = run_bench(*args, tmp_path / "out", tmp_path / "work", echo=lambda _: None, **options)
    assert [(r["step"], r["model_hash"]) for r in resumed] == [(r["step"], r["model_hash"]) for r in straight]
    store = Store(tmp_path / "work" / "s3__uce__none" / "store-1")
    assert len(store.state().requests) == 3 and len(store.state().applied) == 3  # nothing applied twice
    assert not (tmp_path / "work" / "s3__uce__none" / "progress.json").exists()  # a rerun starts afresh


def test_a_request_the_method_refuses_ends_its_cell_with_the_rows_so_far(tmp_path, tiny_model_dir, monkeypatch):
    from obliviate.engine import Store
    original, calls = Store.apply, []

    def refuse_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("too many constraints")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "apply", refuse_second)
    lines = []
    rows = run_bench(["uce"], [], "s3", tmp_path / "out", tmp_path / "work", str(tiny_model_dir),
                     {"uce": {"preserve": "none"}}, evaluate=False, echo=lines.append)
    assert [r["step"] for r in rows] == [1]
    assert any("refused, the cell stops: too many constraints" in line for line in lines)


def test_relearnability_sits_in_every_row_beside_the_oracles(tmp_path, tiny_model_dir):
    import shutil
    judge_dir = tmp_path / "judge"
    AttributeJudge({d: len(DEFAULT_ONTOLOGY.in_domain(d)) for d in DEFAULT_ONTOLOGY.domains}).save(judge_dir)
    oracles = tmp_path / "oracles"
    shutil.copytree(tiny_model_dir, oracles / "without-striped" / "model")
    evaluation = {**TINY_EVAL, "judge": str(judge_dir), "relearn_checkpoints": "0,1", "oracles": str(oracles),
                  "ua_splits": "train"}
    out = tmp_path / "bench"
    rows = run_bench(["uce"], [], "s1-striped", out, tmp_path / "work", str(tiny_model_dir), {"uce": {"preserve": "none"}},
                     evaluation, oracles=oracles, echo=lambda _: None)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"base", "oracle", "uce"}
    assert by_method["oracle"]["relearn_auc_gap"] == 0  # the same model, the same attack
    for row in rows:
        assert 0 <= row["relearn_auc"] <= 1
        assert row["relearn_auc_gap"] == pytest.approx(row["relearn_auc"] - by_method["oracle"]["relearn_auc"], abs=1e-4)
        # the curve behind the area, beside the oracle's: "striped 0:s0 1:s1 (oracle 0:o0 1:o1)"
        curve, oracle_curve = re.fullmatch(r"striped (.*) \(oracle (.*)\)", row["relearn_curves"]).groups()
        assert [p.split(":")[0] for p in curve.split()] == ["0", "1"] == [p.split(":")[0] for p in oracle_curve.split()]
    table = (out / "s1-striped.md").read_text()
    assert "| relearn AUC | AUC gap |" in table
    assert "UA held-out syn" not in table  # a column nothing measured is left out


def test_relearn_checkpoints_are_validated():
    from obliviate.evaluation.evaluator import EvalConfig
    with pytest.raises(ValueError, match="relearn_checkpoints"):
        EvalConfig(relearn_checkpoints="5")
    with pytest.raises(ValueError, match="relearn_checkpoints"):
        EvalConfig(relearn_checkpoints="0,x")
    assert EvalConfig(relearn_checkpoints="10,0,5").checkpoints == (0, 5, 10)


def test_ray_runs_the_cells_the_serial_run_runs_with_the_same_results(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    import ray
    import torch
    from obliviate.executors import RayExecutor, get_executor
    judge_dir = tmp_path / "judge"
    AttributeJudge({d: len(DEFAULT_ONTOLOGY.in_domain(d)) for d in DEFAULT_ONTOLOGY.domains}).save(judge_dir)
    options = parse_method_options(["esd.steps=1", "esd.forget_images=2", "esd.sampling_steps=2", "esd.batch_size=2"])
    evaluation = {**TINY_EVAL, "judge": str(judge_dir)}
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as many as a Ray cell with one CPU gets: kernels then sum in the same order
    try:
        for name, executor in (("serial", get_executor("serial")), ("ray", RayExecutor(num_cpus=1))):
            rows = run_bench(["esd", "esd:steps=2"], ["", "l2sp"], "s3", tmp_path / name, tmp_path / f"work-{name}",
                             str(tiny_model_dir), options, evaluation, echo=lambda line: None, executor=executor)
            runs[name] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
            assert len(list((tmp_path / name / "cells").iterdir())) == 6  # base, oracle and four method cells
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
    assert runs["ray"] == runs["serial"] and all(r["model_hash"] for r in runs["ray"] if r["method"].startswith("esd"))


def test_executor_specs_are_checked():
    from obliviate.executors import get_executor
    assert get_executor("ray:address=auto,num_gpus=0.5").num_gpus == 0.5
    with pytest.raises(ValueError, match="choose one of serial, ray"):
        get_executor("dask")
    with pytest.raises(ValueError, match="num_gpus"):
        get_executor("ray:num_gpus=-1")


def test_the_store_size_benchmark_times_every_operation_against_diffusers(tmp_path):
    from obliviate.store_bench import store_benchmark
    table = store_benchmark("tiny", tmp_path / "work", tmp_path / "out", echo=lambda line: None)
    steps = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| diffusers") or line.startswith("| obliviate")]
    assert steps[:2] == ["diffusers: save_pretrained (UNet, VAE, text encoder)", "diffusers: from_pretrained (UNet, VAE, text encoder)"]
    assert {s.split(":")[0].split(" (")[0] for s in steps[2:]} == {
        "obliviate init", "obliviate apply", "obliviate load", "obliviate verify", "obliviate rollback to the base", "obliviate export"}
    assert (tmp_path / "out" / "tiny.md").read_text() == table and "| uce (K/V rows" in table


def test_a_sequence_evaluated_every_kth_request_has_rows_there_and_costs_everywhere(tmp_path, tiny_model_dir, monkeypatch):
    from obliviate.bench import SEQUENCES, markdown_table
    monkeypatch.setitem(SEQUENCES, "every-2", {**SEQUENCES["s3"], "evaluate_every": 2})
    judge_dir = tmp_path / "judge"
    AttributeJudge({d: len(DEFAULT_ONTOLOGY.in_domain(d)) for d in DEFAULT_ONTOLOGY.domains}).save(judge_dir)
    options = parse_method_options(["esd.steps=1", "esd.forget_images=2", "esd.sampling_steps=2", "esd.batch_size=2"])
    rows = run_bench(["esd"], [""], "every-2", tmp_path / "out", tmp_path / "work", str(tiny_model_dir), options,
                     {**TINY_EVAL, "judge": str(judge_dir)}, echo=lambda line: None)
    esd = {r["step"]: r for r in rows if r["method"] == "esd"}
    assert sorted(esd) == [1, 2, 3] and all(r["seconds"] is not None for r in esd.values())
    assert [s for s, r in esd.items() if r["ua"] is not None] == [2, 3]  # every second request, and the last
    assert sorted(r["step"] for r in rows if r["method"] == "base") == [2, 3]
    assert "| esd | - | 1 |" not in markdown_table(rows, "every-2") and "| esd | - | 2 |" in markdown_table(rows, "every-2")
    assert "s100" in SEQUENCES and len({r for r in SEQUENCES["s100"]["requests"]()}) == 100
