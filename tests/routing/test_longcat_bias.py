"""LongCat-style bias controller: selection-only bias, sign updates, the target share reached without a loss."""

import lightning as L
import pytest
import torch

from tests.helpers import one_hot_tokens, router_on_logits
from zeda_lightning import inject, set_zero_mask
from zeda_lightning.callbacks import ZeroShareBiasController
from zeda_lightning.routing import LongCatBias, ZeroExperts, get_routing, routing_from_config
from zeda_lightning.tiny import tiny_model

N, K, H = 8, 2, 32


def test_bias_enters_selection_only():
    rows = torch.zeros(N + 4, H)
    rows[2, 0], rows[5, 0], rows[N + 1, 0] = 2.0, 1.0, 0.5  # without bias: experts 2 and 5
    router = router_on_logits("qwen3_moe", LongCatBias(target=0.5), rows)
    logits, weights, idx = router(one_hot_tokens(1))
    assert idx[0].tolist() == [2, 5]
    router.zero_selection_bias.fill_(1.0)  # zero expert N+1: 0.5 + 1 beats expert 5's 1.0
    logits, weights, idx = router(one_hot_tokens(1))
    p = torch.softmax(logits[0], -1)  # the unbiased logits are what the record carries
    assert torch.equal(logits[0, N + 1], torch.tensor(0.5))
    assert router.route(one_hot_tokens(1)).pool_indices[0].tolist() == [2, N + 1]
    assert idx[0].tolist() == [2, N]
    # weights: unbiased probabilities renormalised over the K slots (zero slot included), zero slot dropped
    assert torch.allclose(weights[0], torch.stack([p[2] / (p[2] + p[N + 1]), torch.tensor(0.0)]), atol=1e-6)


def test_sign_update_and_counter_reset():
    router = router_on_logits("qwen3_moe", LongCatBias(target=0.9, update_rate=0.1), torch.randn(N + 4, H))
    router.train()
    assert router.update_bias() is None  # no training forward yet: nothing to do
    h = torch.randn(64, H)
    router(h)
    share = float(router.route(h).skipped.float().mean())
    router._skipped.zero_()
    router._slots.zero_()
    router(h)
    assert router.update_bias() == pytest.approx(share)
    assert float(router.zero_selection_bias) == pytest.approx(0.1)  # share < 0.9: bias up
    router.target = 0.0
    router(h)
    router.update_bias()
    assert float(router.zero_selection_bias) == pytest.approx(0.0, abs=1e-7)  # share > 0: bias down
    router.eval()
    router(h)
    assert router.update_bias() is None  # eval forwards do not feed the controller


@pytest.mark.parametrize("target", [0.25, 0.5, 0.625])
def test_controller_reaches_target_on_synthetic_router(target):
    torch.manual_seed(0)
    router = router_on_logits("qwen3_moe", LongCatBias(target=target, update_rate=0.02, seed=0), torch.randn(N + 4, H))
    router.train()
    for _ in range(300):
        router(torch.randn(256, H))
        router.update_bias()
    router.eval()
    realised = router.route(torch.randn(4096, H)).skipped.float().mean().item()
    assert abs(realised - target) <= 0.03, (target, realised)


class _RouterModule(L.LightningModule):
    """A router trained by a loss that pushes toward zero experts: the controller must hold the target anyway."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def training_step(self, batch, batch_idx):
        logits, _, _ = self.router(batch[0])
        return -torch.log_softmax(logits, -1)[:, N:].mean()  # pulls zero logits up every step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_callback_holds_target_in_a_trainer():
    torch.manual_seed(0)
    router = router_on_logits("qwen3_moe", LongCatBias(target=0.55, update_rate=0.05, seed=0), torch.randn(N + 4, H))
    data = torch.utils.data.TensorDataset(torch.randn(150 * 128, H))
    loader = torch.utils.data.DataLoader(data, batch_size=128)
    trainer = L.Trainer(max_steps=150, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ZeroShareBiasController()])
    probe = torch.randn(4096, H)
    before = router.eval().route(probe).skipped.float().mean().item()
    assert abs(before - 0.55) > 0.1  # the controller has work to do
    router.train()  # Lightning keeps a submodule's mode: the controller only counts training forwards
    trainer.fit(_RouterModule(router), loader)
    router.eval()
    realised = router.route(torch.randn(4096, H)).skipped.float().mean().item()
    assert abs(realised - 0.55) <= 0.03, realised


def test_callback_refuses_a_model_without_longcat_routers():
    router = router_on_logits("qwen3_moe", ZeroExperts(), torch.randn(N + 4, H))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ZeroShareBiasController()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, H)), batch_size=4)
    with pytest.raises(ValueError, match="no LongCatBiasRouter"):
        trainer.fit(_RouterModule(router), loader)


def test_masked_is_exact_and_bias_is_saved():
    ids = torch.randint(0, 128, (2, 12))
    model = inject(tiny_model("qwen3_moe"), get_routing("longcat_bias", target=0.5, seed=0))
    assert any(k.endswith("gate.zero_selection_bias") for k in model.state_dict())
    set_zero_mask(model, True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("qwen3_moe")(ids).logits)
    assert routing_from_config(LongCatBias(target=0.3).to_config()).target == 0.3


@pytest.mark.parametrize("kw,match", [({"target": 1.0}, "target must be in"), ({"update_rate": 0}, "update_rate")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LongCatBias(**kw)
