"""The shipped real-model configs run end to end on real-architecture slices, 2 CPU processes (gloo, FSDP2).

What it runs
    For ``--model qwen3_30b_a3b`` or ``glm_4_7_flash``: the slice (``python -m zeda_lightning slice``: the real
    config.json cut to 2 MoE layers (GLM: + its dense first layer), random bf16 weights in the hub layout) is linked
    at the shipped YAML's teacher path inside a fresh run directory, a few thousand rows of the tiny corpus are
    written at its data paths, and ``python -m zeda_lightning fit --config configs/<model>/sft.yaml --config
    configs/slices/cpu_2proc.yaml`` runs there, so the shipped YAML runs unchanged but for what that override file
    and the flags below set (devices, steps, lengths, checkpoint interval, precision, trainable preset):

    ``router_only``          every run in ``bf16-true`` (``--precision``): the shipped ``bf16-mixed`` keeps fp32
    ``router_and_experts``   masters of the whole student, 3.7 GB more per process, and its peak of ~9.5 GB per
    ``full``                 process does not leave two of them room in 24 GB beside anything else; ``full`` is
                             tried and reported either way
    ``resume``               ``router_only`` again, SIGKILLed (the whole process group) after its step-2
                             checkpoint, then ``--ckpt_path last``: its losses must equal the uninterrupted run's
    then ``consolidate`` of the uninterrupted run's distributed checkpoint (tensors equal to its export), the export
    loaded with ``from_pretrained`` and its zero experts masked against transformers' own model built from the
    slice's config with the export's original-row weights (same logits), ``generate`` on the export, and (Qwen3)
    stage 2 with ``configs/<model>/opd.yaml`` from that export for a few steps, with rollouts gathered once and layer
    by layer, the step time split into sampling / scoring / update.

Memory
    Each process's resident set is sampled every 0.2 s and its high-water mark (``VmHWM``) read; the fixed part of
    a process (the interpreter with torch, Lightning, transformers and the package imported, gloo up: measured here
    in a process doing just that) is subtracted and the rest compared with ``python -m zeda_lightning estimate``
    for the same resolved config (fsdp2 row of the preset).

Output: a line per step of the plan on stderr, ONE JSON line on stdout.

    python bench/slice_runs.py --model qwen3_30b_a3b --slice /work/slices/qwen3 --work /work/runs/qwen3
"""

from __future__ import annotations

