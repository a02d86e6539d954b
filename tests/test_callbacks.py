"""``ZeroShareBiasController`` from a user's side: one controller step per optimiser step, counting every micro-batch
of the step (also across an epoch boundary, where ``batch_idx`` restarts), with the counts summed over processes so
every rank holds the same bias."""

from __future__ import annotations

import glob
import json
import math
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
import yaml

from tests.helpers import router_on_logits
from zeda_lightning.callbacks import ZeroShareBiasController
from zeda_lightning.routing.longcat_bias import LongCatBias

N, H = 8, 32


class _LongCatModule(L.LightningModule):
    def __init__(self, router):
        super().__init__()
        self.router = router

    def training_step(self, batch, batch_idx):
        logits, _, _ = self.router(batch[0])
        return logits.float().pow(2).mean() * 0.0  # no gradient push: only the controller moves the share

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_longcat_controller_steps_once_per_optimiser_step_on_all_micro_batches():
    torch.manual_seed(0)
    router = router_on_logits("qwen3_moe", LongCatBias(target=0.9, update_rate=0.01, seed=0), torch.randn(N + 4, H))
    seen = []
    original = router.apply_counts

    def record(skipped, slots):
        seen.append(slots)
        return original(skipped, slots)

    router.apply_counts = record
    # 10 micro-batches per epoch, 3 per step: Lightning also steps on the epoch's last, short accumulation, so the
    # steps do not follow batch_idx (which restarts each epoch)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(10 * 16, H)), batch_size=16)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=3, callbacks=[ZeroShareBiasController()])
    router.train()
    trainer.fit(_LongCatModule(router), loader)
    k = router.top_k
    assert seen == [s * 16 * k for s in (3, 3, 3, 1, 3, 3)]  # one update per optimiser step, all its micro-batches
    assert float(router.zero_selection_bias) == pytest.approx(0.06)  # share < 0.9 each time: +0.01 per step


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import lightning as L
    import torch
    from tests.helpers import router_on_logits
    from zeda_lightning.callbacks import ZeroShareBiasController
    from zeda_lightning.routing.longcat_bias import LongCatBias

    class Module(L.LightningModule):
        def __init__(self, router):
            super().__init__()
            self.router = router.train()

        def training_step(self, batch, batch_idx):
            logits, _, _ = self.router(batch[0])
            return logits.float().pow(2).mean() * 0.0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    if __name__ == "__main__":
        rows = torch.full((12, 32), -10.0)
        rows[8:, 0] = 10.0  # token e_0: both slots go to zero experts (share 1)
        rows[:8, 1] = 10.0  # token e_1: both slots go to real experts (share 0)
        router = router_on_logits("qwen3_moe", LongCatBias(target=0.4, update_rate=0.01, seed=0), rows)
        # rank 0's tokens are all e_1 (share 0), rank 1's all e_0 (share 1)
        rank = int(os.environ.get("LOCAL_RANK", 0))
        x = torch.eye(32)[1 - rank].expand(64, 32).clone()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False, callbacks=[ZeroShareBiasController()])
        trainer.fit(Module(router), loader)
        with open(sys.argv[1] + f".{trainer.global_rank}", "w") as f:
            json.dump(float(router.zero_selection_bias), f)
""")


def test_two_processes_sum_their_counts_and_hold_the_same_bias(tmp_path):
    """Rank 0 alone sees share 0 (< target 0.4: bias up), rank 1 alone share 1; together 0.5 (> 0.4: bias down).
    Summed counts move both ranks' bias down by 0.01 per step."""
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    out = tmp_path / "bias"
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    biases = [json.loads((tmp_path / f"bias.{rank}").read_text()) for rank in (0, 1)]
    assert biases == pytest.approx([-0.03, -0.03])


# -- GroupWeightController ------------------------------------------------------------------------------------------
def _controller_run(tmp_path, tiny_teacher, tiny_data, *, steps, ckpt=None, aux_loss="group"):
    from tests.modules.test_distill import make_config, read_metrics, series
    from zeda_lightning.cli import cli_main

    tmp_path.mkdir(parents=True, exist_ok=True)
    config, root = make_config(tmp_path, tiny_teacher, tiny_data, steps=steps, lr=0.01, group_w=2.0, aux_loss=aux_loss)
    cfg = yaml.safe_load(open(config))
    cfg["trainer"]["val_check_interval"] = None
    cfg["trainer"]["limit_val_batches"] = 0
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1}},
        {"class_path": "zeda_lightning.callbacks.GroupWeightController", "init_args": {"target": 0.7, "rate": 0.05}},
    ]
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    cli_main(["fit", "--config", config] + (["--ckpt_path", ckpt] if ckpt else []))
    rows = read_metrics(root)
    return root, series(rows, "train/group_w"), series(rows, "train/controller_zero_share"), series(rows, "train/zero_ratio")


def test_group_weight_controller_moves_w_by_the_realised_share_and_resumes_from_it(tmp_path, tiny_teacher, tiny_data):
    root, ws, shares, zero_ratios = _controller_run(tmp_path / "a", tiny_teacher, tiny_data, steps=4)
    assert len(ws) == len(shares) == 4
    # the share the controller counted is the step's logged zero ratio (one micro-batch per step)
    assert shares == pytest.approx(zero_ratios, abs=1e-6)
    # w <- w exp(rate sign(target - share)) from L_GA's configured w = 2, once per optimiser step
    expected, w = [], 2.0
    for s in shares:
        w *= math.exp(0.05 * math.copysign(1.0, 0.7 - s))
        expected.append(w)
    assert ws == pytest.approx(expected, rel=1e-5)
    assert all(s < 0.7 for s in shares) and ws[-1] > 2.0  # too few zero slots: w grows
    # killed after step 2 and resumed: the checkpoint carries w, so steps 3-4 continue from it, not from w = 2
    (ckpt,) = glob.glob(str(root / "ckpt" / "*step=2*.ckpt"))
    _, resumed_ws, _, _ = _controller_run(tmp_path / "b", tiny_teacher, tiny_data, steps=4, ckpt=ckpt)
    assert resumed_ws == pytest.approx(ws[2:], rel=1e-6)


def test_group_weight_controller_refuses_a_run_without_l_ga(tmp_path, tiny_teacher, tiny_data):
    with pytest.raises(ValueError, match="GroupWeightController found no GroupBalance"):
        _controller_run(tmp_path, tiny_teacher, tiny_data, steps=1, aux_loss="none")
