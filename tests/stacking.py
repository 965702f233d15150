"""Shared by the layer and model tests: one training step with the model-wide stacked kernel generation and one
without (every layer generating its own), for comparing outputs, gradients and generation calls; a layer's cached
inference operators."""
import torch

from s4nd_vision.layers import s4nd, ssm_kernel


def latest_operators(layer: s4nd.S4ND):
    """The convolution operators of the layer's most recent inference call (`S4ND._cached_operators`)."""
    return layer._kernel_cache[1][-1][1]


def count_generation_calls(monkeypatch) -> list:
    """A list that gets one entry per S4D kernel generation call (`_SSMKernelFn`) from now on in the test."""
    calls = []
    apply = ssm_kernel._SSMKernelFn.apply
    monkeypatch.setattr(ssm_kernel._SSMKernelFn, 'apply', lambda *a: calls.append(1) or apply(*a))
    return calls


def step_with_and_without_stacking(monkeypatch, model: torch.nn.Module, x: torch.Tensor, calls: list) -> list:
    """[(output, {name: grad}, len(calls))] for the stacked step, then the layer-by-layer one;
    `calls` is a list the caller's instrumentation appends to."""
    results = []
    for stacked in (True, False):
        monkeypatch.setattr(s4nd, 'kernels_can_be_prepared', lambda module: stacked)
        calls.clear()
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[0][1].items():
        assert_same_gradient(grad, results[1][1][name], name)
    return results


def assert_same_gradient(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """The gradient of one parameter from a step with the model-wide stacked kernel generation and from one where
    layers generate their own (layer by layer, checkpointed blocks): equal up to float32 rounding. On the CPU a
    stacked call generates over the modes kept in any of its layers (`ssm_kernel._kept_modes`), a layer's own call
    over its own, and their GEMMs then sum in another order; a wrong kernel would differ by its own size."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=name)
