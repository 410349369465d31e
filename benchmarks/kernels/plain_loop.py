"""Kernels as a user would first write them, for the engine benchmark (``bench_engine.py``).

``la_forward_loop``: the recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t as a plain
PyTorch loop over time, one batch and head at a time, differentiated by autograd, state in float32 for
bf16/fp16 inputs. Slow on purpose: the slower the kernel, the more each repeated evaluation costs.

Every call appends one line to the file named by ``$IQA_BENCH_CALLS`` when it is set, so the benchmark
can count kernel calls per case.
"""

from __future__ import annotations

import os

import torch


def _count() -> None:
    path = os.environ.get("IQA_BENCH_CALLS")
    if path:
        with open(path, "a") as f:
            f.write("call\n")


def la_forward_loop(q, k, v, g, initial_state=None, *, scale=1.0):
    """[B, T, H, D] q, k; [B, T, H, E] v; [B, T, H] g; [B, H, D, E] initial_state -> (o, final_state)."""
    _count()
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    outs, finals = [], []
    for b in range(B):
        o_bh, s_bh = [], []
        for h in range(H):
            s = (initial_state[b, h].to(acc) if initial_state is not None
                 else torch.zeros(D, E, dtype=acc, device=q.device))
            rows = []
            for t in range(T):
                s = torch.exp(g[b, t, h].to(acc)) * s + torch.outer(k[b, t, h].to(acc), v[b, t, h].to(acc))
                rows.append(scale * (q[b, t, h].to(acc) @ s))
            o_bh.append(torch.stack(rows))
            s_bh.append(s)
        outs.append(torch.stack(o_bh, dim=1))
        finals.append(torch.stack(s_bh))
    return torch.stack(outs).to(q.dtype), torch.stack(finals)
