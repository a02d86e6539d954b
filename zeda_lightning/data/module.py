"""``ZedaDataModule``: local jsonl / json / parquet / text files through ``datasets.load_dataset``.

Row formats (one per file, detected per row):
    {"text": ...}                          loss on every token (pretraining, KL on plain text)
    {"prompt": ..., "response": ...}       loss on the response tokens only (stage-1 teacher samples)
    {"messages": [{"role", "content"}]}    chat template applied; loss on the last assistant turn only
Any row may carry ``"domain"`` (e.g. code / prose / math) for per-domain metrics.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import warnings
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer

from zeda_lightning.data import cache
from zeda_lightning.data.collate import IGNORE_INDEX, Collator, TokenBatch  # noqa: F401  (IGNORE_INDEX: API)
from zeda_lightning.data.dataset import TokenDataset
from zeda_lightning.data.encode import FEATURES, RowError, encode_rows, row_lengths
from zeda_lightning.data.files import (  # noqa: F401  (load_rows, TOKENIZER_FILES: API)
    MIN_VOCAB,
    TOKENIZER_FILES,
    _as_list,
    _builder,
    _check_file,
    _domains_of,
    _where,
    load_rows,
)
from zeda_lightning.data.pack import pack_rows
from zeda_lightning.data.sampler import EpochSampler

def _release_memory() -> None:
    """Return freed memory to the system after tokenising: Arrow's pool and glibc's heap keep the transient buffers
    of the json reader and the tokenizer otherwise (tens of MB per million rows), in every process that tokenised."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)


def _sampler_state(loader_state: dict[str, Any]) -> dict[str, int] | None:
    """The :class:`EpochSampler` state inside a ``StatefulDataLoader`` state (one process, or the snapshot of the
    main process with workers), or ``None``."""
    snapshot = loader_state.get("_snapshot")
    main = snapshot.get("_main_snapshot") if isinstance(snapshot, dict) else loader_state
    batches = loader_state.get("_steps_since_snapshot", 0) if isinstance(snapshot, dict) else 0
    state = ((main or {}).get("_sampler_iter_state") or {}).get("sampler_state")
    if not isinstance(state, dict) or not {"epoch", "position"} <= set(state):
        return None
    return {"epoch": int(state["epoch"]), "position": int(state["position"]), "batches": int(batches or 0)}


