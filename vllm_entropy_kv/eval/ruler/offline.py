"""Run the suite offline: one prefill per sample, every arm and ratio on the captured cache.

The whole prompt but its last token is prefilled and compressed, the way the server compresses
a request at the end of its prefill (the question is in the observation window); the last
prompt token then runs over the compressed cache and the answer is decoded greedily.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from vllm_entropy_kv.eval.cache import apply_plans
from vllm_entropy_kv.eval.capture import prefill
from vllm_entropy_kv.eval.decode import greedy_answers
from vllm_entropy_kv.eval.model import Model
from vllm_entropy_kv.eval.plans import PlanResult, make_plans, widest_window
from vllm_entropy_kv.eval.progress import Progress
from vllm_entropy_kv.eval.results import Row
from vllm_entropy_kv.eval.ruler.arms import REFERENCE, Arm
from vllm_entropy_kv.eval.ruler.sample import Sample
from vllm_entropy_kv.eval.ruler.tasks import make_sample


def prompt_text(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> str:
    """The chat prompt: the user message, the assistant header, then RULER's answer prefix."""
    messages = [{"role": "user", "content": sample.message}]
    header = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return header + sample.answer_prefix


def prompt_ids(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> list[int]:
    """The prompt's token ids, as the harness prefills them and the server is sent them."""
    return tokenizer(prompt_text(tokenizer, sample), add_special_tokens=False).input_ids


def prompt_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[Sample], int]:
    return lambda sample: len(prompt_ids(tokenizer, sample))


def grid(
    arms: Sequence[Arm], ratios: Sequence[float]
) -> list[tuple[Arm, float]]:
    """(arm, ratio) pairs: the full cache once at 1.0, every other arm at each ratio."""
    return [
        pair
        for a in arms
        for pair in ([(a, 1.0)] if a.policy == REFERENCE else [(a, r) for r in ratios])
    ]


def run_sample(model: Model, sample: Sample, pairs: Sequence[tuple[Arm, float]]) -> list[Row]:
    """Every (arm, ratio) of `pairs` on one prefill of `sample`: one row each, all decoded
    together (`decode.greedy_answers`)."""
    ids = torch.tensor([prompt_ids(model.tokenizer, sample)])
    context, last = ids[:, :-1], ids[:, -1:]
    built = {a.plan_key: a.build() for a, _ in pairs}
    window = widest_window(list(built.values()))
    layers = prefill(model, context, window).observations(None)
    plans: dict[tuple, PlanResult] = {}
    applied, states = [], []
    for a, ratio in pairs:
        key = (a.plan_key, ratio)
        if key not in plans:
            plans[key] = make_plans(built[a.plan_key], layers, ratio, budget=a.budget(ratio))
        applied.append(a.applied(plans[key].plans))
        states.append(apply_plans(layers, applied[-1], context.shape[1]))
    answers = greedy_answers(
        model, states, [a.use_bias for a, _ in pairs], last, sample.max_new_tokens,
        [lambda text: sample.score(text) == 1.0] * len(pairs),
    )
    return [
        {
            "task": sample.task,
            "tokens": ids.shape[1],
            "arm": a.label,
            "policy": a.policy,
            "ratio": ratio,
            "kept": sum(p.num_physical for p in kept) / (len(kept) * context.shape[1]),
            "score": sample.score(answer),
            "answer": answer,
            "plan_seconds": plans[(a.plan_key, ratio)].seconds,
        }
        for (a, ratio), kept, answer in zip(pairs, applied, answers, strict=True)
    ]


def run_suite(
    model: Model,
    tasks: Sequence[str],
    lengths: Sequence[int],
    indices: Iterable[int],
    arms: Sequence[Arm],
    ratios: Sequence[float],
    seed: int,
    done: set[tuple[str, int, int, str, float]],
    checkpoint: Callable[[list[Row]], None],
) -> None:
    """Every (sample, arm, ratio) not in `done` ((task, length, index, arm, ratio)), so a run
    resumes where it stopped and an arm added later runs alone; `checkpoint` gets each
    sample's rows as soon as they exist."""
    pairs = grid(arms, ratios)
    todo = []
    for length in lengths:
        for index in indices:
            for task in tasks:
                missing = [(a, r) for a, r in pairs if (task, length, index, a.label, r) not in done]
                if missing:
                    todo.append((task, length, index, missing))
    progress = Progress("ruler", len(todo))
    count = prompt_counter(model.tokenizer)
    for task, length, index, missing in todo:
        sample = make_sample(task, length, index, seed, count)
        with torch.inference_mode():
            rows = run_sample(model, sample, missing)
        for row in rows:
            row.update(length=length, index=index, seed=seed)
        checkpoint(rows)
        progress.step(f"{task} {length} #{index}: mean score of {len(rows)} arm x ratio "
                      f"{sum(r['score'] for r in rows) / len(rows):.2f}")
