"""Does the embedded teacher's MoE actually specialise? Held-out perplexity and per-expert load per domain.

For each domain (code / prose / maths) of the shipped test split: perplexity, and each layer's share of routed
slots per expert. Specialisation shows as a domain's load concentrating on different experts than the others';
summarised per layer by the Jensen-Shannon divergence between the domains' expert-load distributions (0 = same
experts everywhere, ln 2 = disjoint) and by each domain's top experts.

    python bench/teacher_report.py [--model assets/tiny_teacher] [--split data/tiny_corpus/test.jsonl.gz]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import torch

from zeda_lightning.data.module import ZedaDataModule
from zeda_lightning.export import from_pretrained


def _js(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2
    kl = lambda a, b: float((a * (a.clamp_min(1e-12) / b.clamp_min(1e-12)).log()).sum())  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def report(model_dir: str, split: str, max_length: int = 256, batches: int | None = None) -> dict:
    model = from_pretrained(model_dir)
    dm = ZedaDataModule(tokenizer=model_dir, val_files=split, max_length=max_length, packing=True, batch_size=16)
    dm.setup("validate")
    num_experts = model.config.num_experts
    top_k = model.config.num_experts_per_tok
    nll = defaultdict(float)
    tokens = defaultdict(int)
    load: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(dm.val_dataloader()):
        if batches is not None and i >= batches:
            break
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        per_tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        valid = labels != -100
        router_logits = torch.stack(out.router_logits)  # (L, B*S, N)
        chosen = router_logits.topk(top_k, dim=-1).indices.view(router_logits.shape[0], *batch["input_ids"].shape, top_k)
        for b, d in enumerate(batch["domain"].tolist()):
            name = dm.domains[d]
            nll[name] += float(per_tok[b][valid[b]].sum())
            tokens[name] += int(valid[b].sum())
            counts = torch.stack([torch.bincount(chosen[l, b].flatten(), minlength=num_experts) for l in range(chosen.shape[0])])
            load[name] = load.get(name, 0) + counts.float()
    domains = sorted(load)
    shares = {d: load[d] / load[d].sum(-1, keepdim=True) for d in domains}  # (L, N) per domain
    layers = next(iter(shares.values())).shape[0]
    js = [
        sum(_js(shares[a][l], shares[b][l]) for a in domains for b in domains if a < b) / max(1, len(domains) * (len(domains) - 1) / 2)
        for l in range(layers)
    ]
    return {
        "perplexity": {d: round(math.exp(nll[d] / tokens[d]), 3) for d in domains},
        "tokens": dict(tokens),
        "mean_pairwise_js_per_layer": [round(x, 4) for x in js],
        "top_experts": {d: [shares[d][l].topk(3).indices.tolist() for l in range(layers)] for d in domains},
        "load_share": {d: [[round(x, 3) for x in shares[d][l].tolist()] for l in range(layers)] for d in domains},
        "max_over_mean_load": {d: [round(float(shares[d][l].max() * num_experts), 2) for l in range(layers)] for d in domains},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/tiny_teacher", help="teacher directory")
    parser.add_argument("--split", default="data/tiny_corpus/test.jsonl.gz", help="held-out split")
    parser.add_argument("--batches", type=int, default=None, help="limit the number of batches")
    args = parser.parse_args()
    rep = report(args.model, args.split, batches=args.batches)
    print("held-out perplexity:", rep["perplexity"])
    print("mean pairwise JS divergence of expert load between domains, per layer:", rep["mean_pairwise_js_per_layer"])
    for d, tops in rep["top_experts"].items():
        print(f"  {d:6s} top-3 experts per layer: {tops}   max/mean load: {rep['max_over_mean_load'][d]}")
    print(json.dumps({k: rep[k] for k in ("perplexity", "mean_pairwise_js_per_layer", "top_experts")}))


if __name__ == "__main__":
    main()
