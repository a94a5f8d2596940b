"""The Streaming DiLoCo core against a naive reference loop, bit for bit in fp32, and its failure guarantee."""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from p2p_diloco.core.averaging import (AgreedState, AveragingFailed, FragmentAverage, FragmentAverager,
                                       PendingAverage, RoundKey, RoundReport)
from p2p_diloco.core.codecs import get_codec
from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.core.fragments import split_fragments
from p2p_diloco.core.inner import InnerTrainer, inner_lr
from p2p_diloco.core.local_group import LocalGroup
from p2p_diloco.core.round_subset import covered, gather, subset_size, subset_slice
from p2p_diloco.core.state_hash import state_hash
from p2p_diloco.core.streaming import StreamingDiLoCo
from p2p_diloco.task.model import build_model, lm_loss, model_spec

SPEC = model_spec("tiny")


def batches(worker: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + worker)
    return [torch.randint(0, 256, (2, SPEC.seq_len + 1), generator=g) for _ in range(steps)]


def reference_fragment_names(model, P):
    """Naive: block i of model.model.layers goes to fragment i % P, the rest to fragment P."""
    names = [[] for _ in range(P + 1)]
    block_param = {}
    for i, layer in enumerate(model.model.layers):
        for n, p in layer.named_parameters():
            block_param[id(p)] = (i, f"model.layers.{i}.{n}")
    for i, layer in enumerate(model.model.layers):
        for n, _ in layer.named_parameters():
            names[i % P].append(f"model.layers.{i}.{n}")
    for n, p in model.named_parameters():
        if id(p) not in block_param:
            names[P].append(n)
    return names


def test_fragments_are_strided_blocks_plus_the_rest():
    spec = model_spec("small")  # 4 blocks
    model = build_model(spec, 0)
    for P in (1, 2, 4):
        frags = split_fragments(model, P)
        assert [list(f.names) for f in frags] == reference_fragment_names(model, P)
        assert sum(f.numel for f in frags) == sum(p.numel() for p in model.parameters())
    whole = split_fragments(model, 0)
    assert len(whole) == 1 and whole[0].numel == sum(p.numel() for p in model.parameters())


def test_offsets_spread_over_the_period():
    assert DiLoCoConfig(outer_period=12, fragments=2, tau=1).offsets() == [4, 8, 12]
    assert DiLoCoConfig(outer_period=100, fragments=3, tau=1).offsets() == [25, 50, 75, 100]
    assert DiLoCoConfig(outer_period=10, fragments=0, tau=0).offsets() == [10]


