"""Kernels that misbehave towards the process rather than the math: each must end in a failing verdict
that names what happened (exit, signal, hang, BaseException, bad return, failed allocation, leaked
global state, a corrupted input, non-determinism), never in a PASS or a dead harness. The last two are
unusual but correct (they reseed torch's global RNG or print a lot) and must pass.

Every kernel computes the right answer with the suite's recurrent ``la-forward`` kernel, then misbehaves.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import torch

from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent

__all__ = [
    "exits_zero", "hard_exit", "invalid_read", "hangs_on_one_shape", "raises_system_exit",
    "raises_keyboard_interrupt", "raises_generator_exit", "returns_non_tensor", "allocation_fails", "allocates_4g_of_scratch",
    "leaks_default_dtype", "corrupts_input_in_backward", "nondeterministic_1e7", "reseeds_global_rng",
    "prints_a_lot",
]


def exits_zero(q, k, v, g, initial_state=None, *, scale=1.0):
    """Calls ``sys.exit(0)``: in-process that used to end the run with status 0, a false PASS."""
    sys.exit(0)


def hard_exit(q, k, v, g, initial_state=None, *, scale=1.0):
    """``os._exit(0)``: the process ends at once, no exception to catch."""
    os._exit(0)


def invalid_read(q, k, v, g, initial_state=None, *, scale=1.0):
    """Reads address 0, as an out-of-bounds read in a compiled kernel does: SIGSEGV."""
    if q.shape[1] > 1:
        ctypes.string_at(0)
    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale)


def hangs_on_one_shape(q, k, v, g, initial_state=None, *, scale=1.0):
    """Deadlocks (sleeps for ever) when the value dimension differs from the key dimension."""
    if q.shape[-1] != v.shape[-1]:
        while True:
            time.sleep(1)
    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale)


def raises_system_exit(q, k, v, g, initial_state=None, *, scale=1.0):
    raise SystemExit(3)


def raises_keyboard_interrupt(q, k, v, g, initial_state=None, *, scale=1.0):
    """A KeyboardInterrupt of the kernel's own (not the user's Ctrl-C)."""
    raise KeyboardInterrupt


def raises_generator_exit(q, k, v, g, initial_state=None, *, scale=1.0):
    raise GeneratorExit


def returns_non_tensor(q, k, v, g, initial_state=None, *, scale=1.0):
    o, state = la_forward_recurrent(q, k, v, g, initial_state, scale=scale)
    return {"o": o, "final_state": state}


def allocation_fails(q, k, v, g, initial_state=None, *, scale=1.0):
    """Asks for an exabyte of scratch memory."""
    scratch = torch.empty(2**60, dtype=torch.uint8)
    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale) if scratch.numel() else None


def allocates_4g_of_scratch(q, k, v, g, initial_state=None, *, scale=1.0):
    """Right answer, but maps 4 GiB of scratch first: fine on a big machine, a failure under ``--max-memory 2G``."""
    scratch = torch.empty(4 * 2**30, dtype=torch.uint8)
    del scratch
    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale)


def leaks_default_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    """Right answer, but leaves ``torch.set_default_dtype(torch.float64)`` behind."""
    torch.set_default_dtype(torch.float64)
    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale)


class _ScaleBack(torch.autograd.Function):
    """Identity on q whose backward zeroes the saved q in place: the input is corrupted during backward."""

    @staticmethod
    def forward(ctx, q):
        ctx.save_for_backward(q)
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        q.data.zero_()
        return grad


def corrupts_input_in_backward(q, k, v, g, initial_state=None, *, scale=1.0):
    return la_forward_recurrent(_ScaleBack.apply(q), k, v, g, initial_state, scale=scale)


_calls = [0]


def nondeterministic_1e7(q, k, v, g, initial_state=None, *, scale=1.0):
    """Every other call, the output moves by one unit in the last place (1e-7 relative in float32)."""
    o, state = la_forward_recurrent(q, k, v, g, initial_state, scale=scale)
    _calls[0] += 1
    if _calls[0] % 2:
        o = torch.nextafter(o, torch.full_like(o, float("inf")))
    return o, state


def reseeds_global_rng(q, k, v, g, initial_state=None, *, scale=1.0):
    """Correct: reseeds and draws from torch's global RNG (examples must not depend on it)."""
    torch.manual_seed(1234)
    torch.rand(3)
    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale)


def prints_a_lot(q, k, v, g, initial_state=None, *, scale=1.0):
    """Correct: prints a thousand lines per call, to stdout and stderr."""
    for i in range(500):
        print(f"debug line {i}: q {tuple(q.shape)}")
        print(f"warning line {i}", file=sys.stderr)
    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale)
