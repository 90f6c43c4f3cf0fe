"""Which BLAS runs the fp32 CPU products, and that routing them changes nothing but speed."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatbot_trainer.model import cpu_blas
from chatbot_trainer.model.loss import linear_cross_entropy_sum
from chatbot_trainer.model.cpu_blas import BlasChoice

from .test_lora_fused import TARGETS, loss_and_grads, tiny_lora_model


@pytest.fixture(autouse=True)
def torch_products_after():
    yield
    cpu_blas.activate(BlasChoice("torch", "test ended"))


@pytest.fixture
def count_openblas(monkeypatch):
    calls = []
    matmul = np.matmul
    monkeypatch.setattr(np, "matmul", lambda a, b: calls.append((a.shape, b.shape)) or matmul(a, b))
    return calls


def openblas_on():
    cpu_blas.activate(BlasChoice("openblas", "test"))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
def test_routed_products_equal_torch_s(bias, count_openblas):
    x, w, g = rand(37, 24, seed=1), rand(40, 24, seed=2), rand(37, 40, seed=3)
    b = rand(40, seed=4) if bias else None
    expected = (F.linear(x, w, b), g.mm(w), g.t().mm(x))
    openblas_on()
    got = (cpu_blas.linear(x, w, b), cpu_blas.mm(g, w), cpu_blas.mm(g.t(), x))  # a transposed operand too
    assert len(count_openblas) == 3
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-5)
        assert r.dtype == torch.float32 and r.is_contiguous()
    got[0].add_(1.0)  # results are ordinary writable tensors (the fused layer adds into them)


def test_products_that_stay_with_torch(count_openblas):
    openblas_on()
    x, w = rand(8, 16), rand(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_blas.linear(x, w).dtype == torch.bfloat16
    cpu_blas.mm(x.bfloat16(), w.t().bfloat16())
    strided = rand(8, 32)[:, ::2]  # neither rows nor columns contiguous
    torch.testing.assert_close(cpu_blas.mm(strided, w.t()), strided.mm(w.t()))
    tracked = x.clone().requires_grad_()
    out = cpu_blas.linear(tracked, w)  # grad mode on, an input that wants a gradient: autograd must see it
    assert out.grad_fn is not None
    out.sum().backward()
    torch.testing.assert_close(tracked.grad, w.sum(0).expand(8, 16))
    assert count_openblas == []


def test_nothing_is_routed_until_a_choice_says_so(count_openblas):
    x, w = rand(8, 16), rand(12, 16)
    cpu_blas.linear(x, w)
    cpu_blas.mm(x, w.t())
    assert count_openblas == [] and not cpu_blas.active()


def test_fused_lora_on_openblas_matches_peft(count_openblas):
    """Forward, input gradients and LoRA gradients of the fused layers, with their base products
    in OpenBLAS, equal peft's own layers (dropout on, same masks)."""
    from chatbot_trainer.model.lora_fused import use_fused_lora

    reference = tiny_lora_model(0.1).train()
    fused = copy.deepcopy(reference)
    use_fused_lora(fused)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    openblas_on()
    loss, grads = loss_and_grads(fused, ids)
    # per layer: the base product and x Aᵀ forward; B's, A's and the input's gradients, each
    # through the (tokens × rank) product, and the base's input gradient (not in layer 0's
    # q, k and v, whose input is the frozen embedding's)
    layers = 2 * len(TARGETS)
    assert len(count_openblas) == layers * (2 + 5) - 3 * 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_output_layer_loss_on_openblas_matches_cross_entropy(count_openblas):
    hidden = rand(30, 16, seed=5).requires_grad_()
    weight = rand(50, 16, seed=6)
    targets = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(7))
    expected = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    openblas_on()
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=7)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert len(count_openblas) == 2 * 5  # logits and the hidden gradient, per chunk of 7 rows
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


SMOLLM_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def test_choice_follows_the_timing(monkeypatch):
    monkeypatch.setenv("CHATBOT_CPU_BLAS", "auto")
    monkeypatch.setattr(cpu_blas, "_time_backends", lambda shapes, threads: (1.3, 1.0))
    choice = cpu_blas.choose(SMOLLM_SHAPES, "cpu", torch.float32)
    assert (choice.backend, choice.speedup) == ("openblas", 1.3) and cpu_blas.active()
    assert choice.as_dict()["threads"] == torch.get_num_threads()
    monkeypatch.setattr(cpu_blas, "_time_backends", lambda shapes, threads: (1.05, 1.0))
    choice = cpu_blas.choose(SMOLLM_SHAPES, "cpu", torch.float32)
    assert choice.backend == "torch" and "1.05x" in choice.reason and not cpu_blas.active()


def test_the_timing_runs_at_the_given_shapes():
    torch_s, openblas_s = cpu_blas._time_backends([(64, 48)], threads=1)
    assert torch_s > 0 and openblas_s > 0


def test_openblas_gets_torch_s_thread_count(monkeypatch):
    from threadpoolctl import ThreadpoolController

    monkeypatch.setenv("CHATBOT_CPU_BLAS", "openblas")
    choice = cpu_blas.choose(SMOLLM_SHAPES, "cpu", torch.float32)
    assert choice.backend == "openblas" and cpu_blas.active()
    info = ThreadpoolController().select(internal_api="openblas").info()
    assert info and all(lib["num_threads"] == torch.get_num_threads() for lib in info)


@pytest.mark.parametrize(
    "env, device, dtype, shapes, reason",
    [
        ("torch", "cpu", torch.float32, SMOLLM_SHAPES, "CHATBOT_CPU_BLAS=torch"),
        ("auto", "cuda", torch.float32, SMOLLM_SHAPES, "products run on cuda in float32"),
        ("auto", "cpu", torch.bfloat16, SMOLLM_SHAPES, "products run on cpu in bfloat16"),
        ("openblas", "cpu", torch.bfloat16, SMOLLM_SHAPES, "products run on cpu in bfloat16"),
        ("auto", "cpu", torch.float32, [(64, 32)], "not worth timing"),
    ],
)
def test_cases_that_keep_torch_without_timing(env, device, dtype, shapes, reason, monkeypatch):
    monkeypatch.setenv("CHATBOT_CPU_BLAS", env)
    monkeypatch.setattr(cpu_blas, "_time_backends", lambda *a: pytest.fail("timed"))
    openblas_on()
    choice = cpu_blas.choose(shapes, device, dtype)
    assert choice.backend == "torch" and reason in choice.reason and not cpu_blas.active()


def test_a_misspelt_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("CHATBOT_CPU_BLAS", "mkl")
    with pytest.raises(ValueError, match="use auto, openblas or torch"):
        cpu_blas.choose(SMOLLM_SHAPES, "cpu", torch.float32)
