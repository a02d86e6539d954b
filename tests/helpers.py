"""Test helpers: count the rows the expert matmuls really compute, build routers on hand-chosen logits."""

from __future__ import annotations

import socket

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zeda_lightning.adapters import adapter_for
from zeda_lightning.tiny import tiny_model


class ExpertRowCounter(TorchDispatchMode):
    """Counts token rows entering matmuls: mm/addmm input rows, bmm batch, grouped_mm rows below offs[-1]
    (the grouped kernel skips rows past the last offset)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if name.startswith("_grouped_mm"):
            self.rows += int(args[2][-1])
        elif name.startswith(("mm.", "addmm.")):
            self.rows += (args[1] if name.startswith("addmm") else args[0]).shape[0]
        elif name.startswith("bmm."):
            self.rows += args[0].shape[0]
        return func(*args, **kwargs)


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_on_logits(family: str, variant, logits_rows: torch.Tensor):
    """Build ``variant``'s router for a tiny ``family`` model whose pool logits equal ``logits_rows`` (P, H=32)
    for one-hot hidden states: token j (hidden e_j) gets logits ``logits_rows[:, j]``."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    _, block = adapter.find_blocks(model)[0]
    original = getattr(block, adapter.router_attr)
    router = variant.build(original, adapter.dims(original), adapter.scoring(original))
    with torch.no_grad():
        router.weight.copy_(logits_rows)
        if router.bias is not None:
            router.bias.zero_()
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.zero_()
    return router


def one_hot_tokens(num_tokens: int, hidden: int = 32) -> torch.Tensor:
    return torch.eye(hidden)[:num_tokens]


def export_zero_expert_student(teacher_dir: str, out: str, zero_logit_bias: float = 0.0) -> str:
    """A zeda export of ``teacher_dir`` with zero experts (seed 0), a zero-logit bias and the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from zeda_lightning import ZeroExperts, inject
    from zeda_lightning.budget import set_zero_logit_bias
    from zeda_lightning.export import export_model, from_pretrained

    model = inject(from_pretrained(teacher_dir), ZeroExperts(seed=0))
    if zero_logit_bias:
        set_zero_logit_bias(model, zero_logit_bias)
    return export_model(model, out, AutoTokenizer.from_pretrained(teacher_dir))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Import into a test module to run it on one intra-op thread: tiny models gain nothing from more, and on a busy
    machine every OpenMP region waits for a descheduled worker (a tiny forward measured 35 ms -> 1-2 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
