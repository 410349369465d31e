"""Running a third-party package's Triton kernels on CPU tensors through Triton's interpreter.

Without a GPU, Triton has no active driver ("0 active drivers"), so a compiled launch is impossible;
``TRITON_INTERPRET=1`` makes ``@triton.jit`` return interpreted functions that run the kernel body in
NumPy. The variable is read when ``@triton.jit`` *decorates*, i.e. when the package's modules are
imported, so :func:`enable_interpreter` must run before that import.

Three gaps between the interpreter (triton 3.9) and compiled Triton stop flash-linear-attention's
kernels from running, or make them compute garbage, although its code is valid Triton. The shims
below close exactly those gaps and nothing else:

1. Autotuning (``@triton.autotune`` with several configs) benchmarks every config through
   ``driver.active.get_benchmarker()``, which needs a driver. :func:`shim_package_kernels` gives each
   autotuner *of the named package* a benchmark that times nothing, so the first config is used
   (timings are meaningless in the interpreter anyway). Correctness must not depend on the config;
   only the first one is exercised.
2. Loop induction variables: compiled Triton makes ``i`` in ``for i in range(n)`` a ``tl.tensor``
   (so ``i.to(tl.int64)`` is valid); the interpreter yields Python ints. :func:`shim_package_kernels`
   gives each interpreted function *of the named package* an AST rewriter that starts every
   ``range``/``tl.range`` loop body with ``i = i`` (which the interpreter's own rewriter turns into
   ``i = to_tensor(i)``). ``tl.static_range`` loops are left alone (their variable is a constexpr).
3. bfloat16 arithmetic: the interpreter stores bf16 as ``uint16`` and ``tl.dot``, ``+ - * /``,
   comparisons and negation on bf16 blocks operate on that raw storage (``x * y`` is ~1e34,
   ``tl.dot`` ~1e9). :func:`fix_bf16_arithmetic` widens bf16 operands to float32 (exact) and rounds
   arithmetic results back to bf16 (round-to-nearest-even), as the hardware does. This one is a
   process-wide patch of Triton's interpreter (its builder is one shared object); it changes results
   only where an operand is bf16, where the unpatched result is meaningless.

Not shimmed (reported as found): ``tl.dot`` of float64 blocks into a float32 accumulator is an
inconsistent program (the result type is float64, the accumulator float32); the interpreter returns
wrong values for it instead of refusing.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterator

import torch

__all__ = ["interpreter_needed", "enable_interpreter", "shim_package_kernels", "fix_bf16_arithmetic"]

_ENV = "TRITON_INTERPRET"


def interpreter_needed() -> bool:
    """True when Triton kernels can only run interpreted here: no CUDA device, or the user asked for it."""
    return os.environ.get(_ENV, "0") not in ("", "0") or not torch.cuda.is_available()


def enable_interpreter(package: str) -> None:
    """Set ``TRITON_INTERPRET=1`` before ``package`` is imported; refuse if it was imported compiled."""
    if any(name == package or name.startswith(package + ".") for name in sys.modules):
        if not _imported_interpreted(package):
            raise RuntimeError(
                f"{package} was imported before TRITON_INTERPRET=1 was set, and there is no GPU: its Triton kernels"
                f" cannot run. Import the adapter before {package}, or set TRITON_INTERPRET=1 in the environment."
            )
    os.environ[_ENV] = "1"


def _imported_interpreted(package: str) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for obj in _package_objects(package):
        for inner in _unwrap(obj):
            if isinstance(inner, InterpretedFunction):
                return True
            if isinstance(inner, JITFunction):
                return False
    return True  # no kernels imported yet


def _package_objects(package: str) -> Iterator[object]:
    for name, module in list(sys.modules.items()):
        if module is not None and (name == package or name.startswith(package + ".")):
            yield from list(vars(module).values())


def _unwrap(obj: object) -> Iterator[object]:
    """obj and the chain of ``.fn`` it wraps (Autotuner -> Heuristics -> JITFunction -> function)."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen and not isinstance(obj, type):
        seen.add(id(obj))
        yield obj
        obj = getattr(obj, "fn", None)


def _no_benchmark(kernel_call, quantiles):
    return [0.0] * len(quantiles)


def _loop_variable_transformer():
    from triton.runtime.interpreter import ASTTransformer

    class LoopVariablesAsTensors(ASTTransformer):
        """The interpreter's rewriter, plus: ``range``/``tl.range`` loop variables become tensors."""

        def visit_For(self, node: ast.For) -> ast.AST:
            node = self.generic_visit(node)
            func = node.iter.func if isinstance(node.iter, ast.Call) else None
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "range" and isinstance(node.target, ast.Name):
                rebind = ast.Assign(targets=[ast.Name(node.target.id, ast.Store())], value=ast.Name(node.target.id, ast.Load()))
                node.body.insert(0, ast.fix_missing_locations(ast.copy_location(self.visit_Assign(rebind), node)))
            return node

    return LoopVariablesAsTensors()


def shim_package_kernels(package: str) -> int:
    """Apply shims 1 and 2 to every autotuner and interpreted function of ``package`` imported so far.

    Idempotent; returns the number of objects shimmed. Call after importing the package's kernels."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    transformer = _loop_variable_transformer()
    count = 0
    for obj in _package_objects(package):
        for inner in _unwrap(obj):
            if isinstance(inner, Autotuner) and inner._do_bench is not _no_benchmark:
                inner._do_bench = _no_benchmark
                inner.__dict__.pop("do_bench", None)  # a cached_property over _do_bench
                count += 1
            elif isinstance(inner, InterpretedFunction) and not getattr(inner, "_iqa_loop_shim", False):
                inner.rewriter.ast_transformer = transformer
                inner._iqa_loop_shim = True
                count += 1
    return count


def fix_bf16_arithmetic() -> None:
    """Shim 3: bfloat16 ``tl.dot``, element-wise binary ops and negation in the interpreter compute on
    the values (widened to float32; arithmetic results rounded back to bf16, round-to-nearest-even),
    not on the raw ``uint16`` storage. Idempotent."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_type = type(interpreter.interpreter_builder)
    if getattr(builder_type.create_dot, "_iqa_bf16_fix", False):
        return
    original_dot, original_binary, original_unary = builder_type.create_dot, builder_type.binary_op, builder_type.unary_op

    def is_bf16(handle) -> bool:
        return handle.dtype.scalar == tl.bfloat16

    def widen(handle):
        if is_bf16(handle):
            return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def narrow(handle):
        if handle.dtype.scalar != tl.float32:
            return handle  # comparisons: int1
        data = interpreter._convert_float(handle.data, tl.float32, tl.bfloat16, None).view(np.uint16)
        return interpreter.TensorHandle(data, tl.bfloat16)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if is_bf16(lhs) or is_bf16(rhs):
            return narrow(original_binary(self, widen(lhs), widen(rhs), op))
        return original_binary(self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if is_bf16(arg):
            return narrow(original_unary(self, widen(arg), op))
        return original_unary(self, arg, op)

    create_dot._iqa_bf16_fix = True  # type: ignore[attr-defined]
    builder_type.create_dot, builder_type.binary_op, builder_type.unary_op = create_dot, binary_op, unary_op
