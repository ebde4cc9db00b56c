"""DP-SGD vs plain step time of the trainable head, on ResNet50-sized inputs, side by side.

    .venv/bin/python -m benchmarks.dp_step [--batch 32 --seq-len 8 --steps 20]

Inputs are 2048-d backbone features per image (what a site trains on with the frozen
backbone), the head is the configured one (projection, LinearGRU BiGRU, attention, heads).
Both variants run the same batches, interleaved; the DP one adds Opacus per-sample gradients,
clipping and clipping and noise (hooks mode, as the sites use; the BiGRU's per-study gradients come from one
einsum per weight, see common/model.py LinearGRU). The goal is a ratio <= 3.

Most of the remaining DP cost is memory traffic: the projection's per-study gradients are a
(batch, 128, 2048) tensor that Opacus allocates afresh every step. Sites raise glibc's mmap
threshold before DP training (client/privacy.py keep_large_allocations_in_heap); the benchmark
reports the ratio with glibc's defaults and with that setting, side by side.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common.opacus_import import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import keep_large_allocations_in_heap
from benchmarks import write_result
from common.config import ModelConfig, SharedConfig
from common.model import SequenceHead


def _loss(head, x, m, y):
    """The sites' objective: BCE + severity + reconstruction terms (every head gets gradients)."""
    out = head(x, m)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, y)
    loss = loss + 0.02 * (out.severity ** 2).mean()
    return loss + ((out.reconstruction - 0.5) ** 2).mean()


def time_steps(head, optimizer, batches, warmup: int = 3) -> list[float]:
    times = []
    for i, (x, m, y) in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _loss(head, x, m, y).backward()
        optimizer.step()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/benchmarks/dp_step.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig(SharedConfig(seq_len=args.seq_len))
    n = args.batch * (args.steps + 3)
    features = torch.randn(n, args.seq_len, 2048)
    mask = torch.ones(n, args.seq_len, dtype=torch.bool)
    mask[::3, args.seq_len // 2:] = False  # some shorter studies
    labels = (torch.rand(n, 1) < 0.4).float()
    batches = [(features[i:i + args.batch], mask[i:i + args.batch], labels[i:i + args.batch])
               for i in range(0, n, args.batch)]

    plain = SequenceHead(config).train()
    private = copy.deepcopy(plain)
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=args.batch)
    private, optimizer, _ = engine.make_private(module=private, optimizer=torch.optim.Adam(private.parameters(), lr=1e-3),
                                                data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                poisson_sampling=False)
    def interleaved() -> tuple[float, float]:
        """Median ms per step, plain and DP alternating so drift in machine speed hits both alike."""
        plain_ms, dp_ms = [], []
        for batch in batches:
            plain_ms += time_steps(plain, plain_optimizer, [batch], warmup=0)
            dp_ms += time_steps(private, optimizer, [batch], warmup=0)
        return statistics.median(plain_ms[3:]), statistics.median(dp_ms[3:])

    default_plain, default_dp = interleaved()
    tuned = keep_large_allocations_in_heap()
    plain_ms, dp_ms = interleaved()

    result = {
        "device": f"cpu, {torch.get_num_threads()} threads",
        "batch_studies": args.batch, "seq_len": args.seq_len, "feature_dim": 2048,
        "proj_dim": config.proj_dim, "gru_hidden": config.gru_hidden,
        "trainable_parameters": sum(p.numel() for p in plain.parameters()),
        "glibc_defaults": {"plain_step_ms": round(default_plain, 2), "dp_step_ms": round(default_dp, 2),
                           "dp_over_plain_ratio": round(default_dp / default_plain, 2)},
        "as_sites_run": {"heap_setting_applied": tuned, "plain_step_ms": round(plain_ms, 2),
                         "dp_step_ms": round(dp_ms, 2), "dp_over_plain_ratio": round(dp_ms / plain_ms, 2)},
        "goal_ratio": 3.0,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
