"""Book-keeping clipping: the same clipped sums as a per-example loop, for every layer type our nets use.

Each case runs `DPSGD.clip_and_accumulate` with ``per_example="book-keeping"``
(noise multiplicity K > 1 and virtual batches of 3 where the loss allows)
and compares with an explicit loop: one backward per example, clip, sum.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpimages.errors import InputError
from dpimages.nets import SmallCNN
from dpimages.nets.unet import UNet
from dpimages.privacy import NoiseSource, PrivacyLedger, ghost_clipping
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler, mean_over_repeats, repeat_examples
from dpimages.privacy.ghost_clipping import unsupported_parameters

torch.set_num_threads(1)
CLIP = 0.3  # below most per-example norms here, so clipping acts


def _engine(model: nn.Module, loss_fn, per_example: str = "book-keeping", chunk: int | None = 3) -> DPSGD:
    noise = NoiseSource.seeded(0)
    return DPSGD(model, loss_fn, sampler=PoissonSampler(100, 0.1, noise), noise_multiplier=1.0, clip_norm=CLIP,
                 ledger=PrivacyLedger(1e6, 1e-5), noise=noise, max_physical_batch=chunk, per_example=per_example)


def _loop_clipped_sum(model: nn.Module, loss_fn, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i with one backward per example (the definition)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(batch[0].shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model, *(t[i : i + 1] for t in batch)).sum().backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()
        total += min(1.0, CLIP / (float(g.norm()) + 1e-6)) * g
    model.zero_grad(set_to_none=True)
    return total


def _assert_matches_loop(model: nn.Module, loss_fn, batch: tuple[torch.Tensor, ...], chunk: int | None = 3) -> None:
    eng = _engine(model, loss_fn, chunk=chunk)
    assert eng.per_example == "book-keeping"
    eng._probed = 10**9  # the book-keeping path alone: the probe would hide its errors behind torch.func
    eng.clip_and_accumulate(*batch)
    ref = _loop_clipped_sum(model, loss_fn, batch)
    assert ref.norm() > 0.5 * CLIP  # something to compare
    torch.testing.assert_close(eng.accumulated().double(), ref, rtol=1e-5, atol=1e-5 * CLIP)


def _k_loss(k: int, loss_of_rows):
    """Noise multiplicity: each example repeated K times (inner noise z (B, K, ...)), the K losses averaged."""

    def loss(model, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xk = repeat_examples(x, k) + z.reshape(-1, *x.shape[1:])
        return mean_over_repeats(loss_of_rows(model, xk, repeat_examples(y, k)), k)

    return loss


def _xent(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none") * 20.0


class _SeqLinear(nn.Module):
    """Linear layers over a sequence of positions (T = 12 > 1: per-example gradients formed, not ghost)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.reshape(x.shape[0], 12, 3)))).mean(1)


class _WideConv(nn.Module):
    """Many channels on few positions: the conv weight's ghost-norm branch; stride 2; GroupNorm with affine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 48, 3, padding=1)
        self.norm = nn.GroupNorm(6, 48)
        self.wide = nn.Conv2d(48, 64, 3, stride=2, padding=1)  # 2x2 positions: 4 (432 + 64) < 432 * 64
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wide(torch.tanh(self.norm(self.conv(x[:, :, :4, :4]))))
        return self.head(h.mean((2, 3)))


class _Embedded(nn.Module):
    """Class embedding + linear: the embedding's per-example gradient when rows of one example differ in label."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 5)
        self.lin = nn.Linear(64, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x.flatten(1)) + self.emb(labels))).squeeze(1)


def test_small_cnn_conv_groupnorm_linear_with_multiplicity_and_virtual_batches() -> None:
    torch.manual_seed(0)
    x, y, z = torch.randn(7, 1, 28, 28), torch.randint(0, 10, (7,)), 0.3 * torch.randn(7, 3, 1, 28, 28)
    _assert_matches_loop(SmallCNN(), _k_loss(3, _xent), (x, y, z))


def test_linear_over_positions_and_ghost_norm_conv() -> None:
    torch.manual_seed(1)
    x, y, z = torch.randn(7, 1, 6, 6), torch.randint(0, 3, (7,)), 0.3 * torch.randn(7, 2, 1, 6, 6)
    _assert_matches_loop(_SeqLinear(), _xent, (x, y))
    wide = _WideConv()
    assert ghost_clipping._ghost_cheaper(2 * 2 * 2, 48 * 9, 64)  # K=2 rows of 2x2 positions: the ghost branch
    _assert_matches_loop(wide, _k_loss(2, _xent), (x, y, z))