def naive_run(config: DiLoCoConfig, workers: int, steps: int):
    """A plain loop over tensors: per-parameter anchors, a hand-written schedule and outer step."""
    models = [build_model(SPEC, config.seed) for _ in range(workers)]
    trainers = [InnerTrainer(m, config, lm_loss) for m in models]
    data = [batches(w, steps) for w in range(workers)]
    P = config.fragments
    names = reference_fragment_names(models[0], P)
    H, n_frag = config.outer_period, P + 1
    offsets = [(k + 1) * H // n_frag for k in range(n_frag)]
    starts = {k: {o + j * H for j in range(steps) if o + j * H <= steps} for k, o in enumerate(offsets)}
    params = [dict(m.named_parameters()) for m in models]
    anchor = {n: p.detach().clone().float() for n, p in params[0].items()}
    momentum = {n: torch.zeros_like(a) for n, a in anchor.items()}
    pending = {}
    log = []
    theta0 = {}
    for t in range(1, steps + 1):
        for w in range(workers):
            trainers[w].step(data[w][t - 1])
        for k in range(n_frag):
            if t in starts[k]:
                pending[k] = (t, [{n: anchor[n] - params[w][n].detach() for n in names[k]} for w in range(workers)])
                theta0[k] = [{n: params[w][n].detach().clone() for n in names[k]} for w in range(workers)]
        for k in list(pending):
            t0, deltas = pending[k]
            if t0 + config.tau == t:
                del pending[k]
                log.append((t, k))
                for n in names[k]:
                    avg = torch.zeros_like(anchor[n])
                    for w in range(workers):
                        avg += deltas[w][n] * (1.0 / workers)
                    momentum[n] = config.outer_momentum * momentum[n] + avg
                    anchor[n] = anchor[n] - config.outer_lr * (avg + config.outer_momentum * momentum[n])
                    for w in range(workers):
                        with torch.no_grad():
                            if config.overlap == "keep" and t > t0:  # the steps trained meanwhile stay
                                params[w][n].add_((1 - config.alpha) * (anchor[n] - theta0[k][w][n]))
                            else:
                                params[w][n].copy_(config.alpha * params[w][n] + (1 - config.alpha) * anchor[n])
    return anchor, momentum, params, log


def core_run(config: DiLoCoConfig, workers: int, steps: int, group: LocalGroup | None = None):
    group = group or LocalGroup(workers, get_codec(config.codec))
    models = [build_model(SPEC, config.seed) for _ in range(workers)]
    trainers = [InnerTrainer(m, config, lm_loss) for m in models]
    outer = [StreamingDiLoCo(m, config, group.member(w)) for w, m in enumerate(models)]
    data = [batches(w, steps) for w in range(workers)]
    log = []
    for t in range(1, steps + 1):
        for w in range(workers):
            trainers[w].step(data[w][t - 1])
            outer[w].record_tokens(1)
        before = list(outer[0].stats.applied)
        for o in outer:
            o.start_due_rounds(t)
        for o in outer:
            o.finish_due_rounds(t)
        log += [(t, k) for k in range(len(before)) if outer[0].stats.applied[k] > before[k]]
    return outer, models, log


@pytest.mark.parametrize("overlap", ["plain", "keep"])
@pytest.mark.parametrize("tau,alpha", [(0, 0.0), (1, 0.5), (2, 0.3)])
def test_core_matches_naive_reference_bit_for_bit(tau, alpha, overlap):
    config = DiLoCoConfig(outer_period=9, fragments=2, tau=tau, alpha=alpha, outer_lr=0.7, codec="fp32",
                          warmup_steps=3, total_steps=40, inner_lr=3e-3, overlap=overlap)
    steps = 31
    anchor, momentum, params, ref_log = naive_run(config, workers=3, steps=steps)
    outer, models, log = core_run(config, workers=3, steps=steps)
    assert log == ref_log and len(log) >= 9
    names = reference_fragment_names(models[0], 2)
    for k, frag_names in enumerate(names):
        flat_ref = torch.cat([anchor[n].reshape(-1) for n in frag_names])
        flat_mom = torch.cat([momentum[n].reshape(-1) for n in frag_names])
        for o in outer:
            assert torch.equal(o.anchors[k], flat_ref)
            assert torch.equal(o.momenta[k], flat_mom)
    for w, m in enumerate(models):
        for n, p in m.named_parameters():
            assert torch.equal(p.detach(), params[w][n].detach()), n


def snapshot(o: StreamingDiLoCo):
    return ([a.clone() for a in o.anchors], [m.clone() for m in o.momenta],
            [f.flat() for f in o.fragments], copy.deepcopy(o.residuals))


def assert_same(a, b):
    for xs, ys in zip(a[:3], b[:3]):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)
    if a[3] is not None:
        for x, y in zip(a[3], b[3]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("error_feedback", [False, True])
def test_failed_round_leaves_anchor_momentum_and_params_untouched(error_feedback):
    config = DiLoCoConfig(outer_period=6, fragments=1, tau=1, alpha=0.5, codec="fp4",
                          error_feedback=error_feedback, warmup_steps=1, total_steps=30, inner_lr=3e-3)
    failing = {("local", 0, 1)}
    group = LocalGroup(2, get_codec("fp4"), fail=lambda key: (key.run_id, key.fragment, key.round) in failing)
    models = [build_model(SPEC, 0) for _ in range(2)]
    trainers = [InnerTrainer(m, config, lm_loss) for m in models]
    outer = [StreamingDiLoCo(m, config, group.member(w)) for w, m in enumerate(models)]
    data = [batches(w, 20) for w in range(2)]
    checked = False
    for t in range(1, 21):
        for w in range(2):
            trainers[w].step(data[w][t - 1])
        for o in outer:
            o.start_due_rounds(t)
        if t == 9:  # fragment 0 (offset 3) started round 1 at t=9; it fails at its finish
            before = [snapshot(o) for o in outer]
            for o in outer:
                o.finish_due_rounds(t + 1)
            for o, b in zip(outer, before):
                assert_same(snapshot(o), b)
                assert o.stats.failed == [1, 0]
            checked = True
            continue
        for o in outer:
            o.finish_due_rounds(t)
    assert checked
    assert outer[0].stats.applied[0] >= 2  # rounds after the failed one apply again
    for a, b in zip(outer[0].anchors, outer[1].anchors):
        assert torch.equal(a, b)


class _BadAverager(FragmentAverager):
    def __init__(self, mean_fn=None, raise_on_begin=False):
        self.mean_fn, self.raise_on_begin = mean_fn, raise_on_begin

    def begin(self, key, outer_grad, weight):
        if self.raise_on_begin:
            raise AveragingFailed("no peers")
        mean_fn = self.mean_fn

        class P(PendingAverage):
            def result(self):
                return FragmentAverage(mean_fn(outer_grad), 2, weight)
        return P()


@pytest.mark.parametrize("averager", [
    _BadAverager(lambda g: torch.full_like(g, float("nan"))),
    _BadAverager(lambda g: torch.full_like(g, float("inf"))),
    _BadAverager(lambda g: g[:-1].clone()),
    _BadAverager(lambda g: g.double()),
    _BadAverager(raise_on_begin=True),
], ids=["nan", "inf", "short", "float64", "begin-fails"])
def test_untrustworthy_average_is_a_failure(averager):
    config = DiLoCoConfig(outer_period=4, fragments=1, tau=0, alpha=0.5, codec="fp32", warmup_steps=1)
    model = build_model(SPEC, 0)
    trainer = InnerTrainer(model, config, lm_loss)
    o = StreamingDiLoCo(model, config, averager)
    for t, b in enumerate(batches(0, 2), start=1):
        trainer.step(b)
        o.record_tokens(10)
    before = snapshot(o)
    o.sync(2)  # fragment 0 has offset 2
    assert_same(snapshot(o), before)
    assert o.stats.failed[0] == 1 and o.stats.applied[0] == 0
    assert o.tokens_since_sync[0] == 20  # the next round still carries this progress


def test_final_rounds_bring_all_progress_into_the_anchors():
    config = DiLoCoConfig(outer_period=6, fragments=2, tau=1, alpha=0.5, codec="fp32", warmup_steps=1)
    outer, models, _ = core_run(config, workers=2, steps=10)
    for o in outer:
        o.finish_in_flight()
    for o in outer:
        o.start_final_rounds(10)
    for o in outer:
        o.finish_in_flight()
    assert not outer[0].in_flight
    # every fragment had a round that started at step 10
    assert [s for s in outer[0].stats.applied] == [3, 2, 2]
    for a, b in zip(outer[0].anchors, outer[1].anchors):
        assert torch.equal(a, b)


def test_a_worker_that_has_not_trained_sits_the_final_rounds_out():
    """A peer that joined at the run's end (or resumed there) starts no final round that nobody else would search a
    group for; it marks the rounds as sat out, to take their result at the reconcile. One that trained takes part,
    progress since its last round or not."""
    config = DiLoCoConfig(outer_period=6, fragments=2, tau=1, alpha=0.5, codec="fp32", warmup_steps=1)
    model = build_model(SPEC, 0)
    o = StreamingDiLoCo(model, config, LocalGroup(1, get_codec("fp32")).member(0))
    end = next(s for s in range(10, 40) if all(o.round_at(k, s) is None for k in range(3)))  # no round due there
    assert o.start_final_rounds(end, trained=False) == [0, 1, 2] and not o.in_flight
    assert o.stats.started == [0, 0, 0] and o.last_round == [o.schedule.next_round(k, end) for k in range(3)]
    assert o.start_final_rounds(end, trained=False) == []  # already sat out
    assert o.start_final_rounds(end) == [] and sorted(o.in_flight) == [0, 1, 2]


def test_anchors_load_into_an_eval_model():
    config = DiLoCoConfig(outer_period=6, fragments=2, tau=1, codec="fp32", warmup_steps=1)
    outer, models, _ = core_run(config, workers=2, steps=8)
    eval_model = build_model(SPEC, 123)
    outer[0].load_anchors_into(eval_model)
    for frag, anchor in zip(split_fragments(eval_model, 2), outer[0].anchors):
        assert torch.equal(frag.flat(), anchor)


class _Swarm(FragmentAverager):
    """A scripted swarm: what the others report (round, hashes), the states they serve, rounds not done yet."""

    def __init__(self):
        self.reports: dict[int, RoundReport] = {}
        self.states: dict[tuple[int, str], AgreedState] = {}
        self.pending: list = []
        self.ready = True
        self.published: list[tuple[RoundKey, str]] = []

    def begin(self, key, outer_grad, weight):
        swarm = self

        class P(PendingAverage):
            def done(self):
                return swarm.ready

            def result(self):
                return FragmentAverage(outer_grad.clone(), 1, weight)
        self.pending.append(key)
        return P()

    def holds(self, round_, state):
        """Another peer can serve `state` as the agreed state of `round_`; returns its hash."""
        digest = state_hash(state.anchor, state.momentum)
        self.states[(round_, digest)] = state
        return digest

    def applied(self, key, anchor, momentum, digest):
        self.published.append((key, digest))

    def latest_agreed(self, fragment, upto):
        reports = self.reports.get(fragment)
        reports = [reports] if isinstance(reports, RoundReport) else reports or []
        return max((r for r in reports if r.round <= upto), key=lambda r: r.round, default=None)

    def recover(self, key, digest=None):
        return self.states.get((key.round, digest))


def one_fragment_worker(swarm, outer_period=6):
    config = DiLoCoConfig(outer_period=outer_period, fragments=0, tau=1, alpha=0.5, codec="fp32", warmup_steps=1)
    model = build_model(SPEC, 0)
    return StreamingDiLoCo(model, config, swarm), config


def test_a_worker_behind_the_swarm_adopts_its_newer_state_before_averaging():
    swarm = _Swarm()
    o, config = one_fragment_worker(swarm)
    n = o.anchors[0].numel()
    state = AgreedState(torch.full((n,), 0.5), torch.full((n,), 0.25))
    digest = swarm.holds(4, state)
    swarm.reports[0] = RoundReport(4, {digest: 2})
    o.sync(o.offsets[0] + 5 * 6)  # round 5 is due; this worker holds the seed (round -1)
    assert o.base_round[0] == 4 and o.stats.recovered[0] == 1
    assert swarm.pending == [RoundKey("local", 0, 5)]  # then it averages round 5 from the swarm's state
    assert swarm.published[0] == (RoundKey("local", 0, 4), digest)  # it serves what it adopted


def test_a_state_that_downloads_slowly_comes_in_the_background_and_the_next_round_starts_from_it(monkeypatch):
    monkeypatch.setattr("p2p_diloco.core.catch_up.CATCH_UP_WAIT_S", 0.01)
    swarm = _Swarm()
    downloads: list[tuple[RoundKey, Future]] = []

    def slow_fetch(key, digest=None):  # a slow link: the state is still on its way when the round starts
        downloads.append((key, Future()))
        return downloads[-1][1]
    swarm.fetch = slow_fetch
    o, config = one_fragment_worker(swarm)
    n = o.anchors[0].numel()
    state4 = AgreedState(torch.full((n,), 0.5), torch.full((n,), 0.25))
    swarm.reports[0] = RoundReport(4, {swarm.holds(4, state4): 2})
    o.sync(o.offsets[0] + 5 * 6)  # round 5 is due; this worker holds the seed: it asks for round 4's state...
    assert swarm.pending == [] and o.stats.failed[0] == 1 and o.base_round[0] == -1  # ...sits round 5 out...
    # ...and asks for what it will need instead: round 5's state, once the others hold it
    assert [k for k, _ in downloads] == [RoundKey("local", 0, 4), RoundKey("local", 0, 5)]
    o.sync(o.offsets[0] + 5 * 6 + 1)  # it trains on meanwhile: no other download
    assert len(downloads) == 2 and o.base_round[0] == -1
    state5 = AgreedState(torch.full((n,), 0.75), torch.full((n,), 0.5))
    swarm.reports[0] = RoundReport(5, {swarm.holds(5, state5): 2})
    downloads[0][1].set_result(state4)  # superseded: dropped
    downloads[1][1].set_result(state5)
    o.sync(o.offsets[0] + 5 * 6 + 2)  # adopted after the next step, not at a round start
    assert o.base_round[0] == 5 and o.stats.recovered[0] == 1 and torch.equal(o.momenta[0], state5.momentum)
    o.sync(o.offsets[0] + 6 * 6)  # round 6 averages from it
    assert swarm.pending == [RoundKey("local", 0, 6)] and len(downloads) == 2
    # at the end of a run (reconcile) a download under way is waited for
    swarm.reports[0] = RoundReport(6, {swarm.holds(6, state5): 3})
    o.finish_in_flight()
    threading.Timer(0.2, lambda: downloads[-1][1].set_result(state5)).start()
    o.reconcile()
    assert o.base_round[0] == 6 and len(downloads) == 3 and o.stats.resynced[0] == 1


def test_a_download_that_fails_in_the_background_leaves_the_fragment_as_it_was(monkeypatch):
    monkeypatch.setattr("p2p_diloco.core.catch_up.CATCH_UP_WAIT_S", 0.01)
    swarm = _Swarm()
    downloads: list[Future] = []

    def failing_fetch(key, digest=None):
        downloads.append(Future())
        return downloads[-1]
    swarm.fetch = failing_fetch
    o, config = one_fragment_worker(swarm)
    n = o.anchors[0].numel()
    swarm.reports[0] = RoundReport(4, {swarm.holds(4, AgreedState(torch.zeros(n), torch.ones(n))): 2})
    anchor = o.anchors[0].clone()
    o.sync(o.offsets[0] + 5 * 6)  # behind: the download starts, the round is sat out
    downloads[-1].set_exception(ConnectionError("the DHT went away"))
    o.sync(o.offsets[0] + 5 * 6 + 1)  # a failed lookup or transfer is "nobody could hand it over": training goes on
    assert not o.fetching and o.base_round[0] == -1 and torch.equal(o.anchors[0], anchor)


def test_a_joiner_takes_an_older_agreed_state_when_nobody_can_serve_the_latest():
    swarm = _Swarm()
    o, config = one_fragment_worker(swarm)
    n = o.anchors[0].numel()
    older = AgreedState(torch.full((n,), 0.5), torch.full((n,), 0.25))
    digest = swarm.holds(3, older)
    swarm.reports[0] = [RoundReport(3, {digest: 1}), RoundReport(4, {"f" * 64: 1})]  # round 4: its holder died
    assert o.adopt_swarm_state(o.offsets[0] + 5 * 6) == [3]
    assert torch.equal(o.anchors[0], older.anchor) and o.base_round[0] == 3
    swarm.reports[0] = [RoundReport(4, {"f" * 64: 1})]  # nothing servable at all: a clear error
    with pytest.raises(AveragingFailed, match="could not download the swarm's state of fragment 0"):
        one_fragment_worker(swarm)[0].adopt_swarm_state(o.offsets[0] + 5 * 6)


def test_a_worker_that_disagrees_with_the_majority_downloads_its_state():
    swarm = _Swarm()
    o, _ = one_fragment_worker(swarm)
    n = o.anchors[0].numel()
    o.sync(o.offsets[0])  # round 0 applies alone (the scripted swarm echoes our own outer gradient)
    o.sync(o.offsets[0] + 1)
    assert o.base_round[0] == 0
    majority = AgreedState(torch.zeros(n), torch.ones(n))
    digest = state_hash(majority.anchor, majority.momentum)
    swarm.reports[0] = RoundReport(0, {digest: 2})  # two others hold another state of round 0
    swarm.states[(0, digest)] = majority
    o.sync(o.offsets[0] + 6)
    assert o.stats.resynced[0] == 1 and torch.equal(o.momenta[0], majority.momentum)
    # with a single other peer the tie goes to the smaller hash, on both sides
    assert RoundReport(0, {"b" * 64: 1}).majority("a" * 64) == "a" * 64
    assert RoundReport(0, {"a" * 64: 1}).majority("b" * 64) == "a" * 64


def test_a_newer_round_held_by_a_single_peer_is_not_adopted_until_a_second_one_holds_it():
    """One peer publishing a round of its own making (a zeroed state) under the next round: the others pass it
    over; an honest round has at least two holders (a group of two or more applied it)."""
    swarm = _Swarm()
    o, config = one_fragment_worker(swarm)
    n = o.anchors[0].numel()
    zeroed = AgreedState(torch.zeros(n), torch.zeros(n))
    swarm.reports[0] = RoundReport(4, {swarm.holds(4, zeroed): 1}, voters=3)
    anchor = o.anchors[0].clone()
    o.sync(o.offsets[0] + 5 * 6)  # round 5 is due: the forged round 4 is passed over, round 5 averaged as held
    assert o.base_round[0] == -1 and o.stats.recovered[0] == 0 and swarm.pending == [RoundKey("local", 0, 5)]
    assert torch.equal(o.anchors[0], anchor) and (0, 4) in o.unbacked
    # a joiner passes it over too, and takes the older round two peers hold
    older = AgreedState(torch.full((n,), 0.5), torch.full((n,), 0.25))
    swarm.reports[0] = [RoundReport(3, {swarm.holds(3, older): 2}, voters=3),
                        RoundReport(4, {swarm.holds(4, zeroed): 1}, voters=3)]
    joiner, _ = one_fragment_worker(swarm)
    assert joiner.adopt_swarm_state(joiner.offsets[0] + 5 * 6) == [3]
    assert torch.equal(joiner.anchors[0], older.anchor)
    # the same round, another state from one peer, against this peer's own: this peer keeps its own
    assert RoundReport(3, {"0" * 64: 1}, voters=2).agreed("f" * 64) == "f" * 64
    assert RoundReport(3, {"0" * 64: 2}, voters=2).agreed("f" * 64) == "0" * 64
    # the only other peer of the swarm: one voice is all there is
    assert RoundReport(3, {"0" * 64: 1}, voters=1).agreed() == "0" * 64
    # at the very end of a run (reconcile) one holder is enough: a round applied on one member and failed on the
    # other has no other holder, and the swarm would end apart
    o.finish_in_flight()
    assert o.base_round[0] == 5
    swarm.reports[0] = RoundReport(6, {swarm.holds(6, zeroed): 1}, voters=3)
    o.reconcile()
    assert o.base_round[0] == 6 and torch.equal(o.anchors[0], zeroed.anchor) and not o.reconciling


def test_a_joiner_waits_a_moment_for_the_newest_round_s_second_holder():
    """The members of a round's group publish their hashes moments apart: a joiner reading them in between sees
    the newest round with one holder. It waits (up to `backing_wait_s`) for the second rather than starting a
    fragment from an older round or the seed."""
    swarm = _Swarm()
    o, _ = one_fragment_worker(swarm)
    n = o.anchors[0].numel()
    newest = AgreedState(torch.full((n,), 0.5), torch.full((n,), 0.25))
    digest = swarm.holds(4, newest)
    swarm.reports[0] = RoundReport(4, {digest: 1}, voters=2)  # the other member still holds round 3, unpublished
    threading.Timer(0.3, lambda: swarm.reports.update({0: RoundReport(4, {digest: 2}, voters=2)})).start()
    began = time.monotonic()
    assert o.adopt_swarm_state(o.offsets[0] + 5 * 6, backing_wait_s=5.0) == [4]
    assert time.monotonic() - began < 2 and torch.equal(o.anchors[0], newest.anchor)
    # never backed (each live peer holds a round of its own): after the wait, the OLDEST round some peer holds
    older = AgreedState(torch.full((n,), 0.25), torch.full((n,), 0.5))
    swarm.reports[0] = [RoundReport(3, {swarm.holds(3, older): 1}, voters=2), RoundReport(4, {digest: 1}, voters=2)]
    joiner, _ = one_fragment_worker(swarm)
    began = time.monotonic()
    assert joiner.adopt_swarm_state(joiner.offsets[0] + 5 * 6, backing_wait_s=0.5) == [3]
    assert 0.5 <= time.monotonic() - began < 2 and torch.equal(joiner.anchors[0], older.anchor)
    # the oldest held round's only holder just died (its record not stale yet): the newer round, from a live peer
    # (CI: a newcomer gave up on the fragment after 5 attempts at the dead donor)
    swarm.reports[0] = [RoundReport(3, {"e" * 64: 1}, voters=2), RoundReport(4, {digest: 1}, voters=2)]
    joiner, _ = one_fragment_worker(swarm)
    assert joiner.adopt_swarm_state(joiner.offsets[0] + 5 * 6, backing_wait_s=0.1) == [4]
    assert torch.equal(joiner.anchors[0], newest.anchor)


def test_a_round_not_done_yet_lets_training_go_on_until_the_next_one_is_due():
    swarm = _Swarm()
    swarm.ready = False
    o, _ = one_fragment_worker(swarm)
    start = o.offsets[0]
    o.sync(start)
    for s in range(start + 1, start + 5):
        o.sync(s)
        assert 0 in o.in_flight  # matchmaking is still going on: no wait
    o.sync(start + 5)  # one step before the next round: take the result now
    assert 0 not in o.in_flight and o.stats.applied[0] == 1


def test_a_clock_jump_sits_out_rounds_that_started_more_than_max_lag_ago():
    swarm = _Swarm()
    o, _ = one_fragment_worker(swarm)
    o.advance(0, o.offsets[0] + 2 * 6 + 2, max_lag=1)  # rounds 0, 1, 2 were due; round 2 two steps ago
    assert swarm.pending == [] and o.stats.failed[0] == 3
    o.advance(o.offsets[0] + 2 * 6 + 2, o.offsets[0] + 3 * 6 + 1, max_lag=1)  # round 3: one step ago
    assert swarm.pending == [RoundKey("local", 0, 3)]


def test_a_clock_jump_sits_out_rounds_older_than_a_period():
    swarm = _Swarm()
    o, _ = one_fragment_worker(swarm)
    o.advance(0, o.offsets[0] + 3 * 6)  # rounds 0, 1, 2 and 3 were due; only round 3 is recent
    assert swarm.pending == [RoundKey("local", 0, 3)]
    assert o.stats.failed[0] == 3
    # the latest round started or sat out, whatever became of it: at the end of a run a peer whose last round
    # failed waits for the others to hold that round (then takes their state of it)
    assert o.last_round == [3] and o.base_round == [-1]


def test_a_late_joiner_warms_up_then_follows_the_swarm_schedule():
    config = DiLoCoConfig(warmup_steps=10, total_steps=100, inner_lr=1e-2)
    trainer = InnerTrainer(build_model(SPEC, 0), config, lm_loss)
    lrs = []
    for b in batches(0, 12):
        trainer.step(b, schedule_step=80)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3)  # its own warmup...
    assert lrs[-1] == pytest.approx(inner_lr(config, 80))  # ...capped by the swarm's cosine


