"""bench/recipes.py ``--quick``: the four recipes (SFT on teacher samples, forward KL, each then OPD) and the
teacher run end to end on one thread, and every figure in the JSON line and the written files is sane."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = {"teacher", "sft", "sft+opd", "fkl", "fkl+opd"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _strict(constant):
    pytest.fail(f"non-strict JSON constant {constant}")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    work = tmp_path_factory.mktemp("recipes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "recipes.py"), "--quick", "--out", str(work / "runs"),
           "--json", str(work / "recipes.json"), "--csv", str(work / "recipes.csv")]
    proc = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and proc.stdout.strip().splitlines()[-1] == lines[-1], proc.stdout[-2000:]  # ends with the JSON
    return json.loads(lines[-1], parse_constant=_strict), work, proc.stdout


def test_every_recipe_ran_and_is_sane(result):
    out, _, _ = result
    assert out["bench"] == "recipes" and out["quick"] is True
    rows = {r["recipe"]: r for r in out["rows"]}
    assert set(rows) == RECIPES and len(out["rows"]) == 5
    teacher = rows["teacher"]
    assert teacher["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5) and teacher["top1_agreement"] == pytest.approx(1.0)
    assert teacher["zero_ratio"] == 0.0 and teacher["nll"] == pytest.approx(teacher["teacher_nll"], abs=1e-4)
    for r in out["rows"]:
        for key in ("nll", "teacher_nll", "kl_to_teacher", "reverse_kl", "top1_agreement", "zero_ratio",
                    "sampled_zero_ratio", "lmeval_acc"):
            assert _finite(r[key]), (r["name"], key)
        assert r["nll"] > teacher["nll"] - 0.01, r["name"]  # no student beats its teacher by more than noise
        assert r["kl_to_teacher"] >= -1e-6 and r["reverse_kl"] >= -1e-6
        assert 0.0 <= r["zero_ratio"] <= 1.0 and 0.0 <= r["sampled_zero_ratio"] <= 1.0
        assert 0.0 <= r["top1_agreement"] <= 1.0 and 0.0 <= r["lmeval_acc"] <= 1.0
        if r["recipe"] != "teacher":
            assert r["zero_ratio"] > 0.05  # zero experts injected and chosen (L_GA target 0.5)
            assert r["kl_to_teacher"] > 0 and r["reverse_kl"] > 0 and _finite(r["train_seconds"])
    assert out["group_w"] == pytest.approx(2.0)  # target 0.5 with N_Z = N / 2: the paper's w
    assert out["stage1_data"]["rows"] == 2 * out["stage1_data"]["prompts"] > 0  # 2 teacher samples per prompt
    assert out["stage1_data"]["new_tokens"] > 0


def test_stage2_deltas_pair_each_opd_run_with_its_stage1(result):
    out, _, _ = result
    deltas = {d["name"]: d for d in out["stage2_deltas"]}
    by_name = {r["name"]: r for r in out["rows"]}
    assert len(deltas) == 2
    for name, d in deltas.items():
        opd, base = by_name[name], by_name[d["from"]]
        assert opd["recipe"] == base["recipe"] + "+opd"
        for key in ("nll", "kl_to_teacher", "reverse_kl"):
            assert d[key] == pytest.approx(opd[key] - base[key], abs=2e-4)


def test_written_files_and_table(result):
    out, work, stdout = result
    with open(work / "recipes.json") as f:
        saved = json.load(f, parse_constant=_strict)
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in out["rows"]]
    assert saved["settings"]["stage1_steps"] == 6 and saved["settings"]["target"] == 0.5
    assert (work / "recipes.csv").read_text().count("\n") == 1 + len(out["rows"])
    assert os.path.isfile(work / "runs" / "stage1.jsonl")  # the teacher's samples, kept with --out
    for name in ("teacher", "sft@0.001", "fkl@0.001+opd@0.0001"):
        assert name in stdout


def _part(tmp_path, name, rows, **settings):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import recipes

    summary = {"bench": "recipes", "settings": {"stage1_steps": 200, **settings}, "group_w": 2.0, "rows": rows,
               "stage1_data": {"rows": 4} if any(r["recipe"] == "sft" for r in rows) else None, "seconds": 10.0,
               "sft_lrs": [1e-3] if any(r["recipe"] == "sft" for r in rows) else [], "kl_lrs": [], "opd_lrs": [1e-4]}
    path = str(tmp_path / f"{name}.json")
    recipes.write_results(path, summary)
    return recipes, path


def test_merge_keeps_one_teacher_and_recomputes_deltas(tmp_path):
    teacher = {"name": "teacher", "recipe": "teacher", "nll": 2.0, "kl_to_teacher": 0.0}
    sft = [teacher, {"name": "sft@0.001", "recipe": "sft", "nll": 2.3, "kl_to_teacher": 0.2},
           {"name": "sft@0.001+opd@0.0001", "recipe": "sft+opd", "from": "sft@0.001", "nll": 2.2,
            "kl_to_teacher": 0.1}]
    fkl = [teacher, {"name": "fkl@0.001", "recipe": "fkl", "nll": 2.1, "kl_to_teacher": 0.05}]
    recipes, a = _part(tmp_path, "a", sft)
    _, b = _part(tmp_path, "b", fkl)
    merged = recipes.merge([a, b])
    assert [r["name"] for r in merged["rows"]] == ["teacher", "sft@0.001", "sft@0.001+opd@0.0001", "fkl@0.001"]
    (d,) = merged["stage2_deltas"]
    assert d["from"] == "sft@0.001" and d["nll"] == pytest.approx(-0.1) and d["kl_to_teacher"] == pytest.approx(-0.1)
    assert merged["stage1_data"] == {"rows": 4} and merged["merged_from"] == 2
    _, c = _part(tmp_path, "c", fkl, stage1_steps=100)
    with pytest.raises(ValueError, match="stage1_steps"):
        recipes.merge([a, c])
