"""check() and run_property(): verdicts, shrinking, repro, determinism, and what a misbehaving kernel or
harness turns into (a FAILED or ERROR result, never a crash)."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
import torch

from iqa_verify.family import Property
from iqa_verify.kernels.la_forward_chunked import la_forward_chunked
from iqa_verify.outcomes import Status
from iqa_verify.poison import nan_poisoned_allocations
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check, run_property
from iqa_verify.supervisor import InProcess
from iqa_verify.properties.la_forward.cases import LACase
from tests.bug_zoo import la_forward as zoo

FAM = family("la-forward")
CI = profile_named("ci")
CHUNKED = "iqa_verify.kernels.la_forward_chunked:la_forward_chunked"
SIGNATURE = "la_forward(q, k, v, g, initial_state=None, *, scale=1.0) -> (o, final_state)"


def _cfg(kernel, name: str = "tests/test_runner.py:kernel", *, seed: int = 0, fam=FAM) -> RunConfig:
    return RunConfig(fam, kernel, name, torch.float32, torch.device("cpu"), CI, seed=seed, isolation=InProcess())


def _zoo(name: str) -> RunConfig:
    return _cfg(getattr(zoo, name), f"{zoo.__file__}:{name}")


def _pid(name: str) -> str:
    return f"la-forward/{name}"


def _spec(result) -> LACase:
    assert result.counterexample is not None, result
    return LACase.from_json(result.counterexample.spec_json)


def _noisy(q, k, v, g, initial_state=None, *, scale=1.0):
    o, state = la_forward_chunked(q, k, v, g, initial_state, scale=scale)
    return o + 1e-3 * torch.rand_like(o), state


# --------------------------------------------------------------------------------- verdicts


def test_a_correct_kernel_passes() -> None:
    verdict = check(_cfg(la_forward_chunked, CHUNKED), only=(_pid("contract"), _pid("values")))
    assert verdict.passed and verdict.complete and verdict.failed() == []
    by_id = {r.property_id: r for r in verdict.results}
    assert [r.property_id for r in verdict.results] == [p.id for p in FAM.properties]
    for pid in (_pid("contract"), _pid("values")):
        r = by_id[pid]
        assert r.status is Status.PASSED and r.counterexample is None
        assert len(FAM.pinned(CI)) < r.examples <= CI.max_examples + len(FAM.pinned(CI))
    values = by_id[_pid("values")]
    assert values.worst_ratio is not None and 0 < values.worst_ratio <= 1
    assert {c.path for c in values.worst} == {"out/o", "out/final_state"} and all(c.passed for c in values.worst)
    assert by_id[_pid("contract")].worst_ratio is None  # compares no tensors


def test_a_planted_bug_fails_with_a_small_shrunk_counterexample_that_replays() -> None:
    cfg = _zoo("scale_ignored")
    prop = FAM.property(_pid("values"))
    r = run_property(cfg, prop)
    assert r.status is Status.FAILED
    spec = _spec(r)
    assert (spec.B, spec.T, spec.H, spec.D, spec.E) == (1, 1, 1, 1, 1)
    assert spec.scale != 1.0  # the bug only shows with a scale
    assert (spec.decay.value, spec.initial_state, spec.layout.value, spec.magnitude) == ("mild", False, "contiguous", 0)
    c = r.counterexample
    assert c.shapes == "q[1, 1, 1, 1], k[1, 1, 1, 1], v[1, 1, 1, 1], g[1, 1, 1]"
    assert c.regime == f"decay=mild, S0 None, contiguous, scale={spec.scale:g}"
    assert c.message.startswith(
        "values differ from the float64 reference: 1 of 2 tensors out of tolerance\nout/o: 1 of 1 elements")
    assert [ch.path for ch in c.checks if not ch.passed] == ["out/o"]
    assert r.worst_ratio == max(ch.ratio for ch in c.checks) > 1
    # the repro line names the kernel, family, dtype, device, property and this very case
    argv = shlex.split(c.repro)
    assert argv[:3] == ["iqa-verify", "check", f"{zoo.__file__}:scale_ignored"]
    for flag, value in [("--family", "la-forward"), ("--dtype", "float32"), ("--device", "cpu"),
                        ("--only", _pid("values")), ("--case", c.spec_json)]:
        assert argv[argv.index(flag) + 1] == value
    replay = run_property(cfg, prop, case_json=c.spec_json)
    assert replay.status is Status.FAILED and replay.examples == 1
    assert replay.counterexample.spec_json == c.spec_json
    assert replay.counterexample.message == c.message


def _recorded_specs(seed: int) -> list[LACase]:
    seen: list[LACase] = []

    def build(spec, dtype, device):
        seen.append(spec)
        return FAM.build(spec, dtype, device)

    fam = dataclasses.replace(FAM, build=build)
    result = run_property(_cfg(la_forward_chunked, seed=seed, fam=fam), fam.property(_pid("contract")))
    assert result.status is Status.PASSED
    return seen


def test_same_seed_same_examples_other_seed_other_examples() -> None:
    first, again, other = _recorded_specs(0), _recorded_specs(0), _recorded_specs(1)
    pinned = list(FAM.pinned(CI))
    assert first == again
    assert first[: len(pinned)] == other[: len(pinned)] == pinned  # edge regimes always run first
    assert first[len(pinned):] != other[len(pinned):]
    assert len(set(first[len(pinned):]) & set(other[len(pinned):])) < len(first) // 2


# --------------------------------------------------------------------------------- misbehaving kernels


def test_a_kernel_that_raises_on_valid_input_fails_instead_of_crashing() -> None:
    def raises(q, k, v, g, initial_state=None, *, scale=1.0):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    r = run_property(_cfg(raises), FAM.property(_pid("values")))
    assert r.status is Status.FAILED and r.error is None
    assert r.counterexample.message == "kernel raised RuntimeError: CUDA error: an illegal memory access was encountered"
    assert _spec(r).T == 1  # shrunk like any other failure


@pytest.mark.parametrize(
    ("returned", "got"),
    [
        (lambda o, s: None, "NoneType"),
        (lambda o, s: o, "Tensor"),
        (lambda o, s: [o, s, s], "list of 3"),
        (lambda o, s: (o, s.tolist()), "tuple of 2"),
    ],
    ids=["none", "one-tensor", "list-of-3", "non-tensor-in-tuple"],
)
def test_a_kernel_returning_the_wrong_structure_fails_naming_the_contract(returned, got: str) -> None:
    def kernel(q, k, v, g, initial_state=None, *, scale=1.0):
        return returned(*la_forward_chunked(q, k, v, g, initial_state, scale=scale))

    for pid in (_pid("contract"), _pid("gradients")):
        r = run_property(_cfg(kernel), FAM.property(pid))
        assert r.status is Status.FAILED, pid
        assert r.counterexample.message == (
            f"kernel returned {got}; the contract `{SIGNATURE}` returns 2 tensor(s) ('o', 'final_state')"
        )


def test_a_non_deterministic_kernel_fails_deterministic() -> None:
    r = run_property(_cfg(_noisy), FAM.property(_pid("deterministic")))
    assert r.status is Status.FAILED
    assert r.counterexample.message.startswith("two calls on the same input disagree (hidden state kept across calls")
    assert "out/o: " in r.counterexample.message and "out/final_state" not in r.counterexample.message


def _dg_off_by(eps: float):
    """The correct kernel plus ``eps * <cotangent, o>`` in dg: a gradient error of relative size ~eps."""

    def kernel(q, k, v, g, initial_state=None, *, scale=1.0):
        o, state = la_forward_chunked(q, k, v, g, initial_state, scale=scale)
        return o * (1 + eps * (g - g.detach()).sum()), state

    return kernel


@pytest.mark.parametrize(("eps", "status"), [(1e-7, Status.PASSED), (1e-2, Status.FAILED)], ids=["round-off", "wrong"])
def test_a_gradient_zero_in_theory_is_judged_against_its_siblings_scale(eps: float, status: Status) -> None:
    """dg is exactly 0 at T = 1 without an initial state; round-off there (relative 1e-7) is not a failure."""
    case = LACase(B=1, T=1, H=2, D=3, E=2, scale=0.5, seed=11).to_json()
    r = run_property(_cfg(_dg_off_by(eps)), FAM.property(_pid("gradients")), case_json=case)
    assert r.status is status
    if status is Status.FAILED:
        assert [c.path for c in r.counterexample.checks if not c.passed] == ["grad/dg"]


# --------------------------------------------------------------------------------- harness failures, selection


def test_a_harness_exception_is_an_error_with_its_traceback() -> None:
    def broken_reference(inputs, kwargs):
        return {"o": 1 / 0}

    fam = dataclasses.replace(FAM, reference=broken_reference)
    verdict = check(_cfg(la_forward_chunked, fam=fam), only=(_pid("values"), _pid("contract")))
    by_id = {r.property_id: r for r in verdict.results}
    err = by_id[_pid("values")]
    assert err.status is Status.ERROR and err.counterexample is None
    assert err.error.startswith("Traceback (most recent call last):")
    assert "in broken_reference" in err.error and err.error.rstrip().endswith("ZeroDivisionError: division by zero")
    assert by_id[_pid("contract")].status is Status.PASSED  # the run went on
    assert not verdict.passed and verdict.complete and verdict.failed() == [err]
    assert "a bug in iqa-verify" in Status.ERROR.message


def test_a_failing_property_check_that_is_not_a_violation_is_an_error() -> None:
    prop = Property(id="la-forward/broken", title="broken", check=lambda ctx: {}["missing"])
    r = run_property(_cfg(la_forward_chunked), prop)
    assert r.status is Status.ERROR and "KeyError: 'missing'" in r.error


def test_only_and_skip_select_properties_and_unknown_ids_are_refused() -> None:
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return la_forward_chunked(*args, **kwargs)

    cfg = _cfg(counting)
    verdict = check(cfg, only=(_pid("contract"),))
    statuses = {r.property_id: r.status for r in verdict.results}
    assert statuses.pop(_pid("contract")) is Status.PASSED
    assert set(statuses.values()) == {Status.SKIPPED} and len(statuses) == len(FAM.properties) - 1
    assert len(calls) == verdict.results[0].examples  # skipped properties never call the kernel
    others = [p.id for p in FAM.properties if p.id != _pid("deterministic")]
    verdict = check(cfg, skip=others)
    ran = [r for r in verdict.results if r.status is not Status.SKIPPED]
    assert [r.property_id for r in ran] == [_pid("deterministic")] and verdict.passed
    assert all(r.examples == 0 for r in verdict.results if r.status is Status.SKIPPED)
    for bad in (dict(only=("la-forward/valuez",)), dict(skip=("values",))):
        with pytest.raises(KeyError, match="no such property in family la-forward; valid: la-forward/contract"):
            check(cfg, **bad)


def test_keyboard_interrupt_returns_an_incomplete_verdict_with_the_results_so_far() -> None:
    """One search judges every property; a failing one finishes (shrunk) first. Ctrl-C after it: the verdict
    holds that result, is marked incomplete, and the interrupt does not escape."""
    interrupted = {"now": False}

    def kernel(*args, **kwargs):
        if interrupted["now"]:
            raise KeyboardInterrupt
        return zoo.scale_ignored(*args, **kwargs)

    finished = []

    def on_result(r):
        finished.append(r.property_id)
        interrupted["now"] = True  # Ctrl-C at the next kernel call

    try:
        verdict = check(_cfg(kernel), only=(_pid("contract"), _pid("values"), _pid("deterministic")), on_result=on_result)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped check() instead of returning an incomplete verdict")
    assert not verdict.complete and not verdict.passed
    ran = [(r.property_id, r.status) for r in verdict.results if r.status is not Status.SKIPPED]
    assert ran == [(_pid("values"), Status.FAILED)]
    assert finished == [_pid("values")]


# --------------------------------------------------------------------------------- NaN-poisoned allocations


def test_nan_poisoning_fills_scratch_memory_and_restores_torch_even_on_exceptions() -> None:
    originals = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="inside"):
        with nan_poisoned_allocations():
            assert torch.isnan(torch.empty(2, 3)).all()
            assert torch.isnan(torch.empty_like(x)).all()
            assert torch.isnan(torch.empty_strided((2, 3), (1, 2))).all()
            assert torch.isnan(x.new_empty((4,))).all()
            assert torch.isnan(torch.empty(2, dtype=torch.bfloat16)).all()
            assert torch.empty(3, dtype=torch.int64).dtype == torch.int64  # integer scratch is left alone
            raise RuntimeError("inside")
    assert (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty) == originals
    with pytest.raises(KeyboardInterrupt):
        with nan_poisoned_allocations():
            raise KeyboardInterrupt
    assert (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty) == originals


def test_reads_of_unwritten_scratch_memory_fail_no_uninit_reads() -> None:
    r = run_property(_zoo("ragged_chunk_read_past_end"), FAM.property(_pid("no-uninit-reads")))
    assert r.status is Status.FAILED
    assert "(the kernel reads memory it never wrote)" in r.counterexample.message
    assert json.loads(r.counterexample.spec_json)["T"] % 16 != 0  # a ragged last chunk


# --------------------------------------------------------------------------------- time budget


def _slow(q, k, v, g, initial_state=None, *, scale=1.0):
    import time

    time.sleep(0.05)
    return la_forward_chunked(q, k, v, g, initial_state, scale=scale)


def test_a_time_budget_ends_the_search_and_the_result_says_so() -> None:
    cfg = dataclasses.replace(_cfg(_slow), time_budget_s=0.2)
    r = run_property(cfg, FAM.property(_pid("contract")))
    full = len(FAM.pinned(CI)) + CI.max_examples
    assert r.status is Status.PASSED and r.budget_reached and 1 <= r.examples < full
    # 8 pinned regimes at >= 50 ms each outlast a 0.2 s budget: the budget bounds the pinned ones too
    assert r.examples < len(FAM.pinned(CI))
    assert r.examples_label == f"{r.examples} (time budget)"
    unbounded = run_property(_cfg(la_forward_chunked, CHUNKED), FAM.property(_pid("contract")))
    assert not unbounded.budget_reached and unbounded.examples_label == str(unbounded.examples)


def test_a_failure_found_within_the_budget_is_still_shrunk_and_reported() -> None:
    cfg = dataclasses.replace(_zoo("scale_ignored"), time_budget_s=0.5)
    r = run_property(cfg, FAM.property(_pid("values")))
    assert r.status is Status.FAILED and not r.budget_reached and r.counterexample.repro


def test_failing_examples_persist_and_are_replayed_first_by_the_next_run(tmp_path) -> None:
    """With an example database a failure found once is found again at once, whatever the seed."""
    impl = f"{zoo.__file__}:scale_ignored"
    first = dataclasses.replace(_cfg(zoo.scale_ignored, impl, seed=3), database=tmp_path)
    found = run_property(first, FAM.property(_pid("values")))
    assert found.status is Status.FAILED and any(tmp_path.iterdir())
    again = run_property(dataclasses.replace(first, seed=10), FAM.property(_pid("values")))
    assert again.status is Status.FAILED
    assert again.examples <= len(FAM.pinned(CI)) + 1  # the pinned cases, then the saved failure
    assert again.counterexample.spec_json == found.counterexample.spec_json


def _doubled(q, k, v, g, initial_state=None, *, scale=1.0):
    """Outputs twice the right ones: wrong values and wrong gradients on every case with a nonzero output."""
    o, state = la_forward_chunked(q, k, v, g, initial_state, scale=scale)
    return 2 * o, 2 * state


def test_a_failure_seen_while_another_property_is_shrunk_is_not_lost() -> None:
    """One case can fail several properties; the search shrinks one of them. When the time budget then ends the
    search, the others must still fail on the case they failed (a calibration run of fla's chunk_gated_delta_rule
    passed varlen-values after an example at ratio 4.66, because values was shrunk on that case first)."""
    fam = dataclasses.replace(FAM, pinned=lambda _profile: ())  # random cases from the first one, as a budgeted run
    cfg = dataclasses.replace(_cfg(_doubled, fam=fam), time_budget_s=1e-3)
    verdict = check(cfg, only=(_pid("values"), _pid("gradients")))
    by_id = {r.property_id: r for r in verdict.results}
    assert by_id[_pid("values")].status is Status.FAILED
    gradients = by_id[_pid("gradients")]
    assert gradients.status is Status.FAILED, gradients
    assert "while another property" in gradients.counterexample.message