@pytest.mark.parametrize("codec,decay", [("top4", 0.95), ("top4", 1.0), ("int2", 0.5)])
def test_error_feedback_carries_the_decayed_residual_of_what_the_codec_did_not_send(codec, decay):
    """Each round sends outer_grad = anchor - theta + ef_decay * residual, and keeps residual = what its codec
    drops of that; with outer momentum 0, outer lr 1 and alpha 0 (SparseLoCo) the anchor moves by the mean alone
    and the worker is back on the anchor after each round."""
    sent = []

    class Echo(_BadAverager):  # the mean of a group of one: what this worker's codec sends
        def begin(self, key, outer_grad, weight):
            sent.append(outer_grad.clone())
            return super().begin(key, outer_grad, weight)

    c = get_codec(codec)
    config = DiLoCoConfig(outer_period=3, fragments=0, tau=0, alpha=0.0, codec=codec, error_feedback=True,
                          ef_decay=decay, outer_momentum=0.0, outer_lr=1.0, warmup_steps=1, inner_lr=1e-2)
    model = build_model(SPEC, 0)
    trainer = InnerTrainer(model, config, lm_loss)
    o = StreamingDiLoCo(model, config, Echo(lambda g: c.roundtrip(g)))
    residual = torch.zeros_like(o.anchors[0])
    for t, b in enumerate(batches(0, 9), start=1):
        trainer.step(b)
        if t % 3 == 0:
            anchor, theta = o.anchors[0].clone(), o.fragments[0].flat()
            o.sync(t)
            expected = anchor - theta + decay * residual
            assert torch.equal(sent[-1], expected)
            residual = expected - c.roundtrip(expected)
            assert torch.equal(o.residuals[0], residual)
            assert torch.equal(o.anchors[0], anchor - c.roundtrip(expected))
            assert torch.equal(o.fragments[0].flat(), o.anchors[0])
    assert len(sent) == 3 and residual.abs().sum() > 0


