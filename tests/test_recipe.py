"""`cutegpt recipe`: the orchestration (fast, with stand-in steps) and one tiny real run (slow)."""

import json

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.recipe import RecipeConfig, Step, bundled_data, run_recipe


def test_bundled_data_is_valid_input_for_every_step(tmp_path):
    from cutegpt.evaluation.data import load_benchmark
    from cutegpt.recipe import write_bundled
    from cutegpt.vocab.text import count_han, read_corpus

    paths = write_bundled(tmp_path, RecipeConfig(out=str(tmp_path)))
    docs = read_corpus([paths["corpus"]])
    assert docs == bundled_data()["corpus"] and sum(map(count_han, docs)) > 2000
    bench = load_benchmark("ceval", paths["eval"], "val")
    assert sum(len(s.questions) for s in bench.subjects.values()) == 12
    assert all(len(s.dev) >= 2 for s in bench.subjects.values())
    assert len(json.loads(paths["sft"].read_text(encoding="utf-8"))) == 20


def test_missing_command_skips_what_needs_it(tmp_path, monkeypatch):
    """A step whose command is not in this version is 'missing'; the steps that need it are 'skipped'."""
    ran = []

    def fake_plan(cfg, out, paths):
        def ok(name):
            return lambda: ran.append(name) or {}

        def missing():
            raise ModuleNotFoundError("No module named 'cutegpt.training.pt'", name="cutegpt.training.pt")

        return [(Step("a", "cmd a", "x"), ok("a"), []), (Step("b", "cmd b", "y"), missing, ["a"]),
                (Step("c", "cmd c", "z"), ok("c"), ["b"]), (Step("d", "cmd d", "w"), ok("d"), [])]

    monkeypatch.setattr("cutegpt.recipe.plan", fake_plan)
    assert run_recipe(RecipeConfig(out=str(tmp_path / "r"))) == 0
    summary = json.loads((tmp_path / "r" / "recipe.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in summary["steps"]] == ["done", "missing", "skipped", "done"]
    assert ran == ["a", "d"]


def test_failed_step_stops_the_run_with_its_message(tmp_path, monkeypatch):
    def fake_plan(cfg, out, paths):
        def bad():
            raise CuteGPTError("corpus.txt: the corpus is empty.")

        return [(Step("a", "cmd a", "x"), bad, []), (Step("b", "cmd b", "y"), lambda: {}, [])]

    monkeypatch.setattr("cutegpt.recipe.plan", fake_plan)
    with pytest.raises(CuteGPTError, match="stopped at 'a': corpus.txt: the corpus is empty"):
        run_recipe(RecipeConfig(out=str(tmp_path / "r")))
    summary = json.loads((tmp_path / "r" / "recipe.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in summary["steps"]] == ["failed", "skipped"]


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    with pytest.raises(CuteGPTError, match="already exists"):
        run_recipe(RecipeConfig(out=str(tmp_path / "r")))
    with pytest.raises(CuteGPTError, match="does not look like a recipe folder"):
        run_recipe(RecipeConfig(out=str(tmp_path / "r"), overwrite=True))
    assert (tmp_path / "r" / "keep.txt").exists()


@pytest.mark.slow
def test_tiny_recipe_end_to_end(tmp_path, embedded_dir):
    """Every step on the embedded model with one training step each; the result reloads with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "recipe"
    cfg = RecipeConfig(out=str(out), vocab_size=800, pt_steps=1, sft_steps=1, max_length=64, micro_batch=1,
                       threads=1, max_new_tokens=4, eval_limit=1, eval_base=False)
    assert run_recipe(cfg) == 0
    summary = json.loads((out / "recipe.json").read_text(encoding="utf-8"))
    steps = {s["name"]: s for s in summary["steps"]}
    assert all(s["status"] == "done" for s in steps.values()), {k: s["status"] for k, s in steps.items()}
    before, after = steps["vocab extend"]["info"]["tokens_per_chinese_char"]
    assert after < before
    merged = out / "6-merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    ext = json.loads((out / "2-extended" / "vocab_report.json").read_text(encoding="utf-8"))
    assert len(tok) == ext["vocab_size_after"]
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == ext["embedding_rows_after"]
    assert set(steps["chat smoke test"]["info"]["answers"]) == {"中国的首都是哪里？", "熊猫喜欢吃什么？", "What is the capital of France?"}
    assert (out / "8-eval" / "results.json").is_file()
    assert not list(out.glob("*/checkpoint-*"))  # only final/ of each training step is kept
    assert steps["continued pre-training"]["info"]["checkpoints_removed_mb"] > 0


# ---------------------------------------------------------------- issue 11: nothing typed destroys a run


def _tree(folder):
    import hashlib

    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def _old_run(tmp_path):
    r = tmp_path / "r"
    r.mkdir()
    (r / "recipe.json").write_text('{"old": true}')
    (r / "3-pt").mkdir()
    (r / "3-pt" / "weights").write_text("old weights")
    return r


@pytest.mark.parametrize("argv", [["--pt-steps", "0"], ["--sft-steps", "-1"], ["--micro-batch", "0"], ["--max-length", "8"],
                                  ["--corpus", "missing.txt"], ["--sft-data", "missing.json"], ["--eval-data", "missing"],
                                  ["--model", "missing"], ["--deepspeed", "missing.json"]])
def test_overwrite_with_a_bad_setting_keeps_the_old_run(tmp_path, capsys, monkeypatch, argv):
    from cutegpt.cli import main

    monkeypatch.chdir(tmp_path)
    _old_run(tmp_path)
    before = _tree(tmp_path)
    assert main(["recipe", "--out", "r", "--overwrite", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unexpected" not in err and argv[0] in err, err
    assert _tree(tmp_path) == before


def test_overwrite_keeps_the_old_run_when_a_step_fails(tmp_path, monkeypatch):
    r = _old_run(tmp_path)
    before = _tree(tmp_path)

    def fake_plan(cfg, out, paths):
        def bad():
            (out / "3-pt").mkdir()
            raise CuteGPTError("corpus.txt: the corpus is empty.")

        return [(Step("a", "cmd a", str(out / "3-pt")), bad, [])]

    monkeypatch.setattr("cutegpt.recipe.plan", fake_plan)
    with pytest.raises(CuteGPTError, match="stopped at 'a': corpus.txt: the corpus is empty.*previous run in .* was kept"):
        run_recipe(RecipeConfig(out=str(r), overwrite=True))
    assert _tree(tmp_path) == before  # old run intact, no temporary folder left


def test_overwrite_replaces_once_complete_and_records_final_paths(tmp_path, monkeypatch):
    r = _old_run(tmp_path)

    def fake_plan(cfg, out, paths):
        def ok():
            (out / "3-pt").mkdir()
            (out / "3-pt" / "weights").write_text("new weights")
            return {"final": str(out / "3-pt")}

        return [(Step("a", "cmd a", str(out / "3-pt")), ok, [])]

    monkeypatch.setattr("cutegpt.recipe.plan", fake_plan)
    assert run_recipe(RecipeConfig(out=str(r), overwrite=True)) == 0
    assert (r / "3-pt" / "weights").read_text() == "new weights"
    summary = json.loads((r / "recipe.json").read_text(encoding="utf-8"))
    assert summary["steps"][0]["artefact"] == str(r / "3-pt") and summary["steps"][0]["info"]["final"] == str(r / "3-pt")
    assert ".tmp-" not in json.dumps(summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_out_inside_an_input_is_refused(tmp_path):
    data = tmp_path / "ceval"
    (data / "val").mkdir(parents=True)
    before = _tree(tmp_path)
    with pytest.raises(CuteGPTError, match="--out .* lies inside the input folder"):
        run_recipe(RecipeConfig(out=str(data / "run"), eval_data=str(data)))
    assert _tree(tmp_path) == before


@pytest.mark.slow
def test_tiny_recipe_with_dpo(tmp_path, embedded_dir):
    """--dpo-steps: pairs from the SFT data (the SFT model's own answers rejected), DPO on the SFT adapter, and the
    export merges the DPO adapter."""
    out = tmp_path / "recipe"
    cfg = RecipeConfig(out=str(out), vocab_size=800, pt_steps=1, sft_steps=1, dpo_steps=2, max_length=64, micro_batch=2,
                       threads=1, max_new_tokens=4, eval_limit=1, eval_base=False)
    assert run_recipe(cfg) == 0
    steps = {s["name"]: s for s in json.loads((out / "recipe.json").read_text(encoding="utf-8"))["steps"]}
    assert all(s["status"] == "done" for s in steps.values()), {k: s["status"] for k, s in steps.items()}
    assert steps["preference pairs"]["info"]["pairs"] > 0
    dpo = steps["preference tuning (DPO)"]["info"]
    assert dpo["steps"] == 2 and "SFT adapter" in dpo["reference"]
    assert (out / "5b-dpo" / "final" / "adapter_model.safetensors").is_file() and (out / "6-merged").is_dir()


def test_checkpoints_go_once_final_is_written(tmp_path):
    from cutegpt.recipe import drop_checkpoints

    run = tmp_path / "5-sft"
    for name in ("checkpoint-1", "checkpoint-2/global_step2"):
        (run / name).mkdir(parents=True)
    (run / "checkpoint-1" / "optimizer.pt").write_bytes(b"x" * 1000)
    (run / "checkpoint-2" / "global_step2" / "states.pt").write_bytes(b"y" * 500)
    (run / "final").mkdir()
    (run / "final" / "adapter_model.safetensors").write_bytes(b"z" * 10)
    assert drop_checkpoints(run) == 0  # no summary.json: the step is not finished, its checkpoints stay
    assert (run / "checkpoint-1").is_dir()
    (run / "summary.json").write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.pt").write_bytes(b"k" * 100)
    (run / "checkpoint-3").symlink_to(outside, target_is_directory=True)  # never followed
    assert drop_checkpoints(run) == 1500
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-3", "final", "summary.json"]
    assert (outside / "keep.pt").read_bytes() == b"k" * 100 and (run / "final" / "adapter_model.safetensors").is_file()
