"""The strictness rule: accept what asks for nothing we cannot do; 400 naming the rest.

One table per family (OpenAI's parameters, vLLM's extensions), so that what we refuse,
and why, reads in one place. A value equal to the parameter's default (or to what we do
anyway) is accepted.
"""

from __future__ import annotations

from typing import Any

from flexserve.api.wire import ChatCompletionRequest, CompletionRequest, VllmExtensions
from flexserve.errors import UnsupportedValue

Check = tuple[str, bool, str]
"""(param, True if the request asks for what we cannot do, the message)."""

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def reject_unsupported(wire: ChatCompletionRequest) -> None:
    for param, failed, message in [*_openai_checks(wire), *_vllm_checks(wire)]:
        if failed:
            raise UnsupportedValue(message, param=param)


def reject_unsupported_completion(wire: CompletionRequest) -> None:
    """The completions API: `echo` is honoured; logprobs, suffix and several choices
    are not (a 400 naming them)."""
    checks: list[Check] = [
        ("n", wire.n not in (None, 1), "Only n=1 is supported."),
        ("logprobs", wire.logprobs is not None, "logprobs are not supported; send null."),
        ("suffix", bool(wire.suffix), "suffix (insertion) is not supported."),
        ("logit_bias", bool(wire.logit_bias), "logit_bias is not supported."),
    ]
    checks += [c for c in _vllm_checks(wire) if c[0] not in _COMPLETION_OWN]
    for param, failed, message in checks:
        if failed:
            raise UnsupportedValue(message, param=param)


_COMPLETION_OWN = frozenset({"echo", "add_generation_prompt", "add_special_tokens"})
"""vLLM's chat checks that mean something else for a raw prompt (echo is honoured; there
is no template; the model's BOS is added as its own server does)."""


def _openai_checks(wire: ChatCompletionRequest) -> list[Check]:
    return [
        ("n", wire.n not in (None, 1), "Only n=1 is supported."),
        ("logprobs", bool(wire.logprobs), "logprobs are not supported."),
        ("top_logprobs", bool(wire.top_logprobs), "top_logprobs are not supported."),
        ("logit_bias", bool(wire.logit_bias), "logit_bias is not supported."),
        ("tools", bool(wire.tools), "This model does not support tools."),
        ("tool_choice", _asks_for_tool(wire.tool_choice), "This model does not support tools."),
        ("response_format", _asks_for_format(wire.response_format), "Only text output."),
        ("modalities", _asks_for_modalities(wire.modalities), "Only text output."),
        ("reasoning_effort", wire.reasoning_effort is not None, "Not a reasoning model."),
    ]


def _vllm_checks(wire: VllmExtensions) -> list[Check]:
    """vLLM's extensions we do not implement. top_k, repetition_penalty, min_tokens,
    ignore_eos and truncate_prompt_tokens are honoured; length_penalty (beam search
    only), spaces_between_special_tokens (special tokens are skipped) and the guided
    decoding modifiers ask for nothing here."""
    checks: list[Check] = [
        ("min_p", bool(wire.min_p), "min_p sampling is not supported; send 0 or omit it."),
        ("use_beam_search", bool(wire.use_beam_search), "Beam search is not supported."),
        ("best_of", wire.best_of not in (None, 1), "Only best_of=1 is supported."),
        ("stop_token_ids", bool(wire.stop_token_ids), "Use stop strings; ids are not supported."),
        (
            "skip_special_tokens",
            wire.skip_special_tokens is False,
            "Special tokens are always left out of the output.",
        ),
        (
            "include_stop_str_in_output",
            bool(wire.include_stop_str_in_output),
            "The matched stop string is never part of the output.",
        ),
        ("prompt_logprobs", wire.prompt_logprobs is not None, "prompt_logprobs are not supported."),
        ("echo", bool(wire.echo), "echo is not supported."),
        (
            "add_generation_prompt",
            wire.add_generation_prompt is False,
            "The generation prompt is always added.",
        ),
        (
            "continue_final_message",
            bool(wire.continue_final_message),
            "Continuing a final assistant message is not supported.",
        ),
        (
            "add_special_tokens",
            bool(wire.add_special_tokens),
            "The chat template adds the special tokens; add_special_tokens must be false.",
        ),
        (
            "truncate_prompt_tokens",
            wire.truncate_prompt_tokens == 0,
            "truncate_prompt_tokens must be -1 (the context) or at least 1.",
        ),
    ]
    checks += [
        (name, getattr(wire, name) is not None, "Guided decoding is not supported.")
        for name in GUIDED
    ]
    return checks


def _asks_for_tool(choice: Any) -> bool:
    return choice not in (None, "none", "auto")


def _asks_for_format(response_format: dict[str, Any] | None) -> bool:
    return response_format is not None and response_format.get("type") != "text"


def _asks_for_modalities(modalities: list[str] | None) -> bool:
    return modalities is not None and modalities != ["text"]