def test_embedding_rows_of_one_example_with_different_labels() -> None:
    torch.manual_seed(2)
    k, b = 3, 6
    x = torch.randn(b, 1, 8, 8)
    labels = torch.randint(0, 4, (b, k))  # e.g. labels dropped to a null class in some of the K draws

    def loss(model, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return mean_over_repeats(model(repeat_examples(x, k), labels.reshape(-1)).pow(2) * 10.0, k)

    _assert_matches_loop(_Embedded(), loss, (x, labels))


def test_dpdm_unet_with_attention_label_dropout_and_k_draws() -> None:
    from dpimages.nets.edm import EDMDenoiser, edm_loss

    torch.manual_seed(3)
    net = EDMDenoiser(UNet(8, 1, 3, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)))
    for p in net.parameters():  # the zero-initialised output layers would hide most layers' gradients
        p.data.add_(0.05 * torch.randn_like(p))
    b, k = 5, 2
    x, y = torch.rand(b, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (b,))
    sigma = net.training_sigmas((b, k), torch.Generator().manual_seed(0))
    noise, drop = torch.randn(b, k, 1, 8, 8), torch.rand(b, k) < 0.4

    def loss(model, x, y, sigma, noise, drop):
        return edm_loss(model, x, torch.where(drop, 3, y.unsqueeze(1).expand(drop.shape)), sigma, noise)

    _assert_matches_loop(net, loss, (x, y, sigma, noise, drop), chunk=2)


def test_a_wrong_layer_norm_breaks_the_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: under-count GroupNorm's bias norm; the loop comparison fails and "auto" refuses book-keeping."""
    real = ghost_clipping._formed_part

    def broken(param, per_example):
        part = real(param, per_example)
        if param.ndim == 1 and param.shape[0] == 16:  # SmallCNN's GroupNorm/conv vectors of 16 channels
            part.sq_norms = part.sq_norms * 0.25
        return part

    monkeypatch.setattr(ghost_clipping, "_formed_part", broken)
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    with pytest.raises(AssertionError):
        _assert_matches_loop(SmallCNN(), _xent, (x, y))
    eng = _engine(SmallCNN(), _xent, per_example="auto")
    with pytest.warns(RuntimeWarning, match="book-keeping clipping does not apply"):
        eng.clip_and_accumulate(x, y)
    assert eng.per_example == "torch.func"
    torch.testing.assert_close(eng.accumulated().double(), _loop_clipped_sum(eng.module, _xent, (x, y)),
                               rtol=1e-5, atol=1e-5 * CLIP)


def test_auto_keeps_torch_func_where_book_keeping_cannot_see() -> None:
    torch.manual_seed(4)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))

    def batch_mixing(model, x, y):  # each loss depends on the whole batch: only the vmap path is per-example
        out = model(x)
        return F.cross_entropy(out - out.mean(0, keepdim=True), y, reduction="none") * 20.0

    eng = _engine(SmallCNN(), batch_mixing, per_example="auto")
    with pytest.warns(RuntimeWarning, match="norms differ"):
        eng.clip_and_accumulate(x, y)
    assert eng.per_example == "torch.func"

    class Loose(nn.Module):  # a parameter used outside any layer
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(784, 10)
            self.scale = nn.Parameter(torch.ones(10))

        def forward(self, x):
            return self.lin(x.flatten(1)) * self.scale

    assert unsupported_parameters(Loose()) == ["scale"]
    assert unsupported_parameters(nn.Sequential(nn.ConvTranspose2d(2, 2, 3))) == ["0.weight", "0.bias"]
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight  # one parameter, two layers: its norm has a cross term
    assert unsupported_parameters(tied) == ["1.weight"]
    shared = nn.Linear(4, 4)
    assert unsupported_parameters(nn.Sequential(shared, nn.Tanh(), shared)) == ["2.weight", "2.bias"]
    assert _engine(Loose(), _xent, per_example="auto").per_example == "torch.func"
    with pytest.raises(InputError, match="does not apply"):
        _engine(Loose(), _xent, per_example="book-keeping")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deterministic, per-example loss on supported layers: no fallback
        ok = _engine(SmallCNN(), _xent, per_example="auto")
        ok.clip_and_accumulate(x, y)
        assert ok.per_example == "book-keeping"
    noise = NoiseSource.seeded(0)
    random_loss = DPSGD(SmallCNN(), _xent, sampler=PoissonSampler(100, 0.1, noise), noise_multiplier=1.0,
                        clip_norm=1.0, ledger=PrivacyLedger(1e6, 1e-5), noise=noise, randomness="different")
    assert random_loss.per_example == "torch.func"  # random ops in the loss: the probe could not compare


