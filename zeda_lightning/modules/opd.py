"""``OnPolicyDistillModule``: ZEDA stage 2, on-policy distillation with the teacher as the reward.

Each training step: the student samples ``num_samples`` responses per prompt (transformers ``generate``, KV cache,
temperature 1), recording its expert choices; the frozen teacher scores prompt + response in one forward; the loss
is PPO-clip with the per-token advantage ``log pi_T(y_t) - log pi_S_old(y_t)`` (no KL or entropy term) plus L_GA.
Routing replay (on by default, as in the paper) makes the training forward reuse the sampler's expert choices.
Because the teacher is local, ``policy_loss: exact_reverse_kl`` can use the full distributions at every sampled
position instead of the single-sample estimate; ``lmbda < 1`` mixes in off-policy batches (GKD style) trained with
``objective``. The policy loss is a component (``zeda_lightning.losses.policy_losses``), chosen in YAML.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils.rnn import pad_sequence
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoTokenizer
from typing_extensions import override

from zeda_lightning.adapters import CONFIG_KEY
from zeda_lightning.analysis import zero_ratio
from zeda_lightning.losses.kd import masked_mean, token_kl
from zeda_lightning.losses.policy_losses import PolicyLoss, make_policy_loss
from zeda_lightning.modules.distill import ZedaDistillModule
from zeda_lightning.routing.base import capture_routing
from zeda_lightning.sampling import eos_token_ids, sample_ids, seeded
from zeda_lightning.serving import check_servable_config, require_vllm_python
from zeda_lightning.serving.engine import VllmEngine
from zeda_lightning.sharding import fits_unsharded, is_sharded, param_dtypes, unsharded_for_generation


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class OnPolicyDistillModule(ZedaDistillModule):
    """Args (beyond :class:`ZedaDistillModule`'s):
    num_samples: responses sampled per prompt (paper: 2).
    max_new_tokens: most tokens per sampled response.
    sampling_temperature: sampling temperature (paper: 1); off-policy steps use ``kl_temperature`` for the KL.
    top_p: nucleus threshold for sampling (1 = off).
    clip_eps: PPO clip below 1 (and above, unless ``clip_eps_high``).
    clip_eps_high: PPO clip above 1 (asymmetric, DAPO style); ``None`` = ``clip_eps``.
    policy_loss: a ``PolicyLoss`` (``class_path`` in YAML) or a shorthand: ``ppo_clip`` (the paper's, with
        ``clip_eps`` / ``clip_eps_high``) or ``exact_reverse_kl`` (the full distributions at every sampled position).
    exact_reverse_kl: the old spelling of ``policy_loss: exact_reverse_kl`` (still accepted).
    routing_replay: train on the expert choices made while sampling.
    rollout_reuse: optimiser steps per rollout (1 = nearly exactly on-policy, the paper); > 1 makes PPO's ratio move.
    lmbda: probability that a step is on-policy; otherwise the batch's own prompt + response rows are used with
        ``objective`` (GKD's mix).
    seed: seed of the sampler and of the on/off-policy draw.
    rollout_gather: how a sharded (FSDP2) student generates. ``once``: every layer gathered once per rollout, each
        rank then decodes alone (TRL's ``unwrap_model_for_generation``); ``per_layer``: each layer re-gathered at
        every decode step with all ranks in lockstep (``synced_gpus``); ``auto``: ``once`` when the gathered student
        fits every rank's free memory (75 % of it), else ``per_layer``. FSDP1 always runs ``per_layer``.
    rollout_engine: ``hf`` (transformers ``generate``, in this process) or ``vllm``: a vLLM engine beside the run
        (:class:`~zeda_lightning.serving.engine.VllmEngine`, the vLLM environment of ``scripts/vllm_env.sh``) loads
        the student's weights before every rollout and samples it; one process only, and without routing replay
        (the engine records no expert choices).
    vllm_engine: the engine's settings (``dtype``, ``max_model_len``, ``kv_cache_memory_bytes``, ``max_num_seqs``).
    """

    def __init__(
        self,
        *args: Any,
        num_samples: int = 2,
        max_new_tokens: int = 64,
        sampling_temperature: float = 1.0,
        top_p: float = 1.0,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        policy_loss: PolicyLoss | str | None = None,
        exact_reverse_kl: bool = False,
        routing_replay: bool = True,
        rollout_reuse: int = 1,
        lmbda: float = 1.0,
        seed: int = 0,
        rollout_gather: Literal["auto", "once", "per_layer"] = "auto",
        rollout_engine: Literal["hf", "vllm"] = "hf",
        vllm_engine: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (responses per prompt), got {num_samples}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1] (share of on-policy steps), got {lmbda}")
        if rollout_reuse < 1:
            raise ValueError(f"rollout_reuse must be >= 1, got {rollout_reuse}")
        if kwargs.get("temperature") is not None:
            raise ValueError("OnPolicyDistillModule: 'temperature' was renamed: set sampling_temperature (the "
                             "student's sampling temperature) and, for off-policy steps, kl_temperature")
        if rollout_gather not in ("auto", "once", "per_layer"):
            raise ValueError(f"rollout_gather must be 'auto', 'once' or 'per_layer', got {rollout_gather!r}")
        if rollout_engine not in ("hf", "vllm"):
            raise ValueError(f"rollout_engine must be 'hf' or 'vllm', got {rollout_engine!r}")
        if rollout_engine == "vllm" and routing_replay:
            raise ValueError("rollout_engine='vllm' records no expert choices to replay: set routing_replay: false "
                             "(or sample with rollout_engine: hf)")
        if sampling_temperature <= 0:
            raise ValueError(f"sampling_temperature must be > 0 (on-policy rollouts sample), got {sampling_temperature}")
        if policy_loss is None:
            policy_loss = "exact_reverse_kl" if exact_reverse_kl else "ppo_clip"
        elif exact_reverse_kl:
            raise ValueError("set policy_loss or exact_reverse_kl (its old spelling), not both")
        kwargs.setdefault("objective", "reverse_kl")
        if routing_replay and kwargs.get("activation_checkpointing"):
            raise ValueError(
                "routing_replay with activation_checkpointing would recompute each layer in backward without the "
                "replayed expert choices; set activation_checkpointing: false (or routing_replay: false)"
            )
        super().__init__(*args, **kwargs)
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.sampling_temperature, self.top_p = sampling_temperature, top_p
        self.policy_loss = make_policy_loss(policy_loss, clip_eps=clip_eps, clip_eps_high=clip_eps_high)
        self.hparams.update(policy_loss=self.policy_loss.to_config())
        self.routing_replay = routing_replay
        self.rollout_reuse, self.lmbda, self.seed = rollout_reuse, lmbda, seed
        self.rollout_gather = rollout_gather
        self.rollout_engine, self.vllm_engine = rollout_engine, dict(vllm_engine or {})
        self._engine: VllmEngine | None = None
        self._gather_said: bool | None = None
        self._rollouts: dict[int, tuple[int, dict[str, Any]]] = {}  # micro-batch slot -> (step sampled, rollout)

    # -- checks -------------------------------------------------------------------------------------------------
    @override
    def preflight(self, datamodule=None) -> None:
        super().preflight(datamodule)
        if self.rollout_engine == "vllm":  # the environment and the family, before anything is written
            require_vllm_python()
            check_servable_config({**self.teacher_cfg, CONFIG_KEY: self.routing.to_config()},
                                  f"rollout_engine='vllm' with {self.spec.source}")
        if datamodule is None:
            return
        if not getattr(datamodule, "prompts", False):
            raise ValueError("on-policy distillation samples from prompts: set data.init_args.prompts: true")
        datamodule.setup("fit")
        context = self.teacher_cfg.get("max_position_embeddings")
        longest = max((r["prompt_len"] for r in datamodule.datasets.get("train", [])), default=0)
        if context is not None and longest + self.max_new_tokens > context:
            raise ValueError(
                f"prompts of up to {longest} tokens + max_new_tokens={self.max_new_tokens} exceed the model's context "
                f"of {context} tokens; lower data.init_args.max_length / prompt_tokens or max_new_tokens"
            )

    # -- sampling -------------------------------------------------------------------------------------------------
    def _special_ids(self) -> tuple[int, list[int]]:
        """``(pad, every eos id)`` from the generation config and the tokenizer shipped with the teacher: a chat
        model often has several (GLM ends an assistant turn with ``<|user|>``), and a response ends at any of them."""
        if not hasattr(self, "_pad_eos"):
            tok = AutoTokenizer.from_pretrained(self.teacher_path, trust_remote_code=False)
            eos = eos_token_ids(self.student, tok)
            if not eos:
                raise ValueError(f"{self.teacher_path}: no eos token id in the generation config or tokenizer")
            pad = self.student.generation_config.pad_token_id
            pad = (tok.pad_token_id if tok.pad_token_id is not None else eos[0]) if pad is None else pad
            self._pad_eos = (int(pad), eos)
        return self._pad_eos

    @contextlib.contextmanager
    def generation_weights(self):
        """The student's weights as the generation loop should see them; yields ``synced_gpus`` for ``generate``
        (``None``: transformers decides, i.e. lockstep under FSDP)."""
        student = self.student
        if not (isinstance(student, FSDPModule) and is_sharded(student)) or self.rollout_gather == "per_layer":
            yield None
            return
        compute = param_dtypes(self._trainer)[1] if self._trainer is not None else None
        once = self.rollout_gather == "once" or fits_unsharded(student, compute)
        if self._gather_said is not once:
            rank_zero_info(f"rollouts: the sharded student is {'gathered once per rollout' if once else 're-gathered layer by layer at every decode step (the gathered student does not fit)'}")
            self._gather_said = once
        if not once:
            yield None
            return
        with unsharded_for_generation(student):
            yield False

    @torch.no_grad()
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, seed: int | None = None) -> dict[str, Tensor]:
        """Student rollouts with their recorded routing.

        Returns ``input_ids`` (R, P + G), ``attention_mask`` (R, P + G), ``response_mask`` (R, G) (tokens up to and
        including the first EOS), ``prompt_len`` P, ``replay`` ``{layer: (R * (P + G), K)}`` (-1 where the sampler
        never routed: the last token), ``tokens_per_s``; R = B * num_samples.
        """
        student = self.student
        was_training = student.training
        student.eval()
        pad, eos = self._special_ids()
        gen = torch.Generator(device="cpu").manual_seed(self.seed if seed is None else seed)
        sample_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        start = time.perf_counter()
        if self.rollout_engine == "vllm":
            seq, records = self._vllm_sample(prompt_ids, prompt_mask, sample_seed, pad, eos), {}
        else:
            with (self.generation_weights() as synced, capture_routing(student, accumulate=True) as records,
                  seeded(sample_seed, prompt_ids.device)):
                seq = sample_ids(student, prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens,
                                 temperature=self.sampling_temperature, top_p=self.top_p, top_k=0,
                                 num_samples=self.num_samples, pad=pad, eos=eos, synced_gpus=synced)
        elapsed = time.perf_counter() - start
        student.train(was_training)
        plen = prompt_ids.shape[1]
        rows, total = seq.shape
        response = seq[:, plen:]  # (R, G)
        is_eos = torch.isin(response, torch.tensor(eos, device=response.device)).long()
        response_mask = (is_eos.cumsum(-1) - is_eos) == 0  # up to and including the first EOS
        attention_mask = torch.cat([prompt_mask.repeat_interleave(self.num_samples, 0), response_mask.long()], dim=1)
        replay = {}
        for layer, outs in records.items():
            ids = torch.cat([o.pool_indices.view(rows, -1, o.top_k) for o in outs], dim=1)  # (R, P + G - 1, K)
            # Under FSDP, generate keeps a finished rank stepping (synced_gpus) without adding tokens: drop those.
            ids = ids[:, : total - 1]
            pad_ids = ids.new_full((rows, total - ids.shape[1], ids.shape[2]), -1)
            replay[layer] = torch.cat([ids, pad_ids], dim=1).reshape(rows * total, -1)
        return {
            "input_ids": seq,
            "attention_mask": attention_mask,
            "position_ids": _positions(attention_mask),
            "response_mask": response_mask,
            "prompt_len": plen,
            "replay": replay,
            "tokens_per_s": float(response_mask.sum()) / max(elapsed, 1e-9),
            "sample_s": elapsed,
        }

    def _vllm_sample(self, prompt_ids: Tensor, prompt_mask: Tensor, seed: int, pad: int, eos: list[int]) -> Tensor:
        """Rollouts from the vLLM engine, laid out as ``generate`` returns them: (R, P + G), each prompt's samples
        together, responses padded after their end with ``pad``. The engine first loads the current weights."""
        if self._engine is None:
            if self._trainer is not None and self._trainer.world_size > 1:
                raise ValueError("rollout_engine='vllm' runs in one process; use rollout_engine: hf with several")
            tok = AutoTokenizer.from_pretrained(self.teacher_path, trust_remote_code=False)
            self._engine = VllmEngine.for_model(self.student, tok, seed=self.seed, **self.vllm_engine)
        else:
            self._engine.load_weights(self.student)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        out = self._engine.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=self.sampling_temperature,
                                    top_p=self.top_p, top_k=0, num_samples=self.num_samples, eos_token_ids=eos,
                                    seed=seed)
        responses = [torch.tensor(ids, dtype=prompt_ids.dtype) for per_prompt in out["token_ids"] for ids in per_prompt]
        padded = pad_sequence(responses, batch_first=True, padding_value=pad)  # (R, G), prompt-major
        return torch.cat([prompt_ids.repeat_interleave(self.num_samples, 0), padded.to(prompt_ids.device)], dim=1)

    @override
    def teardown(self, stage: str) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        super().teardown(stage)

    def rollout_forward(self, rollout: dict[str, Any]) -> tuple[Tensor, dict]:
        """The student's forward on its own samples (through :meth:`student_forward`), replaying the sampler's
        expert choices when ``routing_replay``."""
        return self.student_forward(rollout, replay=rollout["replay"] if self.routing_replay else None)

    def make_rollout(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Sample, then score: teacher log-probs and the sampler's (old) log-probs of the sampled tokens."""
        rollout = self.sample(batch["prompt_ids"], batch["prompt_mask"], seed=self.seed + self.global_step)
        start = time.perf_counter()
        p = rollout["prompt_len"]
        response = rollout["input_ids"][:, p:]
        teacher_logits = self.teacher_forward(rollout)[:, p - 1 : -1]  # (R, G, V) predicting the response
        with torch.no_grad():
            old_logits = self.rollout_forward(rollout)[0][:, p - 1 : -1]
        teacher_log_probs = torch.log_softmax(teacher_logits.float(), -1)  # (R, G, V)
        old_log_probs = torch.log_softmax(old_logits.float(), -1)
        tokens = response.unsqueeze(-1)
        rollout["teacher_logp"] = teacher_log_probs.gather(-1, tokens).squeeze(-1)  # (R, G)
        rollout["old_logp"] = old_log_probs.gather(-1, tokens).squeeze(-1)
        # the exact per-position reverse KL of the sampling policy, for the log (the training policy when
        # rollout_reuse = 1); the full teacher distribution (R x G x V in fp32) is kept only when it is the loss
        rollout["reverse_kl"] = token_kl(old_log_probs, teacher_log_probs)
        if self.policy_loss.needs_teacher_distribution:
            rollout["teacher_log_probs"] = teacher_log_probs
        rollout["score_s"] = time.perf_counter() - start
        return rollout

    # -- training -----------------------------------------------------------------------------------------------
    def _on_policy(self) -> bool:
        if self.lmbda >= 1.0:
            return True
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        return bool(torch.rand((), generator=gen) < self.lmbda)

    @override
    def training_step(self, batch, batch_idx):
        if not self._on_policy():
            return self._shared_step(batch, "train")
        # one rollout per micro-batch of an optimiser step, each reused for rollout_reuse steps
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        slot = batch_idx % max(1, accumulate)
        cached = self._rollouts.get(slot)
        fresh = self.global_step % self.rollout_reuse == 0 and (cached is None or cached[0] != self.global_step)
        made = cached is None or fresh
        if made:
            self._rollouts[slot] = (self.global_step, self.make_rollout(batch))
        rollout = self._rollouts[slot][1]
        p = rollout["prompt_len"]
        mask = rollout["response_mask"]
        logits, records = self.rollout_forward(rollout)
        s_logits = logits[:, p - 1 : -1]  # (R, G, V)
        log_s = torch.log_softmax(s_logits.float(), -1)
        policy_loss, clip_fraction = self.policy_loss(log_s, rollout)
        token_mask = rollout["attention_mask"].reshape(-1).bool()
        aux = self.aux_loss(records, token_mask)
        self.check_finite({"policy": policy_loss, "aux": aux},
                          detail=lambda name: self.nonfinite_layers(records, token_mask) if name == "aux" else None)
        loss = policy_loss + aux
        self.tally_train_slots(records, token_mask)
        bs = rollout["input_ids"].shape[0]
        self.log_train({
            "loss": loss, "policy_loss": policy_loss, "aux_loss": aux,
            "reverse_kl": masked_mean(rollout["reverse_kl"], mask),  # exact, of the sampling policy
            "reverse_kl_estimate": masked_mean(rollout["old_logp"] - rollout["teacher_logp"], mask),
            "clip_fraction": clip_fraction.to(loss.device), "zero_ratio": zero_ratio(records, token_mask),
            "sampling_tokens_per_s": rollout["tokens_per_s"], "response_tokens": mask.sum().float() / bs,
            # where a step's time goes: sampling, scoring (teacher + old log-probs), the rest is the update
            "time_sample_s": rollout["sample_s"] if made else 0.0, "time_score_s": rollout["score_s"] if made else 0.0,
        }, bs)
        return loss

    @override
    def on_train_batch_start(self, batch, batch_idx):
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(self, outputs, batch, batch_idx):
        """The whole step (rollout, update forward, backward, optimiser), beside the parts logged in the step."""
        if getattr(self, "_batch_start", None) is not None:
            self.log("train/time_step_s", time.perf_counter() - self._batch_start, batch_size=1, sync_dist=True)

    # -- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def heldout_reverse_kl(self, batch: dict[str, Tensor], seed: int = 1234) -> tuple[Tensor, Tensor]:
        """Exact reverse KL to the teacher on the student's own samples for ``batch``'s prompts, and the zero ratio
        of those forwards: ``(mean KL per response token, zero ratio)``."""
        rollout = self.sample(batch["prompt_ids"], batch["prompt_mask"], seed=seed)
        p = rollout["prompt_len"]
        s_logits, records = self.rollout_forward(rollout)
        t_logits = self.teacher_forward(rollout)
        kl = token_kl(torch.log_softmax(s_logits[:, p - 1 : -1].float(), -1), torch.log_softmax(t_logits[:, p - 1 : -1].float(), -1))
        token_mask = rollout["attention_mask"].reshape(-1).bool()
        return masked_mean(kl, rollout["response_mask"]), zero_ratio(records, token_mask)

    @override
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        if "prompt_ids" in batch:
            kl, zero = self.heldout_reverse_kl(batch, seed=1234 + batch_idx)
            bs = batch["prompt_ids"].shape[0]
            self.log("val/reverse_kl", kl, batch_size=bs, sync_dist=True)
            self.log("val/sampled_zero_ratio", zero, batch_size=bs, sync_dist=True)