import argparse
import csv
import glob
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDE = os.path.join(ROOT, "configs", "slices", "cpu_2proc.yaml")
CORPUS = os.path.join(ROOT, "data", "tiny_corpus")
MIB = 1024**2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- process memory ----------------------------------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:", "PPid:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            ppid = _status(int(d)).get("PPid")
            if ppid is not None:
                children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def run_watched(cmd: list[str], cwd: str, logfile: str, kill_when=None, timeout: float = 3600,
                exporting=None) -> dict:
    """Run ``cmd`` in its own process group; peak memory of every python process in its tree (the high-water
    mark, and the largest resident set sampled before ``exporting()`` turns true: rank 0 gathers the whole student
    for the export at the end of fit, which is not a training-step peak); SIGKILL the group when ``kill_when()``
    turns true."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": ROOT,
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peaks: dict[int, int] = {}
    train: dict[int, int] = {}
    killed = False
    while proc.poll() is None:
        export_phase = exporting is not None and exporting()
        for pid in _tree(proc.pid):
            status = _status(pid)
            if status.get("VmHWM"):
                peaks[pid] = max(peaks.get(pid, 0), status["VmHWM"])
            if status.get("VmRSS") and not export_phase:
                train[pid] = max(train.get(pid, 0), status["VmRSS"])
        if kill_when is not None and not killed and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        if time.time() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{cmd} ran past {timeout} s; see {logfile}")
        time.sleep(0.2)
    big = [pid for pid, p in peaks.items() if p > 300 * 1024]  # drop tiny helper processes
    return {"returncode": proc.returncode, "killed": killed, "wall_s": round(time.time() - start, 1),
            "peak_mib_per_process": sorted((round(peaks[p] / 1024) for p in big), reverse=True),
            "train_peak_mib_per_process": sorted((round(train.get(p, 0) / 1024) for p in big), reverse=True),
            "log": logfile}


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024**2


def fixed_overhead_mib() -> float:
    """Peak RSS of 2 processes that import everything a fit imports and bring gloo up, and nothing more."""
    code = ("import sys, os, torch, torch.distributed as dist, lightning, transformers\n"
            "import zeda_lightning.cli  # noqa\n"
            "from transformers import Qwen3MoeForCausalLM  # noqa\n"
            "r = int(sys.argv[1]); os.environ.update(MASTER_ADDR='127.0.0.1')\n"
            "dist.init_process_group('gloo', rank=r, world_size=2); dist.barrier()\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
            "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    kib = [int(p.communicate()[0].strip()) for p in procs]
    return max(kib) / 1024


# -- a run directory in the shipped config's layout ----------------------------------------------------------------
def _rows(path: str, n: int) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def prepare(run: str, shipped: str, slice_dir: str, *, student: str | None = None) -> dict:
    """``run`` laid out as the shipped YAML expects: its teacher path -> the slice, its data paths -> tiny corpus
    rows (prompt/response rows cut from the text, so SFT and prompt-only loading both work)."""
    cfg = yaml.safe_load(open(shipped))
    args, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    os.makedirs(run, exist_ok=True)
    for rel in {args["teacher"], data["tokenizer"]}:
        link = os.path.join(run, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(slice_dir, link)
    if student is not None and args.get("student"):
        link = os.path.join(run, args["student"])
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(student, link)
    for key, src, n in (("train_files", "train.jsonl.gz", 400), ("val_files", "val.jsonl.gz", 40)):
        rows = []
        for r in _rows(os.path.join(CORPUS, src), n):
            text = r["text"]
            cut = max(1, len(text) // 3)
            rows.append({"prompt": text[:cut], "response": text[cut:]})
        files = data[key] if isinstance(data[key], list) else [data[key]]
        for rel in files:
            _write_jsonl(os.path.join(run, rel), rows)
    return cfg


def write_override(run: str, cfg: dict, *, every: int, steps: int, precision: str | None, extra: dict) -> str:
    """The per-run part of the override: the shipped checkpoint callback with a shorter interval, steps."""
    callbacks = []
    for cb in cfg["trainer"].get("callbacks") or []:
        cb = json.loads(json.dumps(cb))
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = every
        callbacks.append(cb)
    trainer = {"callbacks": callbacks, "max_steps": steps, "val_check_interval": steps, "enable_progress_bar": False}
    if precision:
        trainer["precision"] = precision
    path = os.path.join(run, "override.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"trainer": trainer, **extra}, f)
    return path


def metrics(run: str, cfg: dict, version: int | None = None) -> list[dict]:
    log_cfg = cfg["trainer"]["logger"]["init_args"]
    root = os.path.join(run, log_cfg["save_dir"], log_cfg.get("name", "lightning_logs"))
    versions = sorted(glob.glob(os.path.join(root, "version_*")), key=lambda p: int(p.rsplit("_", 1)[1]))
    if not versions:
        return []
    path = os.path.join(versions[-1 if version is None else version], "metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def checkpoint_dir(run: str, cfg: dict) -> str:
    cb = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    return os.path.join(run, cb["init_args"]["dirpath"])


def export_dir(run: str, cfg: dict) -> str:
    return os.path.join(run, cfg["model"]["init_args"]["export_dir"])


def estimate(run: str, configs: list[str], preset: str) -> dict:
    """``python -m zeda_lightning estimate`` for the resolved config: the fsdp2 row of ``preset``."""
    cmd = [sys.executable, "-m", "zeda_lightning", "estimate", *sum((["--config", c] for c in configs), []),
           "--model.init_args.trainable", preset]
    out = subprocess.run(cmd, cwd=run, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts[:2] == [preset, "fsdp2"]:
            breakdown = dict(p.split("=") for p in parts[6:])
            return {"gib_per_process": float(parts[5]), "breakdown_gib": {k: float(v) for k, v in breakdown.items()}}
    raise RuntimeError(f"no {preset} fsdp2 row in:\n{out.stdout}")


# -- the plan -------------------------------------------------------------------------------------------------
def fit_run(name: str, work: str, model: str, slice_dir: str, *, preset: str, precision: str | None, steps: int,
            every: int, fixed: float, kill_after_ckpt: float | None = None, stage: str = "sft",
            student: str | None = None, extra: dict | None = None, fits_gib: float | None = None) -> dict:
    run = os.path.join(work, name)
    shutil.rmtree(run, ignore_errors=True)  # this script's own run directory
    shipped = os.path.join(ROOT, "configs", model, f"{stage}.yaml")
    cfg = prepare(run, shipped, slice_dir, student=student)
    override = write_override(run, cfg, every=every, steps=steps, precision=precision, extra=extra or {})
    configs = [shipped, OVERRIDE, override]
    cmd = [sys.executable, "-m", "zeda_lightning", "fit", *sum((["--config", c] for c in configs), []),
           "--model.init_args.trainable", preset]
    kill_when = None
    if kill_after_ckpt is not None:
        last = os.path.join(checkpoint_dir(run, cfg), "last.ckpt")
        seen: list[float] = []

        def kill_when() -> bool:
            if not seen and os.path.exists(os.path.join(last, ".metadata")):
                seen.append(time.time())
            return bool(seen) and time.time() - seen[0] > kill_after_ckpt

    parent, name_ = os.path.split(export_dir(run, cfg))

    def exporting() -> bool:  # the export's staging directory (.<name>.tmp-*) or the export itself appeared
        return os.path.isdir(parent) and any(e == name_ or e.startswith(f".{name_}.tmp-") for e in os.listdir(parent))

    if fits_gib is not None:  # refuse what the estimate says 2 processes cannot hold here, before building
        est = estimate(run, configs, preset)
        need = 2 * (est["gib_per_process"] + fixed / 1024)
        if need > fits_gib:
            log(f"{name}: skipped, estimate {est['gib_per_process']} GiB per process: 2 processes need {need:.1f} GiB "
                f"of the {fits_gib:.1f} GiB available")
            return {"name": name, "preset": preset, "estimate": est, "run": run, "cfg": cfg, "configs": configs,
                    "error": f"does not fit: 2 x {est['gib_per_process']} GiB + fixed > {fits_gib:.1f} GiB available"}
    log(f"{name}: fit {model} {stage} {preset} precision={precision or 'shipped'} steps={steps}")
    res = run_watched(cmd, run, os.path.join(run, "fit.log"), kill_when=kill_when, exporting=exporting)
    res.update(name=name, preset=preset, precision=precision or cfg["trainer"]["precision"], run=run, cfg=cfg,
               configs=configs)
    if res["returncode"] and not res["killed"]:
        tail = open(res["log"]).read()[-3000:]
        oom = res["returncode"] in (-9, 137) or "MemoryError" in tail or "Killed" in tail
        res["error"] = "out of memory" if oom else tail.strip().splitlines()[-1]
        log(f"{name}: failed ({res['error']}), rc {res['returncode']}")
        return res
    res["fixed_mib"] = round(fixed)
    if not res["killed"]:
        res["estimate"] = estimate(run, configs, preset)
        measured = max(res["train_peak_mib_per_process"]) - fixed
        res["measured_gib"] = round(measured / 1024, 2)
        res["estimate_ratio"] = round(res["measured_gib"] / res["estimate"]["gib_per_process"], 3)
    log(f"{name}: rc {res['returncode']} wall {res['wall_s']} s peak {res['peak_mib_per_process']} MiB "
        f"est {res.get('estimate', {}).get('gib_per_process')} GiB measured {res.get('measured_gib')} GiB")
    return res


def resume(res: dict) -> dict:
    run, cfg = res["run"], res["cfg"]
    cmd = [sys.executable, "-m", "zeda_lightning", "fit", *sum((["--config", c] for c in res["configs"]), []),
           "--model.init_args.trainable", res["preset"], "--ckpt_path", "last"]
    log(f"{res['name']}: resume --ckpt_path last")
    out = run_watched(cmd, run, os.path.join(run, "resume.log"))
    if out["returncode"]:
        raise RuntimeError(f"resume failed: see {out['log']}")
    return out


def parity(export: str, slice_dir: str) -> dict:
    """The export, zero experts masked, against transformers' own model of the slice's config holding the export's
    original-row weights (the zero rows dropped): the same logits."""
    code = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM
from zeda_lightning.adapters import set_zero_mask
from zeda_lightning.export import from_pretrained
from zeda_lightning.routing import iter_routers
export, slice_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
student = from_pretrained(export, dtype=torch.bfloat16).eval()
set_zero_mask(student, True)
state = student.state_dict()
n = {name: r for name, r in student.named_modules() if r in set(iter_routers(student))}
for name, r in n.items():
    for key in list(state):
        if key.startswith(name + ".") and state[key].dim() >= 1 and state[key].shape[0] == r.weight.shape[0]:
            state[key] = state[key][: r.num_experts]
ref = AutoModelForCausalLM.from_pretrained(slice_dir, dtype=torch.bfloat16).eval()  # transformers' own model
ref_keys = set(ref.state_dict())
missing, unexpected = ref.load_state_dict({k: v for k, v in state.items() if k in ref_keys}, strict=False)
ids = torch.randint(3, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a = student(input_ids=ids).logits.float(); b = ref(input_ids=ids).logits.float()
print(json.dumps({"max_abs_diff": (a - b).abs().max().item(), "equal": bool(torch.equal(a, b)),
                  "missing": [k for k in missing if "rotary" not in k][:5], "unexpected": list(unexpected)[:5]}))
'''
    out = subprocess.run([sys.executable, "-c", code, export, slice_dir], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_dirs(a: str, b: str) -> dict:
    code = r'''
import json, sys
from safetensors.torch import load_file
import glob, os, torch
def load(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out
x, y = load(sys.argv[1]), load(sys.argv[2])
print(json.dumps({"tensors": len(x), "same_keys": set(x) == set(y),
                  "all_equal": set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)}))
'''
    out = subprocess.run([sys.executable, "-c", code, a, b], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeda_lightning", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["qwen3_30b_a3b", "glm_4_7_flash"], required=True)
    p.add_argument("--slice", required=True, help="slice directory (written with `slice` if missing)")
    p.add_argument("--work", required=True, help="directory for this script's run directories")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--runs", nargs="+", default=["router_only", "resume", "router_and_experts", "full", "opd"],
                   choices=["router_only", "resume", "router_and_experts", "full", "opd"])
    p.add_argument("--kill-after", type=float, default=5.0, help="seconds after the step-2 checkpoint to SIGKILL")
    p.add_argument("--opd-steps", type=int, default=3)
    p.add_argument("--gathers", nargs="+", default=["once", "per_layer"], choices=["once", "per_layer"],
                   help="OPD runs: rollouts gathered once, and layer by layer")
    p.add_argument("--reuse", action="store_true", help="without router_only in --runs: start OPD from the export of "
                   "an earlier router_only run in --work")
    p.add_argument("--precision", default="bf16-true", help="trainer.precision of every run ('' = the shipped one)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    if not os.path.isfile(os.path.join(args.slice, "config.json")):
        log(f"writing the slice to {args.slice}")
        out = cli("slice", "--model", args.model, "--out", args.slice)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
    os.makedirs(args.work, exist_ok=True)
    fixed = fixed_overhead_mib()
    log(f"fixed overhead per process: {fixed:.0f} MiB")
    result: dict = {"model": args.model, "fixed_mib_per_process": round(fixed), "runs": {}}
    keep = ("returncode", "wall_s", "peak_mib_per_process", "train_peak_mib_per_process", "precision", "estimate", "measured_gib",
            "estimate_ratio", "error")
    base = None
    reused = os.path.join(args.work, "router_only")
    shipped = os.path.join(ROOT, "configs", args.model, "sft.yaml")
    if args.reuse and "router_only" not in args.runs and os.path.isdir(export_dir(reused, yaml.safe_load(open(shipped)))):
        base = {"run": reused, "cfg": yaml.safe_load(open(shipped)), "name": "router_only"}  # an earlier run's export
        log(f"reusing {reused}")
    elif "router_only" in args.runs or "resume" in args.runs or "opd" in args.runs:
        base = fit_run("router_only", args.work, args.model, args.slice, preset="router_only", precision=args.precision,
                       steps=args.steps, every=2, fixed=fixed)
    if base is not None and "router_only" in args.runs:
        result["runs"]["router_only"] = {k: base[k] for k in keep if k in base}
        if not base.get("error"):
            rows = metrics(base["run"], base["cfg"])
            result["runs"]["router_only"]["losses"] = series(rows, "train/loss")
            result["runs"]["router_only"]["zero_ratio"] = series(rows, "train/zero_ratio")
            result["runs"]["router_only"]["val"] = {k: v for k, v in rows[-1].items() if k.startswith("val/") and v}
    if "resume" in args.runs and base is not None and not base.get("error"):
        killed = fit_run("resume", args.work, args.model, args.slice, preset="router_only", precision=args.precision,
                         steps=args.steps, every=2, fixed=fixed, kill_after_ckpt=args.kill_after)
        resumed = resume(killed)
        after = series(metrics(killed["run"], killed["cfg"]), "train/loss")
        before = result["runs"]["router_only"]["losses"]
        common = sorted(set(after) & set(before))
        result["runs"]["resume"] = {
            "killed": killed["killed"], "resumed_steps": common,
            "bit_identical": bool(common) and all(after[s] == before[s] for s in common),
            "max_abs_diff": max((abs(after[s] - before[s]) for s in common), default=None),
            "resume_wall_s": resumed["wall_s"],
        }
        log(f"resume: steps {common} identical={result['runs']['resume']['bit_identical']}")
    if base is not None and not base.get("error"):
        ckpt = os.path.join(checkpoint_dir(base["run"], base["cfg"]), "last.ckpt")
        consolidated = os.path.join(args.work, "consolidated")
        shutil.rmtree(consolidated, ignore_errors=True)
        t = time.time()
        out = cli("consolidate", "--ckpt", ckpt, "--out", consolidated, cwd=base["run"])  # where fit ran
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        export = export_dir(base["run"], base["cfg"])
        result["consolidate"] = {"wall_s": round(time.time() - t, 1), **compare_dirs(consolidated, export)}
        result["parity"] = parity(export, args.slice)
        t = time.time()
        out = cli("generate", "--model", export, "--prompt", "def main():", "--max_new_tokens", "8")
        result["generate"] = {"returncode": out.returncode, "wall_s": round(time.time() - t, 1),
                              "output": out.stdout.strip()[-300:]}
        log(f"consolidate {result['consolidate']} parity {result['parity']} generate rc {out.returncode}")
    for preset in ("router_and_experts", "full"):
        if preset in args.runs:
            res = fit_run(preset, args.work, args.model, args.slice, preset=preset, precision=args.precision,
                          steps=2, every=2, fixed=fixed, fits_gib=available_gib())
            result["runs"][preset] = {k: res[k] for k in keep if k in res}
    if "opd" in args.runs and base is not None and not base.get("error"):
        export = export_dir(base["run"], base["cfg"])
        result["opd"] = {}
        for gather in args.gathers:
            res = fit_run(f"opd_{gather}", args.work, args.model, args.slice, preset="router_only",
                          precision=args.precision, steps=args.opd_steps, every=args.opd_steps, fixed=fixed,
                          stage="opd", student=export,
                          extra={"model": {"init_args": {"max_new_tokens": 16, "rollout_gather": gather}},
                                 "data": {"init_args": {"max_length": 48}}})
            entry = {k: res[k] for k in keep if k in res}
            if not res.get("error"):
                rows = metrics(res["run"], res["cfg"])
                split = {k: series(rows, f"train/{k}") for k in ("time_sample_s", "time_score_s", "time_step_s")}
                steps = sorted(split["time_step_s"])[1:] or sorted(split["time_step_s"])  # the first step warms up
                mean = {k: sum(v[s] for s in steps) / len(steps) for k, v in split.items()}
                entry["time_split_s"] = {"sample": round(mean["time_sample_s"], 2),
                                         "score": round(mean["time_score_s"], 2),
                                         "update": round(mean["time_step_s"] - mean["time_sample_s"] - mean["time_score_s"], 2)}
                entry["reverse_kl"] = series(rows, "train/reverse_kl")
                entry["sampling_tokens_per_s"] = series(rows, "train/sampling_tokens_per_s")
            result["opd"][gather] = entry
        if all("time_split_s" in result["opd"][g] for g in ("once", "per_layer")):
            result["opd"]["rollout_speedup_once"] = round(result["opd"]["per_layer"]["time_split_s"]["sample"]
                                                          / result["opd"]["once"]["time_split_s"]["sample"], 2)
    result["wall_s"] = round(time.time() - start)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
