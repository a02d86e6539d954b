"""``LMPretrainModule``: trains a causal LM from a config; how the embedded tiny MoE teacher is made."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typing_extensions import override

from zeda_lightning.losses.kd import cross_entropy
from zeda_lightning.metrics import GroupedRatio
from zeda_lightning.modules.base import TrainModuleBase
from zeda_lightning.sharding import data_parallel_mesh, enable_activation_checkpointing, param_dtypes, shard


class LMPretrainModule(TrainModuleBase):
    """Plain next-token pretraining of a transformers model built from ``model_config``.

    Args:
        model_config: keyword arguments of ``AutoConfig.for_model`` including ``model_type``
            (e.g. a small ``qwen3_moe``); MoE families add their own load-balancing loss when
            ``output_router_logits`` is true.
        tokenizer: tokenizer directory, saved beside the exported model.
        domains: domain names in the order the data module numbers them (for per-domain validation NLL).
        seed: seed of the weight init.
    """

    def __init__(
        self,
        model_config: dict[str, Any],
        tokenizer: str | None = None,
        domains: list[str] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer"])
        if "model_type" not in model_config:
            raise ValueError("model_config needs a 'model_type' (e.g. 'qwen3_moe')")
        self.model_config = dict(model_config)
        self.tokenizer_path = tokenizer
        self.domains = list(domains or [])
        self.seed = seed
        self.model = None
        self.domain_nll = GroupedRatio(max(len(self.domains), 1))

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        cfg = dict(self.model_config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        mesh = data_parallel_mesh(self)
        if mesh is not None:  # same seed on every rank: each keeps its shard of the same random init
            _, compute = param_dtypes(self.trainer)
            shard(self.model, mesh, compute_dtype=compute, activation_checkpointing=self.activation_checkpointing)
        elif self.activation_checkpointing:
            enable_activation_checkpointing(self.model)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    @override
    def training_step(self, batch, batch_idx):
        out = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.check_finite({"language-model": out.loss})
        self.log("train/loss", out.loss, prog_bar=True)
        if getattr(out, "aux_loss", None) is not None:
            self.log("train/aux_loss", out.aux_loss)
        return out.loss

    @override
    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = cross_entropy(logits[:, :-1], labels)
        self.log("val/nll", nll, prog_bar=True, sync_dist=True, batch_size=int((labels != -100).sum()))
        if self.domains:
            per_tok = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, reduction="none", ignore_index=-100
            )  # (B, S-1)
            valid = (labels != -100).float()
            self.domain_nll.update_by_group((per_tok * valid).sum(1), valid.sum(1), batch["domain"])

    @override
    def on_validation_epoch_end(self) -> None:
        if self.domains and bool(self.domain_nll.seen().any()):
            for name, v in self.domain_nll.by_name(self.domains).items():
                self.log(f"val/nll/{name}", v)
        self.domain_nll.reset()

    @override
    def protected_paths(self, trainer) -> list[str]:
        return super().protected_paths(trainer) + ([self.tokenizer_path] if self.tokenizer_path else [])

    @override
    def export_model_and_tokenizer(self):
        tok = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=False) if self.tokenizer_path else None
        if getattr(self.model.config, "output_router_logits", False):
            self.model.config.output_router_logits = False  # a training-time switch; the export is for inference
        return self.model, tok
