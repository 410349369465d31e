"""la-forward cases: the strategies reach the regimes real kernels break in, and build_la_inputs makes the
tensors each regime promises, with the same values across dtypes and layouts."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from iqa_verify.errors import IqaVerifyError
from iqa_verify.profiles import PROFILES, profile_named
from iqa_verify.properties.la_forward.cases import Decay, LACase, Layout, build_la_inputs, la_cases, pinned_la_cases

CI = profile_named("ci")
CPU = torch.device("cpu")
F64 = torch.float64


def _draw(profile_name: str, n: int, seed: int | None = None) -> list[LACase]:
    """``n`` specs drawn by Hypothesis from the profile's strategy, the same every run: derandomized, or
    seeded like the runner seeds a property's search when ``seed`` is given."""
    seen: list[LACase] = []

    @settings(max_examples=n, database=None, derandomize=seed is None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(la_cases(profile_named(profile_name)))
    def collect(spec: LACase) -> None:
        seen.append(spec)

    (collect if seed is None else hypothesis_seed(seed)(collect))()
    return seen


@pytest.fixture(scope="module")
def ci_specs() -> list[LACase]:
    return _draw("ci", 400)


def _short(s: LACase) -> str:
    return f"B={s.B} T={s.T} H={s.H} D={s.D} E={s.E}"


# ------------------------------------------------------------------------------------ coverage


# (name, predicate on a spec): regimes where real kernels break, each must be drawn several times
REGIMES = [
    ("T = 1", lambda s: s.T == 1),
    ("T > 16 not a multiple of 16", lambda s: s.T > 16 and s.T % 16),
    ("T > 64 not a multiple of 32 or 64", lambda s: 64 < s.T and s.T % 32 and s.T % 64),
    ("T a multiple of 16", lambda s: s.T % 16 == 0),
    ("T >= 256", lambda s: s.T >= 256),
    ("T >= 256 not a multiple of 16", lambda s: s.T >= 256 and s.T % 16),
    ("B >= 2 and H >= 2", lambda s: s.B >= 2 and s.H >= 2),
    ("D != E", lambda s: s.D != s.E),
    ("D == E > 1", lambda s: s.D == s.E > 1),
    ("D == 1 or E == 1", lambda s: s.D == 1 or s.E == 1),
    ("scale != 1", lambda s: s.scale != 1.0),
    ("scale == 1", lambda s: s.scale == 1.0),
    ("initial state given", lambda s: s.initial_state),
    ("initial state None", lambda s: not s.initial_state),
    ("long weak decay", lambda s: s.T >= 256 and s.decay is Decay.WEAK),
    ("initial state under strong decay", lambda s: s.initial_state and s.decay in (Decay.STRONG, Decay.UNDERFLOW)),
    *[(f"decay {d.value}", lambda s, d=d: s.decay is d) for d in Decay],
    *[(f"layout {lay.value}", lambda s, lay=lay: s.layout is lay) for lay in Layout],
    *[(f"magnitude 1e{m}", lambda s, m=m: s.magnitude == m) for m in (-2, 0, 1)],
]


@pytest.mark.parametrize(("regime", "holds"), [pytest.param(r, h, id=r) for r, h in REGIMES])
def test_ci_strategy_reaches_the_regime(ci_specs: list[LACase], regime: str, holds) -> None:
    hits = [s for s in ci_specs if holds(s)]
    assert len(hits) >= 3, f"{regime}: {len(hits)} of {len(ci_specs)} drawn specs"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_ci_search_alone_reaches_long_sequences_batches_heads_scales_and_states(seed: int) -> None:
    """What one property sees in the ci profile: its 30 random examples (pinned cases come on top)."""
    specs = _draw("ci", CI.max_examples, seed)
    assert any(s.T >= 256 for s in specs) and any(s.T < 64 for s in specs)
    assert any(s.B >= 2 and s.H >= 2 for s in specs)
    assert any(s.scale != 1.0 for s in specs) and any(s.D != s.E for s in specs)
    assert {s.initial_state for s in specs} == {True, False}
    assert len({s.decay for s in specs}) >= 4 and len({s.layout for s in specs}) == len(Layout)


def test_strategies_stay_within_the_profile_bounds(ci_specs: list[LACase]) -> None:
    assert all(1 <= s.B <= 3 and 1 <= s.H <= 3 and 1 <= s.D <= 16 and 1 <= s.E <= 16 for s in ci_specs)
    assert all(1 <= s.T <= 400 for s in ci_specs) and max(s.T for s in ci_specs) > 300
    assert all(0 <= s.seed < 2**31 for s in ci_specs) and len({s.seed for s in ci_specs}) > 50
    larger = _draw("thorough", 150)
    assert max(s.T for s in larger) > 400 and max(max(s.D, s.E) for s in larger) > 16  # bigger profiles reach further


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_pinned_cases_include_t1_and_a_long_weak_decay_case(profile: str) -> None:
    pinned = pinned_la_cases(profile_named(profile))
    assert LACase(B=1, T=1, H=1, D=1, E=1, seed=1) in pinned
    long_weak = [s for s in pinned if s.decay is Decay.WEAK and s.T >= 256]
    assert long_weak and all(s.T % 16 for s in long_weak), [_short(s) for s in pinned]
    assert {Decay.UNDERFLOW, Decay.PARTIAL_NONE, Decay.NONE} <= {s.decay for s in pinned}
    assert {Layout.TRANSPOSED, Layout.SLICED} <= {s.layout for s in pinned}
    assert len(set(pinned)) == len(pinned)


# ------------------------------------------------------------------------------------ build_la_inputs


def _g(spec: LACase) -> torch.Tensor:
    return build_la_inputs(spec, F64, CPU)["g"]


def test_decay_regimes_give_the_promised_log_decays() -> None:
    base = dict(B=2, T=60, H=2, D=2, E=2, seed=5)
    g = {d: _g(LACase(**base, decay=d)) for d in Decay}
    for d, x in g.items():
        assert x.shape == (2, 60, 2) and (x <= 0).all(), d
    assert torch.equal(g[Decay.NONE], torch.zeros_like(g[Decay.NONE]))  # exactly 0, not -1e-300
    zeros = (g[Decay.PARTIAL_NONE] == 0).float().mean()
    assert 0.3 < zeros < 0.7 and (g[Decay.PARTIAL_NONE] < 0).any()
    assert ((g[Decay.MILD] >= -0.1) & (g[Decay.MILD] < 0)).all()
    assert ((g[Decay.WEAK] >= -1e-3) & (g[Decay.WEAK] < 0)).all()
    assert ((g[Decay.STRONG] >= -5) & (g[Decay.STRONG] <= -1)).all()
    assert ((g[Decay.UNDERFLOW] >= -60) & (g[Decay.UNDERFLOW] <= -20)).all()


@pytest.mark.parametrize("T", [38, 97])
def test_underflow_decay_goes_below_float64_underflow_at_moderate_t(T: int) -> None:
    b = _g(LACase(B=1, T=T, H=2, D=1, E=1, decay=Decay.UNDERFLOW, seed=T)).cumsum(dim=1)
    assert (b[:, -1] < -745).all()  # exp(b) is 0 even in float64: ratios of cumulative products are 0/0
    assert torch.exp(b[:, -1]).eq(0).all()


@pytest.mark.parametrize("layout", list(Layout), ids=lambda x: x.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_values_are_the_same_across_dtypes_and_layouts(dtype: torch.dtype, layout: Layout) -> None:
    spec = LACase(B=2, T=7, H=3, D=4, E=5, decay=Decay.MILD, initial_state=True, layout=layout, scale=0.5, seed=9)
    exact = build_la_inputs(dataclasses.replace(spec, layout=Layout.CONTIGUOUS), F64, CPU)
    got = build_la_inputs(spec, dtype, CPU)
    eps = torch.finfo(dtype).eps
    for name in ("q", "k", "v", "g", "initial_state"):
        x = got[name]
        assert x.dtype == dtype and x.shape == exact[name].shape, name
        # rounding the float64 values to the dtype, nothing else (relative half-ulp)
        assert torch.allclose(x.double(), exact[name], rtol=eps, atol=0), name
        assert torch.equal(x, exact[name].to(dtype)), name


def test_layouts_are_non_contiguous_views_for_transposed_and_sliced() -> None:
    for layout in Layout:
        inputs = build_la_inputs(LACase(B=2, T=5, H=3, D=4, E=2, initial_state=True, layout=layout), torch.float32, CPU)
        for name, x in inputs.items():
            assert x.is_contiguous() == (layout is Layout.CONTIGUOUS), (layout, name, x.stride())
    sliced = build_la_inputs(LACase(B=1, T=4, H=1, D=2, E=2, layout=Layout.SLICED), torch.float32, CPU)["q"]
    assert sliced.stride(1) == 2 * sliced.shape[-1] and sliced.untyped_storage().nbytes() == 2 * sliced.numel() * 4


def test_magnitude_scales_q_k_v_and_the_initial_state() -> None:
    std = {}
    for m in (-2, 0, 1):
        x = build_la_inputs(LACase(B=2, T=50, H=2, D=8, E=8, initial_state=True, magnitude=m, seed=3), F64, CPU)
        std[m] = {n: float(x[n].std()) for n in ("q", "k", "v", "initial_state")}
        assert torch.equal(x["g"], _g(LACase(B=2, T=50, H=2, D=8, E=8, initial_state=True, seed=3)))  # g unscaled
    for n in ("q", "k", "v", "initial_state"):
        assert std[-2][n] == pytest.approx(1e-2 * std[0][n]) and std[1][n] == pytest.approx(10 * std[0][n])
        assert 0.7 < std[0][n] < 1.3


def test_inputs_depend_only_on_the_spec(gen: torch.Generator) -> None:
    spec = LACase(B=2, T=9, H=2, D=3, E=4, decay=Decay.STRONG, initial_state=True, seed=123)
    torch.randn(100, generator=gen)  # other random streams do not matter
    a, b = build_la_inputs(spec, F64, CPU), build_la_inputs(spec, F64, CPU)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = build_la_inputs(dataclasses.replace(spec, seed=124), F64, CPU)
    assert not torch.equal(a["q"], c["q"]) and not torch.equal(a["g"], c["g"])
    assert build_la_inputs(LACase(B=1, T=2, H=1, D=1, E=1), F64, CPU)["initial_state"] is None


def test_names_select_the_sequence_inputs_and_their_widths() -> None:
    spec = LACase(B=1, T=3, H=2, D=4, E=5)
    x = build_la_inputs(spec, F64, CPU, names=("q", "k", "o"))
    assert list(x) == ["q", "k", "o", "g", "initial_state"]
    assert x["o"].shape == (1, 3, 2, 5) and x["q"].shape == (1, 3, 2, 4)


# ------------------------------------------------------------------------------------ JSON


def test_json_round_trips_every_drawn_spec(ci_specs: list[LACase]) -> None:
    for spec in ci_specs[:100] + list(pinned_la_cases(CI)):
        text = spec.to_json()
        assert LACase.from_json(text) == spec
        assert "\n" not in text and " " not in text  # one shell word in a repro line


def test_json_defaults_for_omitted_regime_fields() -> None:
    assert LACase.from_json('{"B":1,"T":2,"H":1,"D":1,"E":1}') == LACase(B=1, T=2, H=1, D=1, E=1)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"B":1,"T":2',
        '{"B":1,"T":2}',
        '{"B":1,"T":2,"H":1,"D":1,"E":1,"decay":"gentle"}',
        '{"B":1,"T":2,"H":1,"D":1,"E":1,"layout":"diagonal"}',
        '{"B":1,"T":2,"H":1,"D":1,"E":1,"colour":"red"}',
    ],
    ids=["not-json", "truncated", "missing-sizes", "unknown-decay", "unknown-layout", "unknown-field"],
)
def test_malformed_json_is_an_iqa_verify_error_quoting_the_text(text: str) -> None:
    with pytest.raises(IqaVerifyError, match=re.escape(f"case={text!r}: not an la case spec (")):
        LACase.from_json(text)


def test_regime_reads_well() -> None:
    spec = LACase(B=1, T=1, H=1, D=1, E=1, decay=Decay.UNDERFLOW, initial_state=True, layout=Layout.SLICED,
                  magnitude=-2, scale=0.125)
    assert spec.regime() == "decay=underflow, S0 given, sliced, |x|~1e-2, scale=0.125"
    assert LACase(B=1, T=1, H=1, D=1, E=1).regime() == "decay=mild, S0 None, contiguous"
