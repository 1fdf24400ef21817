"""The RULER-style generators and statistics, without the model (a word count stands in for
the tokenizer)."""

from __future__ import annotations

import math

import pytest

from vllm_entropy_kv import assets
from vllm_entropy_kv.eval.perplexity import Scored, perplexity_ratio
from vllm_entropy_kv.eval.ruler.sample import Sample
from vllm_entropy_kv.eval.ruler.stats import average, estimate, wilson

requires_texts = pytest.mark.skipif(
    not assets.is_complete(assets.texts_dir()), reason="run `python -m vllm_entropy_kv.assets`"
)


def words(sample: Sample) -> int:
    return len((sample.message + sample.answer_prefix).split())


@requires_texts
@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue",
                                  "niah_multiquery", "vt", "cwe", "fwe", "qa"])
def test_samples_fit_are_seeded_and_hold_their_answers(task: str) -> None:
    from vllm_entropy_kv.eval.ruler.tasks import make_sample

    sample = make_sample(task, 1500, 3, seed=0, count=words)
    assert sample.task == task
    assert 1200 <= words(sample) <= 1500
    assert make_sample(task, 1500, 3, seed=0, count=words) == sample
    assert make_sample(task, 1500, 4, seed=0, count=words) != sample
    assert sample.references and sample.max_new_tokens > 0
    if task != "qa":  # the QA answer is blanked out of its sentence (and maybe elsewhere)
        assert all(ref in sample.message for ref in sample.references)
    assert sample.score(" ".join(sample.references)) == 1.0
    assert sample.score("nothing") == 0.0


def test_score_is_the_share_of_references_found() -> None:
    sample = Sample("t", "m", "p", ("123", "AbC"), 8)
    assert sample.score("abc and 12") == 0.5


def test_wilson_interval() -> None:
    low, high = wilson(100, 100)
    assert high == 1.0 and low == pytest.approx(0.963, abs=1e-3)
    low, high = wilson(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-3)


def test_estimates() -> None:
    binary = estimate([1.0] * 9 + [0.0])
    assert binary.mean == 0.9 and (binary.low, binary.high) == pytest.approx(wilson(9, 10))
    partial = estimate([0.5, 0.25, 1.0, 0.75] * 5)
    assert partial.low < partial.mean < partial.high
    avg = average([[1.0] * 10, [0.0, 1.0] * 5])
    assert avg.mean == 0.75 and avg.samples == 20 and avg.low < 0.75 < avg.high
    assert average([[1.0, 0.0]]) == estimate([1.0, 0.0])


def test_perplexity_ratio_resamples_paired_documents() -> None:
    base = [Scored(nll=100.0 + i, tokens=50) for i in range(20)]
    # Every document 2 nats worse in all: the ratio is exact, so is its interval.
    worse = [Scored(nll=s.nll + 2.0, tokens=50) for s in base]
    assert perplexity_ratio(worse, base) == pytest.approx((math.exp(2 / 50),) * 3)
    mixed = [Scored(nll=s.nll + (5.0 if i % 2 else -1.0), tokens=50)
             for i, s in enumerate(base)]
    mean, low, high = perplexity_ratio(mixed, base)
    assert mean == pytest.approx(math.exp(2 / 50))
    assert math.exp(-1 / 50) < low < mean < high < math.exp(5 / 50)
    with pytest.raises(ValueError):
        perplexity_ratio(worse[:3], base)


def test_served_cross_check_pairs_the_same_samples() -> None:
    from vllm_entropy_kv.eval.ruler.served import cross_check

    def row(index: int, score: float) -> dict:
        return {"task": "niah_single", "length": 2048, "index": index, "arm": "entropy",
                "ratio": 0.25, "score": score}

    offline = [row(i, 1.0) for i in range(20)] + [row(99, 0.0)]
    served = [row(i, 1.0 if i else 0.0) for i in range(20)]
    text = cross_check(offline, served)
    line = text.splitlines()[2]
    assert "| 20 |" in line and "| yes | 19/20 |" in line