@pytest.mark.parametrize("numel,stride", [(10, 3), (9, 3), (7, 1), (5, 8)])
def test_stride_rounds_cover_every_value_once_in_a_fixed_size(numel, stride):
    values = torch.arange(1, numel + 1, dtype=torch.float32)
    seen = torch.zeros(numel)
    for r in range(stride):
        picked = gather(values, stride, r)
        assert picked.numel() == subset_size(numel, stride)
        n = covered(numel, stride, r)
        assert torch.equal(picked[n:], torch.zeros(picked.numel() - n))  # the pad
        assert torch.equal(picked[:n], values[subset_slice(stride, r)])
        seen[subset_slice(stride, r)] += 1
    assert torch.equal(seen, torch.ones(numel))
    assert torch.equal(gather(values, stride, stride + 1), gather(values, stride, 1))


@pytest.mark.parametrize("error_feedback", [False, True])
def test_a_strided_round_averages_moves_and_merges_only_its_share_of_the_fragment(error_feedback):
    """With sync_stride S, round r sends every S-th value of anchor - theta from r mod S (the pad a zero), applies
    the outer Nesterov step and the merge to those values only, and leaves the rest of anchor, momentum, working
    parameters (and error-feedback residual) exactly as they were."""
    sent = []
    codec = "int2" if error_feedback else "fp32"
    c = get_codec(codec)

    class Echo(_BadAverager):  # the mean of a group of one: what this worker's codec sends
        def begin(self, key, outer_grad, weight):
            sent.append((key.round, outer_grad.clone()))
            return super().begin(key, outer_grad, weight)

    S = 3
    config = DiLoCoConfig(outer_period=2, fragments=0, tau=0, alpha=0.5, codec=codec, error_feedback=error_feedback,
                          sync_stride=S, warmup_steps=1, inner_lr=1e-2)
    model = build_model(SPEC, 0)
    trainer = InnerTrainer(model, config, lm_loss)
    o = StreamingDiLoCo(model, config, Echo(lambda g: c.roundtrip(g)))
    n = o.anchors[0].numel()
    assert n % S != 0 and o.round_size(0) == subset_size(n, S)  # (the pad is exercised)
    residual = torch.zeros(n)
    for t, b in enumerate(batches(0, 8), start=1):
        trainer.step(b)
        if t % 2:
            continue
        before = snapshot(o)
        anchor, momentum, theta = before[0][0], before[1][0], before[2][0]
        r = o.round_at(0, t)
        o.sync(t)
        sel = subset_slice(S, r)
        outer = anchor - theta + residual
        expected = gather(outer, S, r)
        assert sent[-1][0] == r and torch.equal(sent[-1][1], expected)
        avg = c.roundtrip(expected)[:covered(n, S, r)]
        m, a, th = momentum.clone(), anchor.clone(), theta.clone()
        m[sel] = 0.9 * m[sel] + avg
        a[sel] = a[sel] - 0.7 * (avg + 0.9 * m[sel])
        th[sel] = 0.5 * th[sel] + 0.5 * a[sel]
        assert torch.equal(o.momenta[0], m) and torch.equal(o.anchors[0], a)
        assert torch.equal(o.fragments[0].flat(), th)
        if error_feedback:
            residual[sel] = outer[sel] - c.roundtrip(outer[sel])
            assert torch.equal(o.residuals[0], residual)
    assert [r for r, _ in sent] == [0, 1, 2, 3]


