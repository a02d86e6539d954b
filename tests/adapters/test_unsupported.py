"""A family whose router cannot be swapped refuses injection with a ValueError naming the family and the reason."""

from types import SimpleNamespace

import pytest
from torch import nn

from zeda_lightning.adapters.base import inject
from zeda_lightning.routing.zero_experts import ZeroExperts
from zeda_lightning.tiny import FAMILIES

REFUSED = {"phimoe": "SparseMixer"}


@pytest.mark.parametrize("family, reason", sorted(REFUSED.items()))
def test_unsupported_family_refused_with_reason(family, reason):
    model = nn.Module()
    model.config = SimpleNamespace(model_type=family)
    with pytest.raises(ValueError, match=f"{family} is not supported.*{reason}"):
        inject(model, ZeroExperts())
    assert family not in FAMILIES
