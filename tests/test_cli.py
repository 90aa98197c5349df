import json
import math

from typer.testing import CliRunner

from obliviate.cli import app

runner = CliRunner()
FAST = ["--set", "steps=1", "--set", "forget_images=2", "--set", "sampling_steps=2", "--set", "batch_size=2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_store_workflow_from_the_command_line(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    assert invoke("init", store, "--model", tiny_model_dir).exit_code == 0
    assert invoke("request", "add", store, "striped", "--method", "esd", *FAST).exit_code == 0
    assert invoke("request", "add", store, "triangle", "--method", "ablation", "--anchor", "square", *FAST).exit_code == 0
    assert invoke("request", "add", store, "red", "--method", "esd", "--regularizer", "l2sp:weight=10", *FAST).exit_code == 0
    result = invoke("apply", store)
    assert result.exit_code == 0 and result.output.count("applying request") == 3
    status = json.loads(invoke("status", store, "--json").output)
    assert status["applied"] == [1, 2, 3] and status["requests"][2]["regularizers"] == ["l2sp"]
    assert "rolled back to request 1" in invoke("rollback", store, "--to", 1).output
    assert json.loads(invoke("status", store, "--json").output)["applied"] == [1]
    assert invoke("verify", store).output.startswith("ok")
    assert invoke("export", store, tmp_path / "exported").exit_code == 0
    assert (tmp_path / "exported" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    result = invoke("sample", store, "a striped red triangle", "--n", "2", "--steps", "2", "--out", tmp_path / "s.png")
    assert result.exit_code == 0 and (tmp_path / "s.png").is_file()


def test_bad_input_exits_with_a_clear_message(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    invoke("init", store, "--model", tiny_model_dir)
    result = runner.invoke(app, ["request", "add", str(store), "stripped"])
    assert result.exit_code == 2 and "Did you mean: striped" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["request", "add", str(store), "striped", "--set", "steps"])
    assert result.exit_code == 2 and "key=value" in result.output


def test_verify_exit_code_reports_tampering(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    invoke("init", store, "--model", tiny_model_dir)
    invoke("request", "add", store, "striped", *FAST)
    invoke("apply", store)
    edit = next((store / "edits").iterdir())
    data = bytearray(edit.read_bytes())
    data[-1] ^= 0xFF
    edit.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 1 and "FAIL" in result.output and edit.name in result.output


def test_paraphrase_attack_prints_the_wordings_it_found(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    invoke("init", store, "--model", tiny_model_dir)
    options = dict(candidates=2, screen_images=1, top=2, prompts=1, images_per_prompt=1, sampling_steps=2, words="zebra-like")
    result = invoke("attack", store, "striped", "--kind", "paraphrase", "--oracles", tmp_path / "none",
                    *[a for k, v in options.items() for a in ("--set", f"{k}={v}")])
    assert result.exit_code == 0, result.output
    # the tiny model names no language, so it is v1's and the shipped v1 striped oracle is its bar
    assert "paraphrase attack on 'striped', model" in result.output and "retrain oracle without-striped" in result.output
    assert result.output.count("(screened at") == 4  # the two best wordings, on the model and on the oracle


def test_eval_reports_relearnability_beside_the_retrain_oracle(tmp_path, tiny_model_dir):
    from obliviate.engine import Store
    from obliviate.models.judge import AttributeJudge
    from obliviate.world import DEFAULT_ONTOLOGY
    judge_dir = tmp_path / "judge"
    AttributeJudge({d: len(DEFAULT_ONTOLOGY.in_domain(d)) for d in DEFAULT_ONTOLOGY.domains}).save(judge_dir)
    store = tmp_path / "store"
    invoke("init", store, "--model", tiny_model_dir)
    invoke("request", "add", store, "striped", "--method", "uce")
    invoke("apply", store)
    options = dict(relearn_checkpoints="0,1", judge=judge_dir, forget_prompts=1, retain_prompts=2, images_per_prompt=1,
                   steps=2, ua_splits="train")
    result = invoke("eval", store, *[a for k, v in options.items() for a in ("--set", f"{k}={v}")])
    assert result.exit_code == 0, result.output
    # the tiny model is v1's, so the shipped v1 oracle without striped is the bar
    assert "relearnability striped: AUC" in result.output and "retrain oracle" in result.output
    recorded = [e for e in Store(store).ledger.events() if e.kind == "evaluate"][-1].payload["metrics"]
    assert set(recorded["relearn"]["striped"]) >= {"auc", "oracle_auc", "gap", "curve"}


def test_eval_reports_the_likelihood_of_forgotten_and_retained_renders(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    invoke("init", store, "--model", tiny_model_dir)
    invoke("request", "add", store, "striped", *FAST)
    invoke("apply", store)
    result = invoke("eval", store, "--json", "--no-record", "--likelihood", "--set", "likelihood_steps=2",
                    "--set", "likelihood_images=2", "--set", "images_per_prompt=1", "--set", "forget_prompts=1",
                    "--set", "retain_prompts=2", "--set", "steps=2", "--set", f"oracles={tmp_path / 'none'}")
    metrics = json.loads(result.output)
    assert set(metrics["nll"]) == {"striped"} and all(math.isfinite(metrics[k]) for k in ("nll_forgotten", "nll_retained"))


def test_eval_writes_the_images_the_judge_counts_as_misses_beside_its_json(tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    invoke("init", store, "--model", tiny_model_dir)
    invoke("request", "add", store, "striped", "red", *FAST)
    invoke("apply", store)
    result = invoke("eval", store, "--json", "--no-record", "--misses", tmp_path / "misses", "--set", "forget_prompts=2",
                    "--set", "images_per_prompt=2", "--set", "retain_prompts=2", "--set", "steps=2", "--set", "ua_splits=train",
                    "--set", "short_prompts=true")
    metrics = json.loads(result.stdout)  # the notes about the images go to stderr
    for target in ("striped", "red"):
        for split, suffix in (("train", ""), ("short", "-short")):
            misses = round((1 - metrics["ua_per_target"][target][split]) * metrics["ua_images"])
            assert f"{target}{suffix}: {misses} image(s) judged to show it" in result.stderr
            assert (tmp_path / "misses" / f"{target}{suffix}.png").is_file() == (misses > 0)


def test_status_shows_an_adapter_requests_group_and_lw2g_decision(tmp_path, tiny_model_dir):
    from obliviate.cli import _adapter_note
    store = tmp_path / "store"
    invoke("init", store, "--model", tiny_model_dir)
    assert invoke("request", "add", store, "triangle", "--method", "lw2g", "--set", "rank=4", *FAST).exit_code == 0
    assert invoke("request", "add", store, "red", "--method", "suplora", "--set", "rank=4", *FAST).exit_code == 0
    assert invoke("apply", store).exit_code == 0
    costs = [r["cost"] for r in json.loads(invoke("status", store, "--json").output)["requests"]]
    assert costs[0]["decision"] == "grow lw2g.0" and costs[0]["hfc"] == {} and costs[0]["hfc_threshold"] > 0
    assert _adapter_note(costs[0]).startswith("lw2g.0 rank 4; grow lw2g.0 (HFC no groups; threshold ")
    assert _adapter_note(costs[1]) == "warm rank 4" and _adapter_note({"seconds": 1.0}) == ""
    # a group the embedded world does not know fails the request with the choices, and changes nothing
    invoke("request", "add", store, "square", "--method", "suplora", "--set", "group=shiny", *FAST)
    result = runner.invoke(app, ["apply", str(store)])
    assert result.exit_code != 0 and "not a supertype" in result.output + str(result.exception)
    assert json.loads(invoke("status", store, "--json").output)["applied"] == [1, 2]


def test_progress_without_a_terminal_is_a_timed_log_line_with_what_is_left():
    import io

    from obliviate.progress import ProgressLines
    now, log = [0.0], io.StringIO()
    advance = ProgressLines("request 1", 100, every=60, stream=log, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 5
        advance(1, loss=0.5)
    assert log.getvalue() == ""  # 50 s in: nothing yet
    now[0] += 10
    advance(1, loss=0.25)
    assert log.getvalue() == "request 1: 11/100 after 60 s, about 485 s left (loss 0.25)\n"
    now[0] += 30
    advance(1)
    assert log.getvalue().count("\n") == 1  # at most one line a minute
