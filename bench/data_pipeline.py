"""Throughput and memory of ``ZedaDataModule`` setup: batched, cached Arrow tokenisation against the row-by-row path.

What it measures
    Data: ``--rows`` (50,000) synthetic prompt / response rows of about 240 tokens with the shipped tokenizer
    (``assets/tiny_teacher``), three domains, generated from a seeded word list into a temporary directory (same
    bytes every run). Settings: ``max_length=256``, no packing, ``add_eos`` (``configs/tiny.yaml``'s module otherwise).

    1. ``baseline``: the data path this module had before (kept here only, as the reference): ``load_rows`` with the
       row-by-row check, then one tokenizer call per prompt and per response, rows kept as Python lists of ints.
    2. ``new, first run``: ``ZedaDataModule(...).setup()`` with an empty cache: files hashed, checked on Arrow
       columns, tokenised with batched calls of the fast tokenizer in a ``datasets`` batched map, written as Arrow.
    3. ``new, cached``: a second ``ZedaDataModule`` in a new process, same files and settings: hashes the files,
       loads the tokenizer, memory-maps the cached split (what every other rank and every later run does).
    4. ``tokenizer alone``: ``encode_batch_fast`` over the same prompts and responses, nothing else: the ceiling
       for any tokenising path on this machine and thread count.
    rows/s = rows / wall seconds of setup, imports excluded. Memory: each case runs in its own interpreter (this
    script re-invoked with a hidden flag); RSS (``/proc/self/statm``) right before and after setup, after a
    ``gc.collect()``; bytes per token = RSS growth / tokens of the split. Peak RSS growth is reported alongside.
    Every case gets its own empty datasets cache (``HF_DATASETS_CACHE``), so the json-to-Arrow conversion of
    ``load_dataset`` is paid by the baseline and the first run alike. The baseline and the new path must produce the
    same token ids and labels (a hash over both is compared).

Threads
    ``--threads`` (1) sets ``OMP_NUM_THREADS`` and ``RAYON_NUM_THREADS`` (the Rust tokenizer's pool) in every
    case. The first run is also timed with the tokenizer's default pool (all cores: ``rows_per_s_all_cores``), as
    rank 0 of a real node would run it. On a machine shared with other jobs, run it alone and compare ratios.

    python bench/data_pipeline.py [--rows 50000] [--threads 1] [--quick]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "assets", "tiny_teacher")
MAX_LENGTH = 256
WORDS = ("the river number runs past old mill and children watch boats go by def return value while for in data "
         "model expert token router zero teacher student loss gradient layer weight sum mean list map filter sort "
         "north south east west light dark stone water fire wind tree leaf root branch seed grow fall rise").split()
TARGETS = {"rows_per_s": 16_800, "bytes_per_token": 8.0, "cached_setup_s": 2.0}


def write_rows(path: str, n: int) -> None:
    """``n`` prompt / response rows (~80 + ~160 tokens), seeded: the same file every run."""
    r = random.Random(0)

    def words(k: int) -> str:
        return " ".join(r.choice(WORDS) + (str(r.randint(0, 99)) if r.random() < 0.2 else "") for _ in range(k))

    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"Q{i}: " + words(31), "response": words(66), "domain": ("code", "prose", "math")[i % 3]}
            f.write(json.dumps(row) + "\n")


# -- measurement in a fresh interpreter -----------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _digest(ids, labels) -> str:
    import numpy as np

    h = hashlib.sha256()
    h.update(np.asarray(ids, dtype=np.int32).tobytes())
    h.update(np.asarray(labels, dtype=np.int32).tobytes())
    return h.hexdigest()


def baseline_setup(path: str):
    """The previous data path: row-by-row check and tokenisation, rows as Python lists (reference only)."""
    import datasets

    from zeda_lightning.data.collate import IGNORE_INDEX
    from zeda_lightning.data.files import _builder, _row_problem, _where
    from zeda_lightning.data.module import ZedaDataModule

    dm = ZedaDataModule(tokenizer=TOKENIZER, train_files=path, max_length=MAX_LENGTH)
    tok = dm.load_tokenizer()
    ds = datasets.load_dataset("json", data_files=path, split="train")
    cols, needed = set(ds.column_names), "'text', 'prompt' and 'response' or 'messages'"
    for i, row in enumerate(ds):
        problem = _row_problem(row, cols, False, True, needed)
        if problem:
            raise ValueError(f"{path}, {_where(path, _builder(path), i)}: {problem}")
    domains = sorted({d for d in ds["domain"] if d})
    index, eos, rows = {d: i for i, d in enumerate(domains)}, [tok.eos_token_id], []
    for row in ds:
        prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        response_ids = tok(row["response"], add_special_tokens=False)["input_ids"] + eos
        ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        rows.append({"input_ids": ids[:MAX_LENGTH], "labels": labels[:MAX_LENGTH],
                     "domain": index.get(row.get("domain"), -1), "prompt_len": min(len(prompt_ids), MAX_LENGTH)})
    return rows


def _baseline_digest(rows) -> tuple[int, str]:
    ids = [t for r in rows for t in r["input_ids"]]
    labels = [t for r in rows for t in r["labels"]]
    return len(ids), _digest(ids, labels)


def _new_digest(dm) -> tuple[int, str]:
    import numpy as np
    import pyarrow.compute as pc

    table = dm.datasets["train"].table
    column = table.column("input_ids").combine_chunks()
    ids = column.flatten().to_numpy()
    lengths = pc.list_value_length(column).to_numpy()
    row = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(ids)) - np.concatenate([[0], np.cumsum(lengths)[:-1]])[row]
    labels = np.where(pos >= table.column("loss_start").to_numpy()[row], ids, -100)
    return len(ids), _digest(ids, labels)


def tokenizer_alone(path: str) -> tuple[int, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    backend, step = tok.backend_tokenizer, 1000
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(rows), step):
        for key in ("prompt", "response"):
            tokens += sum(len(e.ids) for e in backend.encode_batch_fast([r[key] for r in rows[i : i + step]],
                                                                        add_special_tokens=False))
    return tokens, time.perf_counter() - start


def worker(case: str, path: str, cache_dir: str) -> dict:
    import datasets
    import torch  # noqa: F401  (imports before the baseline RSS)
    import transformers  # noqa: F401

    from zeda_lightning.data.module import ZedaDataModule

    datasets.disable_progress_bars()
    if case == "tokenizer":
        tokens, seconds = tokenizer_alone(path)
        return {"seconds": seconds, "tokens": tokens}
    gc.collect()
    rss0, peak0 = _rss(), _peak()
    start = time.perf_counter()
    if case == "baseline":
        result = baseline_setup(path)
    else:
        result = ZedaDataModule(tokenizer=TOKENIZER, train_files=path, max_length=MAX_LENGTH, cache_dir=cache_dir)
        result.setup("fit")
    seconds = time.perf_counter() - start
    gc.collect()
    rss1, peak1 = _rss(), _peak()
    tokens, digest = _baseline_digest(result) if case == "baseline" else _new_digest(result)
    return {"seconds": seconds, "rss_growth": rss1 - rss0, "peak_growth": max(peak1 - max(peak0, rss0), 0),
            "tokens": tokens, "rows": len(result) if case == "baseline" else len(result.datasets["train"]),
            "digest": digest}


def run_case(case: str, path: str, cache_dir: str, hf_cache: str, threads: int | None) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": hf_cache, "TOKENIZERS_PARALLELISM": "true"}
    for key in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        env.pop(key, None)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads), RAYON_RS_NUM_CPUS=str(threads))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", case, "--data", path, "--cache",
                           cache_dir], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5,000 rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.cache)))
        return
    rows = 5_000 if args.quick else args.rows
    tmp = tempfile.mkdtemp(prefix="zeda_data_bench_")
    try:
        path = os.path.join(tmp, "rows.jsonl")
        write_rows(path, rows)
        hf = lambda name: os.path.join(tmp, f"hf_{name}")  # noqa: E731
        base = run_case("baseline", path, os.path.join(tmp, "unused"), hf("baseline"), args.threads)
        first = run_case("new", path, os.path.join(tmp, "cache"), hf("new"), args.threads)
        cached = run_case("new", path, os.path.join(tmp, "cache"), hf("new"), args.threads)
        all_cores = run_case("new", path, os.path.join(tmp, "cache_all"), hf("all"), None)
        alone = run_case("tokenizer", path, "", hf("tok"), args.threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if (base["digest"], base["tokens"]) != (first["digest"], first["tokens"]) or first["digest"] != cached["digest"]:
        raise SystemExit("the new data path gives other tokens or labels than the baseline")
    tokens = first["tokens"]
    rate = {name: rows / case["seconds"] for name, case in
            (("baseline", base), ("first", first), ("all", all_cores), ("tokenizer", alone))}
    bpt = {name: case["rss_growth"] / tokens for name, case in (("baseline", base), ("first", first),
                                                                 ("cached", cached))}
    peak = {name: case["peak_growth"] / tokens for name, case in (("baseline", base), ("first", first),
                                                                   ("cached", cached))}
    print(f"{rows} rows, {tokens / rows:.0f} tokens/row, {args.threads} thread(s), max_length {MAX_LENGTH}\n")
    print("| path | setup s | rows/s | vs baseline | RSS growth B/token | peak B/token |")
    print("|---|---|---|---|---|---|")
    print(f"| baseline (row by row, lists) | {base['seconds']:.2f} | {rate['baseline']:,.0f} | 1.00x | "
          f"{bpt['baseline']:.1f} | {peak['baseline']:.1f} |")
    print(f"| new, first run (tokenises) | {first['seconds']:.2f} | {rate['first']:,.0f} | "
          f"{rate['first'] / rate['baseline']:.2f}x | {bpt['first']:.2f} | {peak['first']:.2f} |")
    print(f"| new, cached (other ranks, later runs) | {cached['seconds']:.2f} | {rows / cached['seconds']:,.0f} | "
          f"{base['seconds'] / cached['seconds']:.0f}x | {bpt['cached']:.2f} | {peak['cached']:.2f} |")
    print(f"| new, first run, tokenizer's default pool | {all_cores['seconds']:.2f} | {rate['all']:,.0f} | "
          f"{rate['all'] / rate['baseline']:.2f}x | - | - |")
    print(f"| tokenizer alone (encode_batch_fast) | {alone['seconds']:.2f} | {rate['tokenizer']:,.0f} | "
          f"{rate['tokenizer'] / rate['baseline']:.2f}x | - | - |")
    print(f"\nnew first run = {rate['first'] / rate['tokenizer']:.0%} of the tokenizer alone; "
          f"targets: rows/s >= {TARGETS['rows_per_s']:,}, bytes/token <= {TARGETS['bytes_per_token']:g}, "
          f"cached setup < {TARGETS['cached_setup_s']:g} s")
    result = {
        "rows": rows, "tokens": tokens, "threads": args.threads,
        "rows_per_s": round(rate["first"]), "baseline_rows_per_s": round(rate["baseline"]),
        "speedup": round(rate["first"] / rate["baseline"], 2),
        "rows_per_s_all_cores": round(rate["all"]), "tokenizer_alone_rows_per_s": round(rate["tokenizer"]),
        "cached_setup_s": round(cached["seconds"], 3), "baseline_setup_s": round(base["seconds"], 2),
        "bytes_per_token": round(max(bpt["first"], bpt["cached"]), 2),
        "bytes_per_token_first_run": round(bpt["first"], 2), "bytes_per_token_cached": round(bpt["cached"], 2),
        "baseline_bytes_per_token": round(bpt["baseline"], 1),
        "peak_bytes_per_token": round(peak["first"], 2), "baseline_peak_bytes_per_token": round(peak["baseline"], 1),
        "same_tokens_as_baseline": True,
        "meets": {"rows_per_s": rate["first"] >= TARGETS["rows_per_s"],
                  "bytes_per_token": max(bpt["first"], bpt["cached"]) <= TARGETS["bytes_per_token"],
                  "cached_setup_s": cached["seconds"] < TARGETS["cached_setup_s"]},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
