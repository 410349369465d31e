"""The suite gates its own kernel the way users gate theirs: the chunked la_forward must not lose precision
against the committed baseline (tests/baselines/la_forward_chunked.json; refresh deliberately with
``iqa-verify gate iqa_verify.kernels.la_forward_chunked:la_forward_chunked --family la-forward --dtype float32
float64 --write-baseline tests/baselines/la_forward_chunked.json``). A change that passes every property but
moves an error ratio from ~1e-6 to ~0.7 (a cancellation reintroduced in the decay gradient, say) fails here."""

from __future__ import annotations

from pathlib import Path

from iqa_verify.cli import main

BASELINE = Path(__file__).parent / "baselines" / "la_forward_chunked.json"


def test_chunked_la_forward_holds_its_precision(capsys) -> None:
    code = main(["gate", "iqa_verify.kernels.la_forward_chunked:la_forward_chunked", "--family", "la-forward",
                 "--baseline", str(BASELINE)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "no property regressed" in out
