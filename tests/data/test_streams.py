"""Test streams: label concentration by δ / γ, each sample once per pass, the reset / continual / mixed orders,
seeding and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.data.streams import DOMAIN_ORDERS, LABEL_ORDERS, dirichlet_order, make_stream, rotta_order


def _domains(sizes: tuple[int, ...] = (300, 200, 250), num_classes: int = 10) -> dict:
    """Domain ``d``'s sample ``i`` has x = 10_000·d + i, so a batch tells which samples it holds."""
    out = {}
    for d, n in enumerate(sizes):
        g = torch.Generator().manual_seed(d)
        y = torch.randint(0, num_classes, (n,), generator=g)
        y[:num_classes] = torch.arange(num_classes)  # every class present
        out[f"dom{d}"] = (10_000 * d + torch.arange(n), y)
    return out


def _mean_batch_entropy(stream) -> float:
    values = []
    for b in stream:
        p = torch.bincount(b.y, minlength=10).double() / len(b.y)
        p = p[p > 0]
        values.append(float(-(p * p.log()).sum()))
    return float(np.mean(values))


def _runs(labels: np.ndarray) -> int:
    return int(1 + np.count_nonzero(labels[1:] != labels[:-1]))


def test_batch_class_entropy_falls_with_the_concentration() -> None:
    x, y = torch.arange(2000), torch.arange(2000) % 10
    for labels, key in (("dirichlet", "delta"), ("rotta", "gamma")):
        entropy = {}
        for conc in (100.0, 1.0, 0.1, 0.01):
            entropy[conc] = np.mean(
                [
                    _mean_batch_entropy(make_stream({"a": (x, y)}, batch_size=64, labels=labels, seed=s, **{key: conc}))
                    for s in range(4)
                ]
            )
        iid = np.mean([_mean_batch_entropy(make_stream({"a": (x, y)}, batch_size=64, seed=s)) for s in range(4)])
        assert iid > 2.15  # ~ log(10) = 2.30 less the bias of 64 samples
        assert iid > entropy[100.0] > entropy[1.0] > entropy[0.1] > entropy[0.01], (labels, iid, entropy)
        assert entropy[0.01] < 0.6


@pytest.mark.parametrize("labels", LABEL_ORDERS)
@pytest.mark.parametrize("order", DOMAIN_ORDERS)
def test_every_sample_appears_exactly_once_with_its_label_and_domain(order: str, labels: str) -> None:
    domains = _domains()
    stream = make_stream(domains, batch_size=32, order=order, labels=labels, seed=1)
    seen = {}
    for b in stream:
        assert b.x.shape == b.y.shape == b.domain.shape and len(b.x) <= 32
        for xi, yi, di in zip(b.x.tolist(), b.y.tolist(), b.domain.tolist()):
            assert xi not in seen
            seen[xi] = (yi, di)
    assert stream.num_samples == len(seen) == sum(len(y) for _, y in domains.values())
    for d, (key, (x, y)) in enumerate(domains.items()):
        assert stream.domains[d] == key
        for xi, yi in zip(x.tolist(), y.tolist()):
            assert seen[xi] == (yi, d)


def test_continual_and_reset_go_domain_by_domain_and_reset_marks_each_start() -> None:
    domains = _domains()
    cont = make_stream(domains, batch_size=64, order="continual", labels="dirichlet", seed=2)
    reset = make_stream(domains, batch_size=64, order="reset", labels="dirichlet", seed=2)
    per_batch = [b.domain.unique().tolist() for b in cont]
    assert all(len(d) == 1 for d in per_batch)  # a batch never spans two domains
    sequence = [d[0] for d in per_batch]
    assert sequence == sorted(sequence) and sorted(set(sequence)) == [0, 1, 2]
    # 300, 200, 250 samples in batches of 64: 5 + 4 + 4 batches, the last of each domain short
    assert [sequence.count(d) for d in range(3)] == [5, 4, 4] and len(cont) == 13
    assert cont.resets == () and reset.resets == (0, 5, 9)
    # the same samples in the same order: the settings differ only in whether the model is reset
    assert all(torch.equal(a, b) for a, b in zip(cont.batch_indices, reset.batch_indices))


def test_mixed_pools_the_domains() -> None:
    stream = make_stream(_domains(), batch_size=64, order="mixed", seed=0)
    assert stream.resets == ()
    assert sum(len(b.domain.unique()) == 3 for b in stream) >= len(stream) - 1
    # correlated mixed order: one Dirichlet order over the pool, so batches hold few classes but many domains
    corr = make_stream(_domains(), batch_size=64, order="mixed", labels="dirichlet", delta=0.01, seed=0)
    assert _mean_batch_entropy(corr) < 0.8
    assert np.mean([len(b.domain.unique()) for b in corr]) > 2.5


def test_dirichlet_order_is_contiguous_class_runs() -> None:
    y = np.arange(1000) % 10
    order = dirichlet_order(y, delta=0.01, seed=0)
    assert sorted(order.tolist()) == list(range(1000))
    # chunk after chunk, each class's piece contiguous: at most 10 chunks x 10 classes runs, and with δ = 0.01
    # each class sits in about one chunk
    assert _runs(y[order]) <= 100
    assert _runs(y[order]) < 30
    # even a large δ leaves runs of about n_k / J = 10, never i.i.d.
    wide = dirichlet_order(y, delta=1000.0, seed=0)
    assert _runs(y[wide]) <= 100


