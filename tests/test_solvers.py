"""Euler / Heun / DDIM steps against the exact probability-flow ODE of Gaussian data."""
import math

import torch

from cmdistill.core.solvers import ddim_step, euler_step, heun_step, solve
from cmdistill.core.tensors import append_dims

MU, S0 = 0.3, 0.7  # x0 ~ N(MU, S0^2) per dimension


class GaussianDenoiser:
    """Analytic denoiser of N(mu, s0^2) data: ``E[x0 | x] = mu + s0^2 / (s0^2 + sigma^2) (x - mu)``."""

    sigma_min, sigma_max, sigma_data = 0.002, 80.0, S0

    def __call__(self, x, sigma):
        s = append_dims(torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]), x.ndim)
        return MU + S0**2 / (S0**2 + s**2) * (x - MU)


def exact(x, s_from, s_to):
    """Exact ODE solution: ``x(sigma) - mu`` scales with ``sqrt(s0^2 + sigma^2)``."""
    return MU + (x - MU) * math.sqrt(S0**2 + s_to**2) / math.sqrt(S0**2 + s_from**2)


def integrate(step, n, s_hi=10.0, s_lo=0.05):
    x = torch.linspace(-20, 20, 64, dtype=torch.float64).reshape(8, 1, 2, 4)
    sig = torch.exp(torch.linspace(math.log(s_hi), math.log(s_lo), n + 1, dtype=torch.float64))
    D = GaussianDenoiser()
    y = x.clone()
    for a, b in zip(sig[:-1], sig[1:]):
        y = step(D, y, a.expand(8).double(), b.expand(8).double())
    return (y - exact(x, s_hi, s_lo)).abs().max().item()


def _f64(step):
    # the library computes sigmas in fp32; run the order study in float64 by passing float64 tensors through
    def run(D, x, a, b):
        import cmdistill.core.solvers as S

        orig = S.as_sigma
        S.as_sigma = lambda s, x: torch.as_tensor(s, dtype=torch.float64).expand(x.shape[0])
        try:
            return step(D, x, a, b)
        finally:
            S.as_sigma = orig

    return run


def test_single_steps_close_to_exact_for_small_steps():
    D = GaussianDenoiser()
    x = torch.randn(4, 1, 4, 4) * 2
    a, b = torch.full((4,), 1.0), torch.full((4,), 0.99)
    ref = exact(x, 1.0, 0.99)
    assert (euler_step(D, x, a, b) - ref).abs().max() < 1e-3
    assert (heun_step(D, x, a, b) - ref).abs().max() < 1e-5


def test_heun_is_second_order_euler_first_order():
    e_h = [integrate(_f64(heun_step), n) for n in (8, 16, 32)]
    e_e = [integrate(_f64(euler_step), n) for n in (8, 16, 32)]
    for a, b in zip(e_h[:-1], e_h[1:]):
        assert 3.5 < a / b < 4.5, e_h  # halving the step divides the error by ~4
    for a, b in zip(e_e[:-1], e_e[1:]):
        assert 1.7 < a / b < 2.3, e_e  # ... and by ~2 for Euler
    assert e_h[-1] < e_e[-1] / 10


def test_ddim_equals_euler_in_ve_space():
    D = GaussianDenoiser()
    x = torch.randn(3, 1, 4, 4) * 5
    a, b = torch.tensor([5.0, 2.0, 1.0]), torch.tensor([3.0, 0.5, 0.0])
    assert torch.allclose(ddim_step(D, x, a, b), euler_step(D, x, a, b), atol=1e-5)


def test_heun_to_zero_is_euler_and_substeps_converge():
    D = GaussianDenoiser()
    x = torch.randn(2, 1, 4, 4) * 3
    assert torch.equal(heun_step(D, x, 2.0, 0.0), euler_step(D, x, 2.0, 0.0))
    ref = exact(x, 4.0, 0.5)
    e1 = (solve(D, x, 4.0, 0.5, "euler", 1) - ref).abs().max()
    e8 = (solve(D, x, 4.0, 0.5, "euler", 8) - ref).abs().max()
    assert e8 < e1 / 4
    assert (solve(D, x, 4.0, 0.5, "heun", 16) - ref).abs().max() < 5e-3


def test_per_sample_sigmas():
    D = GaussianDenoiser()
    x = torch.randn(2, 1, 2, 2)
    a, b = torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.9])
    both = heun_step(D, x, a, b)
    for i in range(2):
        one = heun_step(D, x[i:i + 1], a[i:i + 1], b[i:i + 1])
        assert torch.allclose(both[i:i + 1], one)