def test_final_passes_of_a_strided_run_bring_every_value_s_progress_into_the_anchors():
    """With sync_stride S the end of a run takes S final rounds, each for its share: afterwards (outer lr 1,
    momentum 0, alpha 0, fp32) every value of every anchor is the workers' mean, the same on both."""
    S = 3
    config = DiLoCoConfig(outer_period=6, fragments=1, tau=0, alpha=0.0, outer_lr=1.0, outer_momentum=0.0,
                          codec="fp32", sync_stride=S, warmup_steps=1, inner_lr=1e-2)
    outer, models, _ = core_run(config, workers=2, steps=8)
    thetas = [[f.flat() for f in o.fragments] for o in outer]
    assert outer[0].final_passes == S
    for p in range(S):
        for o in outer:
            o.start_final_rounds(8, final_pass=p)
        for o in outer:
            o.finish_in_flight()
    for k in range(len(outer[0].fragments)):
        mean = (thetas[0][k] + thetas[1][k]) / 2
        assert torch.allclose(outer[0].anchors[k], mean, atol=1e-6, rtol=0)
        assert torch.equal(outer[0].anchors[k], outer[1].anchors[k])
    assert outer[0].last_round == [r + S - 1 for r in (1, 1)]


def test_an_adopted_strided_state_merges_only_the_values_of_the_rounds_this_worker_missed():
    """With sync_stride S, adopting the state of a round g rounds newer than this worker's anchor merges the
    values of those g rounds (all of them once g >= S, or for another state of the same round); the other values
    keep their local progress."""
    S = 3
    config = DiLoCoConfig(outer_period=4, fragments=0, tau=0, alpha=0.0, codec="fp32", sync_stride=S, warmup_steps=1)
    model = build_model(SPEC, 0)
    o = StreamingDiLoCo(model, config, _BadAverager(lambda g: g))
    n = o.anchors[0].numel()
    for round_, base, merged in [(1, 0, [1]), (3, 1, [2, 3]), (7, 3, [4, 5, 6, 7]), (7, 7, [0, 1, 2])]:
        o.base_round[0] = base
        theta = torch.randn(n)
        o.fragments[0].assign(theta)
        state = AgreedState(torch.randn(n), torch.randn(n))
        assert o._adopt(0, RoundKey("local", 0, round_), state, count=False)
        mask = torch.zeros(n, dtype=torch.bool)
        for r in merged:
            mask[subset_slice(S, r)] = True
        after = o.fragments[0].flat()
        assert torch.equal(after[mask], state.anchor[mask]) and torch.equal(after[~mask], theta[~mask])
        assert torch.equal(o.anchors[0], state.anchor) and o.base_round[0] == round_


