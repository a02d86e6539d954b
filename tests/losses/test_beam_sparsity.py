"""BEAM's sparsity term against hand computation: the L1 mean of the mask probabilities, its target sign, token
mask, records and saved-config round trip."""

from types import SimpleNamespace

import pytest
import torch

from zeda_lightning.losses.router_losses import BeamSparsity, make_router_loss, mask_sparsity_loss


def test_l1_mean_over_valid_slots_by_hand():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.4], [0.1, 0.1]], requires_grad=True)
    assert mask_sparsity_loss(probs).item() == pytest.approx((0.9 + 0.2 + 0.6 + 0.4 + 0.1 + 0.1) / 6)
    mask = torch.tensor([True, False, True])
    loss = mask_sparsity_loss(probs, token_mask=mask)
    assert loss.item() == pytest.approx((0.9 + 0.2 + 0.1 + 0.1) / 4)
    loss.backward()
    assert torch.equal(probs.grad, torch.tensor([[0.25, 0.25], [0.0, 0.0], [0.25, 0.25]]))
    assert mask_sparsity_loss(probs, token_mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_target_sign_follows_the_realised_share():
    probs = torch.full((2, 2), 0.5)
    skipped = torch.tensor([[True, False], [False, False]])  # share 0.25
    assert mask_sparsity_loss(probs, skipped, target=0.5).item() == pytest.approx(0.5)  # too few skipped: push down
    assert mask_sparsity_loss(probs, skipped, target=0.1).item() == pytest.approx(-0.5)  # too many: push up
    assert mask_sparsity_loss(probs, skipped, target=0.25).item() == 0.0
    # the share counts valid tokens only: with token 0 masked out nothing is skipped, so target 0.1 pushes down
    assert mask_sparsity_loss(probs, skipped, 0.1, torch.tensor([False, True])).item() == pytest.approx(0.5)


def test_component_sums_layers_and_refuses_records_without_mask_probs():
    a = SimpleNamespace(mask_probs=torch.tensor([[0.8, 0.2]]), skipped=torch.tensor([[False, True]]),
                        router_logits=torch.zeros(1, 4))
    b = SimpleNamespace(mask_probs=torch.tensor([[0.6, 0.6]]), skipped=torch.tensor([[False, False]]),
                        router_logits=torch.zeros(1, 4))
    assert BeamSparsity(coef=2.0)([a, b], None).item() == pytest.approx(2.0 * (0.5 + 0.6))
    # target 0.25: layer a skips 0.5 (sign -1), layer b 0 (sign +1)
    assert BeamSparsity(coef=1.0, target=0.25)([a, b], None).item() == pytest.approx(-0.5 + 0.6)
    with pytest.raises(ValueError, match="mask_probs"):
        BeamSparsity()([SimpleNamespace(mask_probs=None, router_logits=torch.zeros(1, 4))], None)


@pytest.mark.parametrize("loss", [BeamSparsity(), BeamSparsity(coef=0.3, target=0.625)])
def test_saved_config_round_trip(loss):
    again = make_router_loss(loss.to_config())
    assert type(again) is BeamSparsity and (again.coef, again.target) == (loss.coef, loss.target)


@pytest.mark.parametrize("kw", [{"coef": -1.0}, {"target": 1.5}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match="BeamSparsity"):
        BeamSparsity(**kw)
