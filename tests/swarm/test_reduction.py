"""A reducer's weighted mean (`butterfly.Reduction`) against a float64 reference computed directly.

Random group sizes, token weights, vectors of very different scales and every codec: each member's part goes in
chunk by chunk, in a random order across members and chunks (as it arrives over the network). The decoded mean
must lie within the error the codec allows: each member's encoding (weighted), the fp32 sum, and the one
encoding of the mean (in the codec's `mean_codec`: top16 for top4); and the mean's bytes must not depend on the order the chunks came in.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch

from codec_bounds import error_bound
from p2p_diloco.core.codecs import get_codec
from p2p_diloco.swarm.butterfly import Reduction, chunk_spans

CODECS = ["fp32", "fp16", "int8", "fp4", "int2", "sign1", "top4"]


def _reduce(codec, members: list[str], weights: list[float], parts: list[torch.Tensor], order) -> list[bytes]:
    """Every member's chunks into one Reduction in `order` ((member, chunk) pairs); the encoded means."""
    chunks = chunk_spans(parts[0].numel(), codec)

    async def run() -> list[bytes]:
        reduction = Reduction(codec, parts[0].numel(), members, weights, members[0], deadline=10.0)
        for i, k in order:
            lo, hi = chunks[k]
            await reduction.add(members[i], k, weights[i], codec.encode(parts[i][lo:hi]))
        return [await reduction.mean(k, timeout=10.0) for k in range(len(chunks))]

    return asyncio.run(run())


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("seed", range(3))
def test_the_weighted_mean_is_within_the_codec_bound_of_float64_and_independent_of_arrival_order(name, seed):
    rng = random.Random(seed)
    codec = get_codec(name)
    n = rng.randint(2, 6)
    members = [f"peer{i}" for i in range(n)]
    weights = [float(rng.randint(1, 10_000)) for _ in range(n)]  # tokens behind each outer gradient
    numel = rng.randint(50_000, 300_000)  # several chunks for the fp32 and fp16 payloads
    g = torch.Generator().manual_seed(seed)
    # blocks of very different magnitudes, as outer gradients have (and a few exact zeros)
    parts = [torch.randn(numel, generator=g) * torch.exp(torch.randn(numel, generator=g) * 2).clamp(max=1e3)
             for _ in range(n)]
    parts[0][:1000] = 0.0
    chunks = chunk_spans(numel, codec)
    order = [(i, k) for i in range(n) for k in range(len(chunks))]
    rng.shuffle(order)
    means = _reduce(codec, members, weights, parts, order)

    result = np.concatenate([codec.mean_codec.decode(m, hi - lo).numpy() for m, (lo, hi) in zip(means, chunks)])
    total = sum(weights)
    xs = [p.numpy().astype(np.float64) for p in parts]
    reference = sum(w / total * x for w, x in zip(weights, xs))
    # what the members' encodings may move the mean, the fp32 sum's rounding, and the mean's own encoding
    contributions = sum(w / total * error_bound(name, p.numpy()) for w, p in zip(weights, parts))
    decoded = [codec.roundtrip(p).numpy().astype(np.float64) for p in parts]
    summed = sum(abs(w / total * q) for w, q in zip(weights, decoded))
    accumulated = sum(w / total * q for w, q in zip(weights, decoded)).astype(np.float32)
    bound = contributions + summed * (n + 1) * 2.0**-24 + error_bound(codec.mean_codec.name, accumulated) * (1 + 2.0**-16)
    error = np.abs(result.astype(np.float64) - reference)
    worst = int(np.argmax(error - bound))
    assert (error <= bound).all(), (worst, error[worst], bound[worst])

    # any other arrival order gives the same bytes (every member of the group receives these)
    rng.shuffle(order)
    assert _reduce(codec, members, weights, parts, order) == means