class _SharedTable(nn.Module):
    """A layer run once on a shared table, then indexed per example, behind a zero-initialised head.

    Its rows are not examples; at the initial weights every gradient upstream of the head is 0, so only a probe
    with perturbed weights, or the rows-per-example check on a later chunk, can tell.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(8, 4, generator=torch.Generator().manual_seed(5)))
        self.emb = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x + self.emb(self.table)[t])).squeeze(1)


def _table_loss(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (model(x, t) - 1.0) ** 2


def test_rows_that_are_not_examples_fall_back_even_behind_a_zero_initialised_layer() -> None:
    torch.manual_seed(6)
    x, t = torch.randn(4, 4), torch.tensor([6, 1, 1, 4])
    eng = _engine(_SharedTable(), _table_loss, per_example="auto", chunk=4)
    with pytest.warns(RuntimeWarning, match="book-keeping clipping does not apply"):
        eng.clip_and_accumulate(x, t)
    assert eng.per_example == "torch.func"
    # with the probe bypassed, the rows-per-example check alone still refuses a chunk of another size
    explicit = _engine(_SharedTable(), _table_loss, chunk=4)
    explicit._probed = 10**9
    explicit.clip_and_accumulate(x, t)
    with pytest.warns(RuntimeWarning, match="rows for 2 examples"):
        explicit.clip_and_accumulate(x[:2], t[:2])
    assert explicit.per_example == "torch.func"


def test_probe_failures_of_any_kind_keep_torch_func() -> None:
    class Keyword(nn.Module):  # the hook sees no positional input
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(input=x).squeeze(1)

    eng = _engine(Keyword(), lambda m, x: m(x) ** 2, per_example="auto", chunk=4)
    with pytest.warns(RuntimeWarning, match="without a positional tensor input"):
        eng.clip_and_accumulate(torch.randn(4, 3))
    assert eng.per_example == "torch.func"

    class Drop(nn.Module):  # random ops with randomness="error": the probe's torch.func run refuses them
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.drop = nn.Linear(3, 1), nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.drop(x)).squeeze(1)

    eng = _engine(Drop(), lambda m, x: m(x) ** 2, per_example="auto", chunk=4)  # probed on the whole chunk
    before = [p.detach().clone() for p in eng.module.parameters()]
    with pytest.warns(RuntimeWarning, match="does not apply"), pytest.raises(RuntimeError, match="randomness"):
        eng.clip_and_accumulate(torch.randn(4, 3))  # then torch.func refuses the random op, as it always did
    assert eng.per_example == "torch.func"
    assert all(torch.equal(a, b) for a, b in zip(before, eng.module.parameters(), strict=True))  # weights restored


def test_ghost_norm_of_a_zero_gradient_is_not_nan() -> None:
    """Cancelling positions: the true norm is 0 and the ghost identity may round below it; no NaN."""
    lin = nn.Linear(16, 16, bias=False)

    def loss(model, a: torch.Tensor) -> torch.Tensor:  # +a and -a at two positions: gradient exactly 0
        out = model(torch.stack([a, -a], dim=1))
        return out.sum((1, 2))

    assert ghost_clipping._ghost_cheaper(2, 16, 16)
    eng = _engine(lin, loss, chunk=None)
    eng.clip_and_accumulate(torch.randn(50, 16) * 1e3)
    assert torch.isfinite(eng.accumulated()).all()


def test_an_explicit_book_keeping_choice_is_checked_too() -> None:
    """``per_example="book-keeping"`` is checked against torch.func like "auto": a loss that mixes examples
    falls back, so removing one example still moves the clipped sum by at most C."""
    torch.manual_seed(4)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))

    def batch_mixing(model, x, y):
        out = model(x)
        return F.cross_entropy(out - out.mean(0, keepdim=True), y, reduction="none") * 20.0

    eng = _engine(SmallCNN(), batch_mixing, per_example="book-keeping", chunk=None)
    with pytest.warns(RuntimeWarning, match="norms differ"):
        eng.clip_and_accumulate(x, y)
    assert eng.per_example == "torch.func"


@pytest.mark.parametrize("per_example", ["book-keeping", "torch.func"])
@pytest.mark.parametrize("bad", [1, 4])  # inside the first-batch probe (4 examples) and after it
def test_an_example_with_a_non_finite_gradient_contributes_zero(per_example: str, bad: int) -> None:
    """One inf pixel must not turn the clipped sum (and so the release) NaN: that example adds exactly 0."""
    torch.manual_seed(5)
    x, y = torch.randn(7, 1, 28, 28), torch.randint(0, 10, (7,))
    x[bad, 0, 3, 5] = float("inf")
    model = SmallCNN()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning: nothing data-dependent shows
        eng = _engine(model, _xent, per_example=per_example)
        eng.clip_and_accumulate(x, y)
        assert eng.per_example == per_example
    keep = [i for i in range(7) if i != bad]
    got = eng.accumulated().double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _loop_clipped_sum(model, _xent, (x[keep], y[keep])), rtol=1e-5,
                               atol=1e-5 * CLIP)


def _contribution(eng: DPSGD, batch: tuple[torch.Tensor, ...], i: int) -> float:
    """How far example i moves the engine's clipped sum: sum over `batch` minus the sum without example i."""
    keep = [j for j in range(batch[0].shape[0]) if j != i]
    eng.zero_accumulated()
    eng.clip_and_accumulate(*batch)
    full = eng.accumulated().double()
    eng.zero_accumulated()
    eng.clip_and_accumulate(*(t[keep] for t in batch))
    without = eng.accumulated().double()
    eng.zero_accumulated()
    return float((full - without).norm())


