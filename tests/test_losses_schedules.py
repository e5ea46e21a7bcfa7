"""Distances, weightings, grids, pair sampling and curricula against their formulas."""
import math

import pytest
import torch

from cmdistill.core.losses import LPIPSDistance, PseudoHuber, get_weighting, make_distance
from cmdistill.core.schedules import (PairSchedule, ict_exponential_curriculum, karras_grid, lognormal_pair_probs,
                                 teacher_grid, vp_sigmas_from_betas, ddpm_betas)


def test_pseudo_huber_formula_and_default_c():
    a, b = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    b[0, 0, 0, 0] = 0.1
    c = 0.00054 * math.sqrt(3 * 64)
    out = PseudoHuber()(a, b)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.01 + c * c) - c, 0.0]))
    assert torch.allclose(make_distance("l2")(a, b), torch.tensor([0.01 / 192, 0.0]))
    assert torch.allclose(make_distance("l1")(a, b), torch.tensor([0.1 / 192, 0.0]))


def test_lpips_random_backbone_offline():
    d = LPIPSDistance("vgg", resize=32, pretrained_backbone=False)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    y = x.clone()
    y[1] += 0.5
    out = d(x, y)
    assert out.shape == (2,) and out[0].abs() < 1e-6 and out[1] > 0
    assert d.prepare(x).shape == (2, 3, 32, 32)


def test_weightings():
    hi, lo = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 0.5])
    assert torch.equal(get_weighting("uniform")(hi, lo), torch.ones(2))
    assert torch.allclose(get_weighting("inv_delta")(hi, lo), torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError):
        get_weighting("nope")


def test_karras_grid_endpoints_and_rho():
    g = karras_grid(18, 0.01, 157.4, 7.0)
    assert len(g) == 18 and abs(g[0] - 157.4) < 1e-3 and abs(g[-1] - 0.01) < 1e-6
    assert torch.all(g[:-1] > g[1:])
    mid = (157.4 ** (1 / 7) + 0.5 * (0.01 ** (1 / 7) - 157.4 ** (1 / 7))) ** 7
    assert abs(karras_grid(3, 0.01, 157.4)[1].item() - mid) < 1e-4


def test_teacher_grid_skip_ends_at_sigma_min():
    """t = 999, 979, ..., 19, then 0 (LCM clamps the last skipped step to t = 0): the boundary is a target."""
    table = vp_sigmas_from_betas(ddpm_betas())
    g = teacher_grid(table, 20)
    assert len(g) == 51 and torch.allclose(g[0], table[999].float()) and torch.allclose(g[-2], table[19].float())
    assert g[-1] == table[0].float()
    g = teacher_grid(table, 37)  # 999 = 27 * 37: the grid lands on t = 0 by itself, no point is repeated
    assert len(g) == 28 and g[-1] == table[0].float() and bool((g[:-1] > g[1:]).all())


def test_lognormal_probs_follow_the_normal_cdf():
    g = karras_grid(40, 0.002, 80.0)
    p = lognormal_pair_probs(g, -1.1, 2.0)
    assert abs(p.sum().item() - 1) < 1e-6
    # most mass near exp(-1.1) ~ 0.33
    centre = math.log(0.33)
    best = int(p.argmax())
    assert math.log(g[best + 1]) - 0.5 < centre < math.log(g[best]) + 0.5


def test_ict_curriculum_doubles():
    """Counted in grid points: iCT's s0 = 10, s1 = 1280 intervals are 11 and 1281 points."""
    K = 1000
    ns = [ict_exponential_curriculum(k, K, 11, 1281) for k in (0, K // 8, K // 2, K - 1)]
    assert ns[0] == 11 and ns[-1] == 1281 and ns == sorted(ns)


@pytest.mark.parametrize("start, end", [(10, 18), (11, 1281), (3, 40)])
def test_curriculum_ends_at_num_scales(start, end):
    """``schedule.num_scales`` is the final N for every curriculum (it used to end at N + 1)."""
    from cmdistill.commands import load_recipe

    r = load_recipe(None, ["schedule.curriculum=ict_exponential", f"schedule.num_scales={end}",
                           f"schedule.num_scales_start={start}", "train.max_steps=1000"])
    ps = PairSchedule("karras", 0.01, 80.0, r.schedule.num_scales, curriculum="ict_exponential",
                      num_scales_start=r.schedule.num_scales_start, total_steps=1000)
    assert ps.num_points(0) == start and ps.num_points(999) == end
    assert len(ps.grid_and_probs(999)[0]) == end


def test_pair_schedule_samples_adjacent_pairs():
    torch.manual_seed(0)
    ps = PairSchedule("karras", 0.01, 157.4, 10)
    hi, lo = ps.sample(1000, 0)
    grid = karras_grid(10, 0.01, 157.4)
    idx = torch.searchsorted(-grid, -hi)
    assert torch.allclose(grid[idx], hi) and torch.allclose(grid[idx + 1], lo)
    counts = torch.bincount(idx, minlength=9)
    assert counts.min() > 60  # uniform over 9 intervals


def test_ect_gap_halves_to_adjacent_pairs():
    """ect_halving: gaps 4, 2, 1 in three equal stages; pairs sit `gap` grid points apart, clamped at sigma_min."""
    from cmdistill.core.schedules import ect_halving_gap

    K = 900
    assert [ect_halving_gap(k, K, 4) for k in (0, 299, 300, 599, 600, 899)] == [4, 4, 2, 2, 1, 1]
    assert ect_halving_gap(0, K, 1) == 1
    torch.manual_seed(0)
    ps = PairSchedule("karras", 0.01, 5.0, 8, total_steps=K, gap="ect_halving", gap_start=4)
    grid = karras_grid(8, 0.01, 5.0)
    for step, gap in ((0, 4), (450, 2), (899, 1)):
        hi, lo = ps.sample(500, step)
        idx = torch.searchsorted(-grid, -hi)
        assert torch.equal(lo, grid[(idx + gap).clamp_max(7)])
        assert ps.gap_at(step) == gap
    assert PairSchedule("karras", 0.01, 5.0, 8).gap_at(0) == 1  # the default is CM's adjacent pairs


def test_substep_schedules():
    from cmdistill.core.schedules import SUBSTEP_SCHEDULES

    K = 600
    assert [SUBSTEP_SCHEDULES["doubling"](k, K, 4) for k in (0, 199, 200, 399, 400, 599)] == [1, 1, 2, 2, 4, 4]
    assert [SUBSTEP_SCHEDULES["constant"](k, K, 3) for k in (0, 599)] == [3, 3]
    assert SUBSTEP_SCHEDULES["doubling"](599, K, 1) == 1


def test_distill_step_solves_a_wide_gap_with_more_substeps():
    """The loop's teacher sub-steps: the substep schedule times the pair gap."""
    import types

    from cmdistill.commands import load_recipe
    from cmdistill.training.distill import Distillation

    r = load_recipe(None, ["solver.substeps=2", "solver.substep_schedule=doubling", "schedule.gap=ect_halving",
                           "schedule.gap_start=4", "train.max_steps=900", "schedule.num_scales=8"])
    fake = types.SimpleNamespace(recipe=r, pairs=PairSchedule("karras", 0.01, 5.0, 8, total_steps=900,
                                                               gap="ect_halving", gap_start=4))
    got = [Distillation.substeps(fake, k) for k in (0, 300, 450, 899)]
    assert got == [1 * 4, 1 * 2, 2 * 2, 2 * 1]
