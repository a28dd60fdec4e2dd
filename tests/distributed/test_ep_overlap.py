"""The overlapped expert-parallel schedule equals the plain one, and the single-process run.

One 4-rank launch (pp=2 vpp=2 ep=2 dp=2, DEP) trains the same config and data with
`parallel.ep_overlap` on (chunks run node by node, steady-state forward/backward pairs
interleave so each all-to-all runs under the other's compute) and off (one autograd call
per F/B), on the automatic layout and on one with an embedding-only and a dense-only
chunk ("E|t|tt|tL": layer 0 is tiny's dense layer). Overlapped and plain agree bitwise
(losses, grad norms, every parameter: the per-parameter gradient accumulation order is
the same, and on these shapes so is every activation-gradient sum); the overlapped run
also equals the single-process reference within the equivalence tests' tolerance. The
mutant reads an all-to-all's receive buffer before its handle completed and must fail.
"""
import pytest
import torch

from tests.distributed.launcher import torchrun
from tests.distributed.test_equivalence import BASE, mismatches, reference  # noqa: F401

pytestmark = pytest.mark.slow

LAYOUT = "pp=2,vpp=2,ep=2,dp=2,encoder=dep"
DENSE_CHUNK = LAYOUT + ",layout=E|t|tt|tL"


def bitwise_differences(a: dict, b: dict) -> list[str]:
    problems = [f"{key} {a[key]} != {b[key]}" for key in ("loss", "grad_norm") if a[key] != b[key]]
    return problems + [name for name, t in a["tensors"].items()
                       if not torch.equal(t, b["tensors"][name])]


def test_overlapped_schedule_equals_plain_and_one_process(tmp_path, reference):  # noqa: F811
    runs = [LAYOUT + ",ep_overlap=true", LAYOUT + ",ep_overlap=false",
            DENSE_CHUNK + ",ep_overlap=true", DENSE_CHUNK + ",ep_overlap=false"]
    mutant = LAYOUT + ",ep_overlap=true,mutant=early_a2a_read"
    out = tmp_path / "results.pt"
    torchrun("tests.distributed.equivalence_worker", 4, "--out", str(out),
             "--layouts", ";".join(runs + [mutant]), "--base", " ".join(BASE))
    results = torch.load(out, weights_only=True)
    for overlapped, plain in (runs[:2], runs[2:]):
        problems = bitwise_differences(results[overlapped], results[plain])
        assert not problems, f"{overlapped} vs {plain}: {problems[:6]}"
        problems = mismatches(results[overlapped], reference)
        assert not problems, f"{overlapped}: " + "; ".join(problems[:8])
    assert mismatches(results[mutant], reference), "reading a buffer early went unnoticed"