class ZedaDataModule(L.LightningDataModule):
    """Tokenised, masked batches for distillation and pretraining.

    Args:
        tokenizer: path of a transformers tokenizer (usually the teacher's directory).
        train_files: training file(s): .jsonl/.json/.parquet/.txt, optionally gzipped.
        val_files: validation file(s).
        test_files: test file(s).
        max_length: tokens per sequence; longer rows are truncated on the right.
        packing: concatenate ``text`` rows of the same domain into full ``max_length`` blocks (pretraining); else
            one row per sequence, padded per batch.
        batch_size: sequences per training batch (per process).
        eval_batch_size: sequences per validation / test batch (default: batch_size).
        num_workers: DataLoader workers.
        seed: seed of the training shuffle (epoch ``e`` is shuffled with ``seed + e``).
        add_eos: append the tokenizer's EOS to every text / response.
        prompts: also build left-padded prompt tensors (``prompt_ids``, ``prompt_mask``) for on-policy sampling;
            rows may then be prompt-only, and a ``text`` row's prompt is its first ``prompt_tokens`` tokens.
        prompt_tokens: prompt length cut from ``text`` rows when ``prompts`` is on.
        cache_dir: where tokenised splits are kept (default: ``zeda_tokens`` in the datasets cache,
            ``$HF_DATASETS_CACHE``). A split is tokenised once per content of its files, tokenizer and settings, by
            the first process that needs it; every other process and run memory-maps the result.

    Tokenised splits are Arrow files (int32 token ids, the label mask stored as where the loss starts), tokenised
    with batched calls of the fast tokenizer (:mod:`~zeda_lightning.data.encode`), packed with numpy
    (:mod:`~zeda_lightning.data.pack`) and cached (:mod:`~zeda_lightning.data.cache`). The training loader is a
    ``torchdata`` ``StatefulDataLoader`` over an :class:`~zeda_lightning.data.sampler.EpochSampler`: a run resumed
    from a checkpoint, mid-epoch or in a later epoch, sees the batches an uninterrupted run sees.
    """

    def __init__(
        self,
        tokenizer: str,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        max_length: int = 256,
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        add_eos: bool = True,
        prompts: bool = False,
        prompt_tokens: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        for name, value, least in (("max_length", max_length, 1), ("batch_size", batch_size, 1),
                                   ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0),
                                   ("prompt_tokens", prompt_tokens, 1)):
            if value is None and name == "eval_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"ZedaDataModule: {name} must be an integer >= {least}, got {value!r}; set "
                                 f"data.init_args.{name} to {'a positive number' if least else '0 or more'}")
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer
        self.files = {"train": _as_list(train_files), "val": _as_list(val_files), "test": _as_list(test_files)}
        self.max_length = max_length
        self.packing = packing
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.add_eos = add_eos
        self.prompts = prompts
        self.prompt_tokens = prompt_tokens
        self.cache_dir = cache_dir
        if prompts and packing:
            raise ValueError("ZedaDataModule: prompts=True needs packing=False (one prompt per row)")
        self.tokenizer = None
        self.domains: list[str] = []
        self.datasets: dict[str, Any] = {}
        self.cache_entries: dict[str, str] = {}  # split -> its cache directory
        self._checked = False
        self._train_loader: StatefulDataLoader | None = None
        self._train_sampler: EpochSampler | None = None
        self._resume: dict[str, Any] | None = None  # loader state from a checkpoint, for the next train loader

    # -- loading ---------------------------------------------------------------------------------------------
    def load_tokenizer(self):
        path = self.tokenizer_path
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer directory not found: {path}")
        fix = ("point data.init_args.tokenizer at the teacher's tokenizer directory (one written by "
               "tokenizer.save_pretrained)")
        if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
            raise ValueError(f"tokenizer directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, "
                             f"...); {fix}")
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        except Exception as err:  # a broken / foreign tokenizer raises many types; name the directory either way
            raise ValueError(f"tokenizer directory {path} could not be loaded "
                             f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); {fix}") from err
        if len(tok) < MIN_VOCAB:
            raise ValueError(f"tokenizer in {path} has only {len(tok)} tokens, no real vocabulary (are its vocab files "
                             f"missing?); {fix}")
        if self.add_eos and tok.eos_token_id is None:
            raise ValueError(f"tokenizer in {path} has no eos token, which add_eos appends to every row; set "
                             "eos_token in its tokenizer_config.json or data.init_args.add_eos: false")
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise ValueError(f"tokenizer in {path} has neither a pad nor an eos token to pad batches with; set "
                                 "pad_token in its tokenizer_config.json")
            tok.pad_token = tok.eos_token
        return tok

    def _settings(self) -> dict[str, Any]:
        """Everything besides the files and the tokenizer that changes the tokenised data."""
        return {"max_length": self.max_length, "packing": self.packing, "add_eos": self.add_eos,
                "prompts": self.prompts, "prompt_tokens": self.prompt_tokens, "chat_answer": True,
                "eos": self.tokenizer.eos_token_id if self.add_eos else None}

    def check(self) -> None:
        """Load, validate and tokenise every file, with the tokenizer: bad input (including a split too short for
        one packed block) fails here, before anything is written. ``setup`` reuses the result.

        A split already in the cache (same file contents, tokenizer and settings) is memory-mapped, not read or
        tokenised again: the cache only ever holds files that passed these checks."""
        if self._checked:
            return
        if not any(self.files.values()):
            raise ValueError("ZedaDataModule: no data files; set train_files / val_files / test_files")
        self.tokenizer = self.tokenizer or self.load_tokenizer()
        splits = [split for split, files in self.files.items() if files]
        root = self.cache_dir or cache.default_root()
        tokenizer, settings = cache.tokenizer_digest(self.tokenizer_path), self._settings()
        keys: dict[str, str] = {}
        metas: dict[str, dict[str, Any] | None] = {}
        loaded: dict[str, Any] = {}  # path -> checked rows; every new file is checked before any is tokenised
        for split in splits:
            for path in self.files[split]:
                _check_file(path)
            digests = [cache.file_digest(path, root) for path in self.files[split]]
            keys[split] = cache.entry_key(digests, tokenizer, settings)
            metas[split] = cache.read_entry(root, keys[split])
            if metas[split] is None:
                for path in self.files[split]:
                    if path not in loaded:
                        loaded[path] = load_rows(path, prompts_only=self.prompts, chat_answer=True)
        for split in splits:
            if metas[split] is None:
                parts = [(path, loaded[path]) for path in self.files[split]]
                metas[split] = cache.build_entry(root, keys[split],
                                                 lambda tmp, parts=parts, key=keys[split]: self._build(parts, tmp, key))
        if loaded:  # tokenised here: give the transient memory back (the result is memory-mapped)
            loaded.clear()
            _release_memory()
        self.domains = sorted(set().union(*(meta["domains"] for meta in metas.values())))
        for split in splits:
            if split in self.datasets:
                continue
            if self.packing:
                self._check_blocks(split, self.files[split], metas[split])
            self.datasets[split] = self._open(metas[split])
            self.cache_entries[split] = metas[split]["dir"]
        self._checked = True

    def prepare_data(self) -> None:
        self.check()  # Lightning calls this on one process per node first: it fills the cache the others read

    def setup(self, stage: str | None = None) -> None:
        self.check()  # tokenises once; later calls reuse self.datasets

    # -- tokenisation ------------------------------------------------------------------------------------------
    def _build(self, parts: list, tmp: str, key: str) -> dict[str, Any]:
        """Tokenise (and pack) one split's checked files into ``tmp``; returns the cache entry's meta."""
        domains = sorted(set().union(*(_domains_of(ds) for _, ds in parts)))
        encoded = []
        for j, (path, ds) in enumerate(parts):
            fn = encode_rows(self.tokenizer, add_eos=self.add_eos, prompt_tokens=self.prompt_tokens, domains=domains,
                             max_length=None if self.packing else self.max_length, tokenizer_name=self.tokenizer_path)
            try:
                encoded.append(ds.with_format("arrow").map(
                    fn, batched=True, batch_size=1000, with_indices=True, remove_columns=ds.column_names,
                    features=FEATURES, cache_file_name=os.path.join(tmp, f"rows-{j}.arrow"),
                    new_fingerprint=f"{key}-rows-{j}", load_from_cache_file=False,
                    desc=f"Tokenising {os.path.basename(path)}"))
            except RowError as err:
                raise ValueError(f"{path}, {_where(path, _builder(path), err.index)}: {err}") from None
        rows = datasets.concatenate_datasets(encoded) if len(encoded) > 1 else encoded[0]
        lengths = row_lengths(rows)
        dom = rows.data.table.column("domain").to_numpy().astype(np.int64)
        present, first = np.unique(dom, return_index=True)
        sums = np.bincount(dom + 1, weights=lengths, minlength=len(domains) + 1)
        names = {i: d for i, d in enumerate(domains)}
        meta = {"domains": domains, "rows": len(rows), "row_tokens": int(lengths.sum()),
                "domain_tokens": [[names.get(int(d), "(no domain)"), int(sums[d + 1])]
                                  for d in present[np.argsort(first)]]}
        if not self.packing:
            return {**meta, "files": [f"rows-{j}.arrow" for j in range(len(parts))]}
        blocks = pack_rows(rows, self.max_length, os.path.join(tmp, "blocks.arrow"), f"{key}-blocks")
        meta.update(files=["blocks.arrow"], blocks=len(blocks))
        del blocks, rows, encoded
        for j in range(len(parts)):
            os.remove(os.path.join(tmp, f"rows-{j}.arrow"))
        return meta

    def _open(self, meta: dict[str, Any]) -> TokenDataset:
        parts = [datasets.Dataset.from_file(os.path.join(meta["dir"], name)) for name in meta["files"]]
        data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return TokenDataset(data, [self.domains.index(d) for d in meta["domains"]])

    def _check_blocks(self, split: str, paths: list[str], meta: dict[str, Any]) -> None:
        """Packing drops each domain's last partial block (and training drops a partial batch): refuse a split that
        would be left with nothing instead of silently skipping validation or training."""
        n, files = self.max_length, paths[0] if len(paths) == 1 else f"{split} files {paths}"
        fix = f"give more {split} text, lower data.init_args.max_length, or set data.init_args.packing: false"
        blocks = meta["blocks"]
        if not blocks:
            total = meta["row_tokens"]
            if total < n:
                raise ValueError(f"{files}: {total} tokens, fewer than one packed block of max_length={n} (packing: "
                                 f"true), so the {split} split would be empty; {fix}")
            per = {name: count for name, count in meta["domain_tokens"]}
            raise ValueError(f"{files}: {total} tokens, but no domain has one full packed block of max_length={n} "
                             f"(blocks never mix domains; tokens per domain: {per}), so the {split} split would be "
                             f"empty; {fix}")
        if split == "train" and blocks < self.batch_size:
            raise ValueError(f"{files}: {blocks} packed blocks of max_length={n}, fewer than one batch of "
                             f"batch_size={self.batch_size} (a partial training batch is dropped), so training would "
                             f"see no data; {fix}, or lower data.init_args.batch_size")

    def collate(self, batch: TokenBatch | list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Padded batch tensors of rows (see :mod:`~zeda_lightning.data.collate`)."""
        return self._collator()(batch)

    def _collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id, self.prompts)

    # -- loaders -----------------------------------------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        """``(number of data-parallel processes, this one's rank)`` as Lightning would shard the training set."""
        trainer = self.trainer
        if trainer is None or not getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler",
                                          True):
            return 1, 0
        kwargs = trainer.distributed_sampler_kwargs or {}
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"ZedaDataModule: no {split} data; set {split}_files")
        data = self.datasets[split]
        if split != "train":
            return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self._collator(),
                              num_workers=self.num_workers)
        replicas, rank = self._replicas()
        sampler = EpochSampler(data, seed=self.seed, shuffle=shuffle, num_replicas=replicas, rank=rank,
                               batch_size=self.batch_size, drop_last_batch=self.packing)
        if self.trainer is not None:  # a loader made again mid-run (reload_dataloaders_every_n_epochs)
            sampler.set_epoch(self.trainer.current_epoch)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch >= 2.10
            warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated")
            loader = StatefulDataLoader(data, batch_size=self.batch_size, sampler=sampler,
                                        collate_fn=self._collator(), num_workers=self.num_workers,
                                        drop_last=self.packing)
        self._train_loader, self._train_sampler = loader, sampler
        if self._resume is not None:
            self._restore(self._resume)
            self._resume = None
        return loader

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # -- resuming ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, in the checkpoint's ``ZedaDataModule`` entry.

        Lightning also saves it with its loop state, but restores that only when the train loader is made after
        the checkpoint is loaded; a module that asks for ``trainer.estimated_stepping_batches`` in
        ``configure_optimizers`` makes it earlier (Lightning-AI/pytorch-lightning#20550), and the loop's copy is
        then dropped. The data module's own state is restored before that, or, with strategies that restore after
        setup, before the first batch is drawn."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loader_state = state.get("train_loader") if isinstance(state, dict) else None
        if not loader_state:
            return
        if self._train_loader is None:
            self._resume = loader_state  # applied by the next train_dataloader()
        else:
            self._restore(loader_state)

    def _restore(self, loader_state: dict[str, Any]) -> None:
        assert self._train_loader is not None and self._train_sampler is not None
        self._train_loader.load_state_dict(loader_state)  # the loader's next iterator starts there
        sampler_state = _sampler_state(loader_state)
        sampler = self._train_sampler
        if sampler_state is not None and not sampler.in_pass and not sampler_state["batches"]:
            # an iterator Lightning made before the restore has not drawn an index yet: its pass starts there too
            sampler.load_state_dict(sampler_state)
