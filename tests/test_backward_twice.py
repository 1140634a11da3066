"""A second backward through fused_sgd's graph: torch's answer on every path, never a crash.

Each case runs in a fresh interpreter (a segmentation fault then fails the test instead of
ending the run). The oracle is torch itself: the same update written with torch's own ops
(``add(p, g, alpha=-lr)`` for float rates, ``p - lr * g`` for tensors), put through the
same two backward calls. Both must raise "backward through the graph a second time", or
neither, and then give the same accumulated gradients.
"""

import json

import pytest

from tests.conftest import run_python

RATE_FORMS = ("float", "0-dim tensor", "per-tensor mixed", "meta-sgd per-element", "maml++ step")
PATHS = {"native": {}, "reference": {"MAMLEXT_NO_NATIVE": "1"}}

CASES = r"""
import itertools, json, sys
import torch
import mamlext

F64 = torch.float64
SHAPES = [(5, 3), (4,), (2, 2, 2)]


def rates(form):
    def t(*shape):
        return (torch.rand(shape, dtype=F64) + 0.1).requires_grad_()

    if form == "float":
        return 0.4
    if form == "0-dim tensor":
        return t()
    if form == "per-tensor mixed":
        return [t() if i % 2 else 0.3 for i in range(len(SHAPES))]
    if form == "meta-sgd per-element":
        return [t(*s) for s in SHAPES]
    if form == "maml++ step":  # entry 1 of a learned [K] vector per tensor
        return [t(3)[1] for _ in SHAPES]
    raise ValueError(form)


def torch_update(params, grads, lr):
    lrs = lr if isinstance(lr, list) else [lr] * len(params)
    return [
        torch.add(p, g, alpha=-r) if isinstance(r, float) else p - r * g
        for p, g, r in zip(params, grads, lrs)
    ]


def twice(update, form, retain, order, loss_kind, grads_need_grad):
    torch.manual_seed(1)
    params = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
    grads = [torch.randn(s, dtype=F64, requires_grad=grads_need_grad) for s in SHAPES]
    lr = rates(form)
    out = update(params, grads, lr)
    if order == 2:  # through the gradient of the update's output
        out = torch.autograd.grad(sum((o**3).sum() for o in out), params, create_graph=True)
    loss = sum((o.sum() if loss_kind == "sum" else (o * o).sum()) for o in out)
    rate_leaves = [r for r in (lr if isinstance(lr, list) else [lr]) if isinstance(r, torch.Tensor)]
    leaves = params + grads + [r if r.is_leaf else r._base for r in rate_leaves]
    loss.backward(retain_graph=retain)
    first = [None if x.grad is None else x.grad.clone() for x in leaves]
    try:
        loss.backward(retain_graph=retain)
    except RuntimeError as e:  # where it stopped (what it accumulated before) is torch's affair
        return str(e), first
    return None, first + [None if x.grad is None else x.grad.clone() for x in leaves]


form = sys.argv[1]
results = []
for retain, order, loss_kind, grads_need_grad in itertools.product(
    (False, True), (1, 2), ("sum", "square"), (False, True)
):
    case = f"retain_graph={retain} order={order} loss={loss_kind} grads_need_grad={grads_need_grad}"
    print("case:", case, flush=True)  # the last one printed names a crash
    ours = twice(mamlext.fused_sgd, form, retain, order, loss_kind, grads_need_grad)
    theirs = twice(torch_update, form, retain, order, loss_kind, grads_need_grad)
    same_grads = all(
        (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-12, atol=1e-12))
        for a, b in zip(ours[1], theirs[1])
    )
    results.append({"case": case, "ours": ours[0], "torch": theirs[0], "same_grads": same_grads})
print("RESULTS", json.dumps(results))
"""


def _run(env: dict, code: str, *args: str):
    argv = f"import sys; sys.argv = ['cases', *{list(args)!r}]\n"
    proc = run_python(argv + code, env=env, timeout=300)
    assert proc.returncode == 0, (
        f"the process died (exit status {proc.returncode}) in the last case printed:\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("form", RATE_FORMS)
def test_second_backward_gives_torchs_answer(path, form):
    out = _run(PATHS[path], CASES, form)
    results = json.loads(out.split("RESULTS ", 1)[1])
    assert len(results) == 16
    raised = 0
    for r in results:
        assert (r["ours"] is None) == (r["torch"] is None), r
        if r["ours"] is not None:
            raised += 1
            assert "backward through the graph a second time" in r["ours"], r
        assert r["same_grads"], r
    # without retain_graph a second backward through saved tensors must raise (and does in
    # torch for every squared loss); with retain_graph it never does
    assert raised >= 4, results
    assert all(r["ours"] is None for r in results if "retain_graph=True" in r["case"])


TASK_BATCHED = r"""
import sys
import torch
import mamlext
from mamlext.models import conv4

torch.manual_seed(0)
inner_checkpoint = None if sys.argv[1] == "stored" else 1
maml = mamlext.MAML(
    conv4(3, hidden=4, image_size=8), step_size=0.4, num_steps=2, batched=True,
    step_size_mode=sys.argv[2], inner_checkpoint=inner_checkpoint,
)
xs, xq = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 3, 1, 8, 8)
y = torch.arange(3).repeat(2, 1)
loss, _ = maml(xs, y, xq, y)
loss.backward()
try:
    loss.backward()
except RuntimeError as error:
    print("RAISED", str(error).splitlines()[0])
"""


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("graph", ["stored", "inner_checkpoint"])
@pytest.mark.parametrize("mode", ["fixed", "per_element", "per_layer_per_step"])
def test_second_backward_through_a_task_batched_meta_loss_raises_torchs_error(path, graph, mode):
    out = _run(PATHS[path], TASK_BATCHED, graph, mode)
    assert "RAISED" in out and "backward through the graph a second time" in out, out