def test_arm_variants_set_policy_fields() -> None:
    from vllm_entropy_kv.eval.ruler.arms import arm

    variant = arm("entropy:observation_queries=8:exponent=0.5")
    policy = variant.build()
    assert (policy.observation_queries, policy.exponent, policy.chunk_size) == (8, 0.5, 32)
    assert variant.label == "entropy:observation_queries=8:exponent=0.5"
    # The same settings in another order share the plan of the first.
    assert arm("entropy:exponent=0.5:observation_queries=8").plan_key == variant.plan_key
    assert arm("entropy:observation_queries=none").build().observation_queries is None
    with pytest.raises(ValueError, match="fields: chunk_size, exponent"):
        arm("entropy:window=8")
    with pytest.raises(ValueError, match="policy:field=value"):
        arm("entropy-fast")
    with pytest.raises(ValueError, match="reach='1.5' is not of type int"):
        arm("entropy:reach=1.5")
    # recent_tokens is the budget's (every policy keeps the last prompt tokens), and plans
    # apart from the same policy without it.
    recent = arm("entropy:exponent=0.5:recent_tokens=128")
    assert recent.build() == arm("entropy:exponent=0.5").build()
    assert recent.budget(0.25).recent_tokens == 128 and variant.budget(0.25).recent_tokens == 32
    assert recent.plan_key != arm("entropy:exponent=0.5").plan_key
    with pytest.raises(ValueError, match="recent_tokens is an integer"):
        arm("entropy:recent_tokens=many")


@requires_texts
def test_hits_by_place_follow_the_order_of_the_asked_keys() -> None:
    """Multiquery answers that name only the last asked keys' values show up as hits at
    those places; tasks without an asked order get no table."""
    from vllm_entropy_kv.eval.ruler.by_reference import by_place_tables, hits_by_place
    from vllm_entropy_kv.eval.ruler.tasks import make_sample

    def row(task: str, index: int, arm: str, answer: str) -> dict:
        return {"task": task, "length": 1500, "index": index, "seed": 0, "arm": arm,
                "ratio": 1.0 if arm == "none" else 0.25, "answer": answer}

    refs = [make_sample("niah_multiquery", 1500, i, 0, words).references for i in range(2)]
    assert all(len(r) == 4 for r in refs)
    rows = [row("niah_multiquery", i, "none", " ".join(refs[i]).upper()) for i in range(2)]
    rows += [row("niah_multiquery", i, "entropy", f"{refs[i][2]}, {refs[i][3]}") for i in range(2)]
    rows += [row("niah_single", 0, "none", "")]
    hits = hits_by_place(rows, words)
    assert list(hits) == [("niah_multiquery", 1500)]
    cells = hits[("niah_multiquery", 1500)]
    assert cells[("none", 1.0)] == [[True] * 4] * 2
    assert cells[("entropy", 0.25)] == [[False, False, True, True]] * 2
    lines = by_place_tables(rows, words)
    assert lines[0].startswith("niah_multiquery 1.46484k, values found by the place")
    table = [line for line in "\n".join(lines).splitlines() if line.startswith("|")]
    assert table[0] == "| policy | ratio | samples | key 1 | key 2 | key 3 | key 4 |"
    assert table[2:] == ["| none | 1 | 2 | 100% | 100% | 100% | 100% |",
                         "| entropy | 0.25 | 2 | 0% | 0% | 100% | 100% |"]


def test_the_default_arms_include_what_the_server_plans_with() -> None:
    """The served setting's row is named by the fields where the server's defaults differ
    from the policy class's (the name its rows in docs/img/ruler.json carry), and plans with
    the server's policy object."""
    from vllm_entropy_kv.config import KVPolicyConfig
    from vllm_entropy_kv.eval.ruler.arms import DEFAULT_ARMS, arm, served_arm_name

    name = served_arm_name()
    assert name == "entropy:exponent=0:observation_queries=32:query_reduce=max"
    assert name in DEFAULT_ARMS
    assert arm(name).build() == KVPolicyConfig(policy="entropy").make_policy()