@pytest.mark.parametrize("overlap", ["keep", "eager"])
@pytest.mark.parametrize("stride,alpha", [(1, 0.5), (1, 0.0), (2, 0.5)])
def test_a_late_mean_keeps_the_steps_trained_while_it_was_in_flight(overlap, stride, alpha):
    """A mean that lands d inner steps after its round started: anchor and momentum move exactly as with the plain
    merge (peers stay equal whatever their delays). keep: the working values become
    theta + (1 - alpha) (anchor - theta0), theta0 those of the round's start; eager: at the start they move by
    s = (1 - alpha) (est - theta0), est the anchor this worker's own outer gradient alone gives, and at the finish
    by (1 - alpha) (anchor - theta0) - s. With a stride only the round's share of the fragment; the rest as
    trained."""
    runs = {}
    for mode in ("plain", overlap):
        swarm = _Swarm()
        swarm.ready = False
        config = DiLoCoConfig(outer_period=8, fragments=0, tau=1, alpha=alpha, codec="fp32", warmup_steps=1,
                              sync_stride=stride, overlap=mode)
        model = build_model(SPEC, 0)
        trainer = InnerTrainer(model, config, lm_loss)
        o = StreamingDiLoCo(model, config, swarm)
        start = o.offsets[0]
        for t, b in enumerate(batches(0, start + 5), start=1):
            trainer.step(b)
            if t == start:
                theta0, anchor0, momentum0 = o.fragments[0].flat(), o.anchors[0].clone(), o.momenta[0].clone()
            if t == start + 5:  # the mean is ready 5 steps after the round started
                swarm.ready = True
                theta = o.fragments[0].flat()
            o.sync(t)
            if t == start:
                after_start = o.fragments[0].flat()
        assert o.stats.applied[0] == 1
        runs[mode] = (o.anchors[0].clone(), o.momenta[0].clone(), o.fragments[0].flat(), theta0, theta, after_start)
    plain, late = runs["plain"], runs[overlap]
    assert torch.equal(plain[0], late[0]) and torch.equal(plain[1], late[1])
    anchor, _, merged, theta0, theta, after_start = late
    share = subset_slice(stride, 0) if stride > 1 else slice(None)
    shift = torch.zeros_like(theta0)
    if overlap == "eager":
        own = (anchor0 - theta0)[share]
        estimate = anchor0[share] - 0.7 * (own + 0.9 * (0.9 * momentum0[share] + own))
        shift[share] = (1 - alpha) * (estimate - theta0[share])
    assert torch.allclose(after_start, theta0 + shift, rtol=0, atol=1e-6)
    expected = theta.clone()
    expected[share] += (1 - alpha) * (anchor[share] - theta0[share]) - shift[share]
    assert torch.allclose(merged, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(merged, plain[2], rtol=0, atol=1e-4)  # (the plain merge drops that progress)
    if stride > 1:
        rest = torch.ones_like(theta, dtype=torch.bool)
        rest[share] = False
        assert torch.equal(merged[rest], theta[rest])


@pytest.mark.parametrize("error_feedback", [False, True])
def test_a_failed_eager_round_takes_its_merge_back(error_feedback):
    """overlap eager: the working values moved at the start toward this worker's own estimate; when the round
    fails that move is taken back, and anchor, momentum (and residual) stay as they were."""
    config = DiLoCoConfig(outer_period=6, fragments=0, tau=1, alpha=0.5, codec="fp4", error_feedback=error_feedback,
                          warmup_steps=1, overlap="eager")
    model = build_model(SPEC, 0)
    trainer = InnerTrainer(model, config, lm_loss)
    o = StreamingDiLoCo(model, config, _BadAverager(lambda g: torch.full_like(g, float("nan"))))
    for t, b in enumerate(batches(0, 6), start=1):
        trainer.step(b)
        o.record_tokens(1)
    before = snapshot(o)
    o.start_due_rounds(6)
    assert not torch.equal(o.fragments[0].flat(), before[2][0])  # the eager merge
    o.finish_due_rounds(7)
    assert o.stats.failed[0] == 1
    after = snapshot(o)
    assert_same((after[0], after[1], before[2], after[3]), before)
    assert torch.allclose(after[2][0], before[2][0], rtol=0, atol=1e-6)  # (to float rounding: theta + s - s)


@pytest.mark.parametrize("weighting", ["tokens", "uniform", "per_token"])
def test_the_weighting_rule_sets_each_part_s_weight_and_scale_and_a_failed_round_carries_both(weighting):
    """A worker training every other step (10 tokens each): by tokens its part weighs the tokens since its last
    round; uniform weighs 1; per_token weighs the tokens and scales the outer gradient to the tokens of every
    step meanwhile (here x2). A failed round puts tokens and steps back: the next part counts both periods."""
    sent = []

    class Capture(_BadAverager):
        def begin(self, key, outer_grad, weight):
            sent.append((outer_grad.clone(), weight))
            if len(sent) == 1:
                raise AveragingFailed("the first round fails")
            return super().begin(key, outer_grad, weight)

    config = DiLoCoConfig(outer_period=6, fragments=0, tau=0, alpha=0.0, codec="fp32", warmup_steps=1,
                          weighting=weighting)
    model = build_model(SPEC, 0)
    trainer = InnerTrainer(model, config, lm_loss)
    o = StreamingDiLoCo(model, config, Capture(lambda g: g.clone()))
    data = batches(0, 12)
    for t in range(1, 13):
        if t % 2:
            trainer.step(data[t - 1])
            o.record_tokens(10)
        if t in (6, 12):
            outer_grad = o.anchors[0] - o.fragments[0].flat()
        o.sync(t)
        if t in (6, 12):
            tokens, steps = (30, 6) if t == 6 else (60, 12)  # (the failed first round's put back)
            weight, scale = {"tokens": (tokens, 1.0), "uniform": (1.0, 1.0),
                             "per_token": (tokens, steps * 10 / tokens)}[weighting]
            grad, w = sent[-1]
            assert w == weight and torch.allclose(grad, outer_grad * scale, rtol=1e-6, atol=0)
    assert len(sent) == 2 and o.stats.failed[0] == 1 and o.stats.applied[0] == 1


def test_the_round_log_says_when_each_round_started_and_ended_and_what_became_of_it():
    """`round_log` (kept when asked for): applied with its realized delay, group size and weights; failed; sat
    out (a clock jump); nothing when not asked for."""
    swarm = _Swarm()
    o, _ = one_fragment_worker(swarm)  # H = 6, offset 6, tau 1
    o.round_log = []
    swarm.ready = False
    for t in range(1, 10):
        o.record_tokens(5)
        if t == 9:
            swarm.ready = True
        o.sync(t)
    assert o.round_log == [{"fragment": 0, "round": 0, "start_step": 6, "end_step": 9, "outcome": "applied",
                            "tokens": 30, "peers": 1, "group_weight": 30.0}]
    o.advance(9, 6 * 4 + 1)  # rounds 1, 2 and 3 due on the way: 1 and 2 sat out, 3 run
    assert [(r["round"], r["start_step"], r["outcome"]) for r in o.round_log[1:]] == [
        (1, 12, "sat_out"), (2, 18, "sat_out"), (3, 24, "applied")]
    quiet = StreamingDiLoCo(build_model(SPEC, 0), o.config, _BadAverager(raise_on_begin=True))
    quiet.advance(0, 7)
    assert quiet.round_log is None and quiet.stats.failed[0] == 1
    quiet.round_log = []
    quiet.advance(7, 13)
    assert [(r["round"], r["outcome"], r["tokens"]) for r in quiet.round_log] == [(1, "failed", 1)]


@pytest.mark.parametrize("rule", ["average", "sit_out"])
def test_a_worker_behind_whose_newer_state_cannot_be_fetched_averages_with_its_own_by_default(rule):
    """The stale-anchor rule (README: Stale anchors, measured): the others hold a newer agreed round that nobody
    can hand over; by default ("average") this worker takes part in the round with its outer gradient against
    its own older anchor, and re-downloads at the next round; "sit_out" (the simulator's alternative) leaves the
    round to the others. Either way nothing of its state changes before the round."""
    swarm = _Swarm()
    o, _ = one_fragment_worker(swarm)
    assert o.stale_anchor == "average"
    o.stale_anchor = rule
    swarm.reports[0] = RoundReport(1, {"e" * 64: 2}, voters=2)  # round 1 is agreed, its state is not servable
    before = snapshot(o)
    o.start_due_rounds(o.offsets[0] + 2 * 6)  # round 2: this worker still holds the seed
    assert swarm.pending == ([RoundKey("local", 0, 2)] if rule == "average" else [])
    assert o.stats.failed[0] == (0 if rule == "average" else 1)
    assert_same(snapshot(o), before)
