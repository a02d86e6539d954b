"""``LMPretrainModule`` (how the embedded teacher is made): a short fit logs per-domain validation NLL."""

from __future__ import annotations

import json

import lightning as L
import pytest

from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.modules import LMPretrainModule

CONFIG = dict(model_type="qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
              num_experts_per_tok=2, max_position_embeddings=64)


@pytest.mark.parametrize("domains", [["code"], ["code", "math", "prose"]])
def test_validation_logs_each_domains_nll(tmp_path, tiny_teacher, tiny_data, domains):
    """One domain used to crash validation (``iteration over a 0-d tensor``): torchmetrics squeezes a 1-group state."""
    rows = [json.loads(line) for line in open(tiny_data["train"])]
    rows = [r for r in rows if r["domain"] in domains][:24]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ZedaDataModule(tiny_teacher, train_files=str(path), val_files=str(path), max_length=32, batch_size=4,
                        cache_dir=str(tmp_path / "cache"))
    module = LMPretrainModule({**CONFIG, "vocab_size": 300}, domains=domains)
    logged = {}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=2, val_check_interval=2,
                        check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/nll/")}
    assert sorted(logged) == [f"val/nll/{d}" for d in domains], logged
    assert all(0 < v < 20 for v in logged.values()), logged