def test_ghost_norms_keep_the_clip_when_an_example_s_terms_cancel() -> None:
    """Finding 2 of issue 34: a Linear applied to two positions whose gradient terms nearly cancel.

    The per-example gradient is ``c s v^T - c' s v^T`` with c' = c (1 + 1e-7) and s = 1e8: its true norm is at
    float32's resolution of the terms. Ghost norms summed in float32 round it to about 0 or below, the factor
    becomes 1 and the float32 share is added unclipped (tens of C on the old code, after a probe that passed on
    ordinary examples). Now the Gram products are float64 and such an example is formed: at most C.
    """
    torch.manual_seed(7)
    lin = nn.Linear(8, 8, bias=False)

    def two_positions(model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x (B, 2, 8), c (B, 2, 8)
        return (model(x) * c).sum((1, 2))

    assert ghost_clipping._ghost_cheaper(2, 8, 8)
    eng = _engine(lin, two_positions, chunk=None)
    eng.clip_and_accumulate(torch.randn(6, 2, 8), torch.randn(6, 2, 8))  # the probe: ordinary examples pass
    assert eng.per_example == "book-keeping"
    worst = 0.0
    for trial in range(20):
        gen = torch.Generator().manual_seed(trial)
        v, c = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
        crafted_x = (1e8 * v).expand(2, 8).clone()
        crafted_c = torch.stack([c, -(c * (1 + 1e-7))])
        x = torch.cat([torch.randn(5, 2, 8, generator=gen), crafted_x[None]])
        cc = torch.cat([torch.randn(5, 2, 8, generator=gen), crafted_c[None]])
        worst = max(worst, _contribution(eng, (x, cc), 5))
    assert eng.per_example == "book-keeping"
    assert worst <= CLIP * (1 + 1e-4), f"one example moved the clipped sum by {worst / CLIP:.2f} C"


def mixes_above_four(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss that mixes examples only when a chunk holds more than 4 of them (batch-norm-like)."""
    out = model(x)
    if out.shape[0] > 4:
        out = out - 0.9 * out.mean(0, keepdim=True)
    return F.cross_entropy(out, y, reduction="none") * 20.0


def test_a_loss_that_mixes_examples_only_in_larger_chunks_is_caught_by_the_probe() -> None:
    """Finding 3 of issue 34: a loss that mixes examples only when a chunk holds more than 4 of them.

    The old probe saw 4 examples, passed, and book-keeping then moved the sum by more than C when one example
    was removed from a chunk of 16. The probe now covers a whole chunk (and any larger chunk before it is used).
    """
    torch.manual_seed(8)

    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eng = _engine(SmallCNN(), mixes_above_four, per_example="auto", chunk=16)
    with pytest.warns(RuntimeWarning, match="norms differ"):
        eng.clip_and_accumulate(x, y)
    assert eng.per_example == "torch.func"
    assert max(_contribution(eng, (x, y), i) for i in (0, 7, 15)) <= CLIP * (1 + 1e-4)


def test_book_keeping_never_sees_a_chunk_larger_than_its_probe() -> None:
    """A first batch smaller than a chunk probes only its own size; a larger chunk later is probed first."""
    torch.manual_seed(9)

    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eng = _engine(SmallCNN(), mixes_above_four, per_example="auto", chunk=16)
    eng.clip_and_accumulate(x[:3], y[:3])  # a small first batch: the probe sees 3 examples and passes
    assert eng.per_example == "book-keeping"
    with pytest.warns(RuntimeWarning, match="norms differ"):
        eng.clip_and_accumulate(x, y)
    assert eng.per_example == "torch.func"