def test_rotta_order_keeps_each_class_in_dataset_order() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    order = rotta_order(y, gamma=0.1, seed=3)
    assert sorted(order.tolist()) == list(range(500))
    for k in range(10):
        positions = order[y[order] == k]
        assert np.all(np.diff(positions) > 0)  # split in dataset order, slot after slot
    assert _runs(y[order]) <= 10 * 10  # S = 10 slots x 10 class pieces


def test_streams_are_seeded() -> None:
    domains = _domains()
    for labels in LABEL_ORDERS:
        a = make_stream(domains, batch_size=50, order="mixed", labels=labels, seed=7)
        b = make_stream(domains, batch_size=50, order="mixed", labels=labels, seed=7)
        c = make_stream(domains, batch_size=50, order="mixed", labels=labels, seed=8)
        assert all(torch.equal(p, q) for p, q in zip(a.batch_indices, b.batch_indices))
        assert not all(torch.equal(p, q) for p, q in zip(a.batch_indices, c.batch_indices))
        assert [b.x.tolist() for b in a] == [b.x.tolist() for b in a]  # iterating twice gives the same batches


def test_drop_last_drops_each_domains_short_batch() -> None:
    stream = make_stream(_domains(), batch_size=64, drop_last=True)
    assert len(stream) == 4 + 3 + 3 and all(len(b.x) == 64 for b in stream)


def test_infeasible_dirichlet_chunking_is_refused_with_the_numbers() -> None:
    small = {"clean": (torch.arange(95), torch.arange(95) % 10)}
    with pytest.raises(
        ValueError,
        match=r"domain 'clean'.*cuts 95 samples into 10 chunks \(one per class\) of at most 9\.5 samples, but every "
        r"chunk needs >= 10: it takes >= 100 samples",
    ):
        make_stream(small, batch_size=16, labels="dirichlet", delta=0.1)
    with pytest.raises(ValueError, match=r"the mixed pool.*cuts 95 samples"):
        make_stream(small, batch_size=16, order="mixed", labels="dirichlet")
    # feasible in principle (100 = 10 x 10), but every chunk must get exactly 10: a few draws do not find it
    with pytest.raises(ValueError, match=r"no draw in 3 attempts gave every one of the 10 chunks >= 10 samples"):
        dirichlet_order(np.arange(100) % 10, delta=0.01, seed=0, max_attempts=3)
    with pytest.raises(ValueError, match=r"expected delta to be a finite float > 0, got 0\.0"):
        dirichlet_order(np.arange(100) % 10, delta=0.0)
    with pytest.raises(ValueError, match=r"expected gamma to be a finite float > 0, got -1"):
        rotta_order(np.arange(100) % 10, gamma=-1)


def test_bad_arguments_name_the_parameter() -> None:
    domains = _domains()
    with pytest.raises(ValueError, match=r"expected batch_size to be an int >= 1, got 0"):
        make_stream(domains, batch_size=0)
    with pytest.raises(ValueError, match=r"order to be one of \('reset', 'continual', 'mixed'\), got 'shuffled'"):
        make_stream(domains, batch_size=8, order="shuffled")
    with pytest.raises(ValueError, match=r"expected labels to be one of \('iid', 'dirichlet', 'rotta'\), got 'note'"):
        make_stream(domains, batch_size=8, labels="note")
    with pytest.raises(ValueError, match=r"delta applies to labels='dirichlet' only, got delta=0\.1 with labels='iid'"):
        make_stream(domains, batch_size=8, delta=0.1)
    with pytest.raises(ValueError, match=r"gamma applies to labels='rotta' only, got gamma=0\.1 with labels='dir"):
        make_stream(domains, batch_size=8, labels="dirichlet", gamma=0.1)
    with pytest.raises(TypeError, match=r"expected domains to be a non-empty mapping key -> \(x, y\)"):
        make_stream({}, batch_size=8)
    with pytest.raises(TypeError, match=r"expected domains\['a'\] to be a pair of tensors \(x, y\)"):
        make_stream({"a": torch.zeros(3)}, batch_size=8)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"domains\['a'\].*got x of shape \(3,\) and y of shape \(4,\)"):
        make_stream({"a": (torch.zeros(3), torch.zeros(4, dtype=torch.long))}, batch_size=8)
    mismatch = {"a": (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), "b": (torch.zeros(3, 5), torch.zeros(3))}
    with pytest.raises(ValueError, match=r"integer y of shape \(N,\).*dtype torch\.float32"):
        make_stream(mismatch, batch_size=8)
    mismatch["b"] = (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"domains\['a'\] has \(2,\) torch\.float32, domains\['b'\] has \(5,\)"):
        make_stream(mismatch, batch_size=8)
    with pytest.raises(ValueError, match=r"domains\['a'\] has no samples"):
        make_stream({"a": (torch.zeros(0), torch.zeros(0, dtype=torch.long))}, batch_size=8)
    with pytest.raises(ValueError, match=r"expected seed to be an int >= 0, got -3"):
        make_stream(domains, batch_size=8, seed=-3)
    with pytest.raises(ValueError, match=r"num_classes=5 but the labels go up to 9"):
        make_stream(domains, batch_size=8, labels="rotta", num_classes=5)
