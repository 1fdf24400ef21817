"""Needle in a haystack on the Paul Graham essays (the standard test's haystack).

A needle sentence is put at a relative depth into a haystack of a given token length. The
prompt is the model's chat template with the haystack as the start of the user message; the
haystack part is prefilled and compressed (query-agnostic, as kvpress measures it), then the
question and the assistant header are appended uncompressed and the answer is decoded greedily.
A hit is the key phrase in the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_entropy_kv.eval.cache import apply_plans
from vllm_entropy_kv.eval.capture import prefill
from vllm_entropy_kv.eval.decode import greedy_answers
from vllm_entropy_kv.eval.model import Model
from vllm_entropy_kv.eval.plans import Match, Planner, Variant, build_policies, cases, widest_window
from vllm_entropy_kv.eval.progress import Progress
from vllm_entropy_kv.eval.results import Row
from vllm_entropy_kv.eval.texts import essays_text

NEEDLE = (
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
    "on a sunny day."
)
QUESTION = "What is the best thing to do in San Francisco?"
KEY_PHRASE = "dolores park"


@dataclass
class NeedlePrompt:
    """Token ids of the compressed part (template start + haystack with the needle) and of the
    uncompressed part (question, end of turn, assistant header)."""

    context: torch.Tensor
    question: torch.Tensor
    length: int
    depth: float


def insert_needle(haystack: str, needle: str, depth: float) -> str:
    """Put `needle` at relative `depth` of `haystack`, moved back to a sentence start."""
    at = int(len(haystack) * min(max(depth, 0.0), 1.0))
    if at < len(haystack):
        stop = haystack.rfind(". ", 0, at)
        at = 0 if stop < 0 else stop + 2
    return (
        f"{haystack[:at]}{needle} {haystack[at:]}" if at < len(haystack) else f"{haystack} {needle}"
    )


def build_prompt(
    model: Model, haystack: str, length: int, depth: float, query_aware: bool = False
) -> NeedlePrompt:
    """A chat prompt whose compressed part is about `length` tokens long. Query-agnostic (the
    default): the compressed part ends with the haystack. Query-aware: it also holds the
    question and the end of the user turn, so the observation window sees the question."""
    tok = model.tokenizer
    marker = "\u0000HAYSTACK\u0000"

    def render(content: str) -> str:
        messages = [{"role": "user", "content": f"{content}\n\n{QUESTION}"}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    template_start = render(marker).split(marker)[0]
    room = length - model.encode(template_start).shape[1] - model.encode(NEEDLE).shape[1] - 1
    hay = tok.decode(model.encode(haystack)[0, : max(0, room)])
    content = insert_needle(hay, NEEDLE, depth)
    rendered = render(content)
    cut = rendered.index(content) + len(content)
    if query_aware:
        cut = rendered.index(QUESTION, cut) + len(QUESTION)
        cut = rendered.index("\n", cut) if "\n" in rendered[cut:] else cut
    return NeedlePrompt(
        context=model.encode(rendered[:cut]),
        question=model.encode(rendered[cut:]),
        length=length,
        depth=depth,
    )


def has_key_phrase(answer: str) -> bool:
    return KEY_PHRASE in answer.lower()


def run_needle(
    model: Model,
    variants: Sequence[Variant],
    ratios: Sequence[float],
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    max_new_tokens: int = 20,
    match: Match = "real",
    query_aware: bool = False,
) -> list[Row]:
    """One row of task "needle" per (length, depth, variant, ratio); `mode` says whether the
    question was inside the compressed prompt ("aware") or appended after it ("agnostic")."""
    policies = build_policies(variants)
    window = widest_window(list(policies.values()))
    haystack = essays_text()
    todo = cases(variants, ratios)
    mode = "aware" if query_aware else "agnostic"
    progress = Progress(f"needle ({mode})", len(lengths) * len(depths) * len(todo))
    rows: list[Row] = []
    for length in lengths:
        for depth in depths:
            prompt = build_prompt(model, haystack, length, depth, query_aware)
            n = prompt.context.shape[1]
            pf = prefill(model, prompt.context, window)
            layers = pf.observations(None)
            planner = Planner(policies, layers, match)
            for variant, ratio in todo:
                result = planner(variant.policy, ratio)
                kv = apply_plans(layers, result.plans, n)
                answer = greedy_answers(
                    model, [kv], [variant.use_bias], prompt.question, max_new_tokens,
                    [has_key_phrase],
                )[0]
                hit = has_key_phrase(answer)
                rows.append(
                    {
                        "task": "needle",
                        "mode": mode,
                        "length": n,
                        "target_length": length,
                        "depth": depth,
                        "variant": variant.label,
                        "policy": variant.policy,
                        "bias": variant.use_bias,
                        "ratio": ratio,
                        "hit": hit,
                        "answer": answer,
                        "kept": result.kept_fraction,
                    }
                )
                progress.step(
                    f"len {n} depth {depth:g} {variant.label} @{ratio:g}: "
                    f"{'HIT' if hit else 'miss'} {answer[:60]!r}"
                )
    return rows
