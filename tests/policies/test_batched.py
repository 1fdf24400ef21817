"""Plans equal the recorded ones (tests/data/planning_golden.pt, see planning_golden.py): the
same kept indices, layer entropies and summaries, for every registered policy on CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from planning_golden import (
    CASES,
    GOLDEN,
    VARIANTS,
    case_layers,
    get_policy,
    plan_record,
    variant_key,
)

from vllm_entropy_kv.policies import available_policies


# Summaries that are solutions of a ridge least-squares fit (src's values: `_fit_values`,
# through `torch.linalg.solve` and `pinv`). LAPACK picks CPU-specific kernels, and the fit's
# conditioning amplifies their rounding: against the recording (made on an Intel Xeon), an AMD
# EPYC's values differ by up to 1.4e-4 of their norm (2026-12-07), every other summary by
# about 1e-7. The kept tokens and counts are compared exactly all the same.
LEAST_SQUARES_FITS = {("src", "values")}
FIT_RTOL = 1e-3


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=False)


def test_golden_covers_every_policy(golden) -> None:
    assert {name for name, _ in VARIANTS} == set(available_policies())
    assert golden["cases"] == CASES


@pytest.mark.parametrize("index", range(len(CASES)))
def test_plans_match_the_recording(golden, index: int) -> None:
    case = CASES[index]
    layers, budget = case_layers(index, case)
    # Summaries are computed in float32 and stored in the input dtype: bf16 rounding of a
    # float32 difference in the last bit can move a value by one bf16 step.
    atol = 1e-5 if case["dtype"] == "float32" else 0.0
    rtol = 1e-5 if case["dtype"] == "float32" else 2**-7
    for name, params in VARIANTS:
        key = variant_key(name, params)
        want = golden["plans"][(index, key)]
        got = plan_record(get_policy(name, **params).plan(layers, budget), case["n"])
        assert torch.equal(got["keep_mask"], want["keep_mask"]), f"{key}: kept tokens differ"
        assert torch.equal(got["num_summaries"], want["num_summaries"]), key
        torch.testing.assert_close(got["layer_entropy"], want["layer_entropy"], atol=1e-6,
                                   rtol=1e-6, equal_nan=True, msg=f"{key}: layer entropy")
        assert torch.equal(got["counts"], want["counts"]), f"{key}: summary counts differ"
        for part in ("keys", "values"):
            if (name, part) in LEAST_SQUARES_FITS:
                assert got[part].shape == want[part].shape, f"{key}: summary {part} shape"
                error = (got[part] - want[part]).norm() / want[part].norm().clamp_min(1e-30)
                assert error <= FIT_RTOL, f"{key}: summary {part}: relative error {error:.2e}"
                continue
            torch.testing.assert_close(got[part], want[part], atol=atol, rtol=rtol,
                                       msg=lambda m, k=key, p=part: f"{k}: summary {p}: {m}")


@pytest.mark.parametrize("index", range(len(CASES)))
def test_keys_as_the_engine_reads_them_back_give_the_same_plans(golden, index: int) -> None:
    """The engine hands policies float32 keys with positions contiguous
    (`BlockLayout.gather`); the offline harness, keys as the model made them. Same values,
    so the same tokens are kept."""
    case = CASES[index]
    layers, budget = case_layers(index, case)
    engine = [replace(o, keys=o.keys.float().transpose(1, 2).contiguous().transpose(1, 2))
              for o in layers]
    for name, params in VARIANTS:
        key = variant_key(name, params)
        got = plan_record(get_policy(name, **params).plan(engine, budget), case["n"])
        assert torch.equal(got["keep_mask"], golden["plans"][(index, key)]["keep_mask"]), key


@pytest.mark.parametrize("index", [1, 3])
def test_plans_with_layers_stacked_as_on_a_gpu(golden, index: int, monkeypatch) -> None:
    """A GPU stacks the layers (`stacks_layers`); on CPU each layer goes alone. The stacked
    path, forced here on CPU, keeps the recorded tokens too."""
    from vllm_entropy_kv.policies import entropy_merge, stats

    monkeypatch.setattr(stats, "stacks_layers", lambda device: True)
    monkeypatch.setattr(entropy_merge, "stacks_layers", lambda device: True)
    case = CASES[index]
    layers, budget = case_layers(index, case)
    for name, params in VARIANTS:
        key = variant_key(name, params)
        got = plan_record(get_policy(name, **params).plan(layers, budget), case["n"])
        want = golden["plans"][(index, key)]
        assert torch.equal(got["keep_mask"], want["keep_mask"]), key
        assert torch.equal(got["counts"], want["counts"]), key
