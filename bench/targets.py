"""Strict modes of the loopback server: what each real target accepts, refuses and reports.

A served model may name a `target` (and, for SGLang, a `version`); without one the loopback
server stays lenient. Each rule cites where the real behaviour was read (docs/endpoints.md has
the table): SGLang 0.5.x `http_server.py`, `io_struct.py`, `sampling_params.py` and the
multimodal processors; sglang-router `protocols/generate.rs`; the OpenAI API reference; Gemini's
OpenAI-compatible endpoint; DashScope compatible mode; DeepSeek's API.
"""

from __future__ import annotations

import math
import re
from typing import Any

TARGETS = ("", "sglang", "router", "openai", "openai-reasoning", "gemini", "dashscope",
           "deepseek")
SGLANG_TARGETS = ("sglang", "router")
DEFAULT_SGLANG_VERSION = "0.5.23"
LENIENT_VERSION = "0.5.23"  # what a lenient loopback reports in /server_info


class Refusal(Exception):
    """The real server would refuse this request: HTTP status and JSON (or text) body."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(str(body))
        self.status = status
        self.body = body


def version_tuple(text: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"an SGLang version looks like 0.5.6, got {text!r}")
    return int(m[1]), int(m[2]), int(m[3])


def check_target(target: str, version: str, family: str) -> None:
    """Validate a served model's strict-mode settings."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, "
                         f"got {target!r}")
    if version:
        version_tuple(version)
    if family not in ("", "qwen2-vl", "internvl"):
        raise ValueError(f"family must be qwen2-vl or internvl, got {family!r}")


# ---------------------------------------------------------------- SGLang and the router


def info_routes(target: str, version: str) -> dict[str, str]:
    """GET route -> "model" | "server" for what this target serves.

    SGLang: `/get_model_info`, `/get_server_info` only up to 0.5.5; `/model_info` and
    `/server_info` from 0.5.6 (the `/get_*` names kept as deprecated aliases). The router serves
    `/get_model_info` and `/get_server_info`."""
    old = {"/get_model_info": "model", "/get_server_info": "server"}
    if target == "router" or (target == "sglang" and version_tuple(version) < (0, 5, 6)):
        return old
    return {**old, "/model_info": "model", "/server_info": "server"}


def model_info(target: str, version: str, name: str, model_path: str) -> dict[str, Any]:
    """`model_path` is the launch path as typed; `served_model_name` is missing in 0.5.2 and
    0.5.9 (and always present in lenient mode)."""
    path = model_path or name
    info: dict[str, Any] = {
        "model_path": path, "tokenizer_path": path, "is_generation": True,
        "has_image_understanding": True, "model_type": "simulator",
        "architectures": ["SimulatorForCausalLM"], "weight_version": "default",
        "preferred_sampling_params": None,
    }
    if not target or version_tuple(version) not in ((0, 5, 2), (0, 5, 9)):
        info["served_model_name"] = name if not target else path
    return info


def server_info(version: str) -> dict[str, Any]:
    return {"version": version, "schedule_policy": "fcfs", "disable_radix_cache": False,
            "enable_deterministic_inference": True, "internal_states": []}


def check_generate(target: str, version: str, body: dict[str, Any]) -> None:
    """Router: `text` is one string and `sampling_params` one struct (serde rejects a list,
    axum answers 422). SGLang before 0.5.3 has no `sampling_seed`."""
    if target == "router":
        for key, expected in (("text", "a string"), ("sampling_params", "struct SamplingParams")):
            if isinstance(body.get(key), list):
                raise Refusal(422, f"Failed to deserialize the JSON body into the target type: "
                                   f"{key}: invalid type: sequence, expected {expected}")
    if target in SGLANG_TARGETS and version_tuple(version) < (0, 5, 3):
        sps = body.get("sampling_params")
        for sp in sps if isinstance(sps, list) else [sps]:
            if isinstance(sp, dict) and "sampling_seed" in sp:
                raise Refusal(400, {"error": {"message": "SamplingParams.__init__() got an "
                                              "unexpected keyword argument 'sampling_seed'"}})


_QWEN_IMAGE = re.compile(r"<\|vision_start\|><\|image_pad\|><\|vision_end\|>|<image>")


def image_placeholders(family: str, version: str, text: str) -> int:
    """How many images the real multimodal processor finds in `text`: Qwen2/2.5-VL matches the
    vision triple or `<image>`; InternVL matches only `<IMG_CONTEXT>` before 0.5.7 and `<image>`
    from 0.5.7 (non-InternLM2 backbones)."""
    if family == "internvl":
        token = "<image>" if version_tuple(version) >= (0, 5, 7) else "<IMG_CONTEXT>"
        return text.count(token)
    return len(_QWEN_IMAGE.findall(text))


def check_images(family: str, version: str, text: str, images: list[str]) -> None:
    """With the wrong placeholder no image is loaded, and the server fails with a 500."""
    if not family or not images:
        return
    found = image_placeholders(family, version, text)
    if found != len(images):
        raise Refusal(500, {"error": {"message": f"{family} processor: found {found} image "
                                                 f"token(s) in the prompt for {len(images)} "
                                                 "image(s); no image features were loaded"}})


# ---------------------------------------------------------------- OpenAI-compatible targets

OPENAI_FIELDS = frozenset({
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
    "seed", "n", "stream", "stream_options", "presence_penalty", "frequency_penalty",
    "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "user",
    "reasoning_effort", "metadata", "store", "service_tier", "parallel_tool_calls",
    "prediction", "modalities", "audio", "verbosity",
})
# Gemini's OpenAI-compatible endpoint maps reasoning_effort to a thinking budget; 2.5 Pro
# cannot turn thinking off, and with nothing set it thinks dynamically.
GEMINI_BUDGET = {"": 4096, "low": 1024, "medium": 8192, "high": 24576}


def _invalid(message: str, param: str, code: str) -> Refusal:
    return Refusal(400, {"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": code}})


def check_chat(target: str, body: dict[str, Any]) -> None:
    """OpenAI refuses fields it does not know (`top_k`); o-series and gpt-5 refuse `max_tokens`
    and any non-default `temperature`/`top_p`; Gemini 2.5 Pro refuses to stop thinking."""
    if target in ("openai", "openai-reasoning"):
        for key in sorted(set(body) - OPENAI_FIELDS):
            raise _invalid(f"Unrecognized request argument supplied: {key}", key,
                           "unrecognized_argument")
    if target == "openai-reasoning":
        if "max_tokens" in body:
            raise _invalid("Unsupported parameter: 'max_tokens' is not supported with this "
                           "model. Use 'max_completion_tokens' instead.", "max_tokens",
                           "unsupported_parameter")
        for key in ("temperature", "top_p"):
            if key in body and body[key] != 1:
                raise _invalid(f"Unsupported value: '{key}' does not support {body[key]} with "
                               "this model. Only the default (1) value is supported.", key,
                               "unsupported_value")
    if target == "gemini":
        effort = body.get("reasoning_effort", "")
        if effort == "none":
            raise Refusal(400, [{"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                           "message": "Budget 0 is invalid. This model only "
                                                      "works in thinking mode."}}])
        if effort not in GEMINI_BUDGET:
            raise Refusal(400, [{"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                           "message": f"Invalid reasoning_effort {effort!r}"}}])


def thinking_tokens(target: str, body: dict[str, Any]) -> int:
    """Tokens a thinking model spends before its answer, counted against the output limit."""
    if target != "gemini":
        return 0
    return GEMINI_BUDGET[body.get("reasoning_effort", "")]


def usage(target: str, prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """DeepSeek reports cache hits as `prompt_cache_hit_tokens`/`prompt_cache_miss_tokens`;
    the others as `prompt_tokens_details.cached_tokens`."""
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if target == "deepseek":
        out.update(prompt_cache_hit_tokens=cached, prompt_cache_miss_tokens=prompt - cached)
    else:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


# ---------------------------------------------------------------- rate limits and quota


def rate_limited(target: str, retry_after_s: float) -> tuple[int, Any, dict[str, str]]:
    """A 429 as each target sends it: OpenAI with `retry-after-ms`, a whole-second
    `retry-after` and `x-ratelimit-reset-requests`; Gemini with no header and a JSON array
    body whose RetryInfo carries `retryDelay`; the rest with a plain Retry-After."""
    message = "rate limit exceeded (injected)"
    if target == "gemini":
        return 429, [{"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED",
                                "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                             "retryDelay": f"{retry_after_s:g}s"}]}}], {}
    if target in ("openai", "openai-reasoning"):
        return 429, {"error": {"message": message, "type": "requests",
                               "code": "rate_limit_exceeded"}}, {
            "retry-after-ms": f"{retry_after_s * 1000:g}",
            "retry-after": str(max(1, math.ceil(retry_after_s))),
            "x-ratelimit-reset-requests": f"{retry_after_s:g}s"}
    return 429, {"error": {"message": message}}, {"Retry-After": f"{retry_after_s:g}"}


def out_of_quota(target: str) -> tuple[int, Any]:
    """Quota or balance exhausted: retrying never helps."""
    if target == "deepseek":
        return 402, {"error": {"message": "Insufficient Balance", "type": "unknown_error",
                               "param": None, "code": "invalid_request_error"}}
    if target == "dashscope":
        return 429, {"error": {"message": "Allocated quota exceeded, please increase your "
                                          "quota limit.", "type": "Throttling.AllocationQuota",
                               "param": None, "code": "Throttling.AllocationQuota"}}
    return 429, {"error": {"message": "You exceeded your current quota, please check your "
                                      "plan and billing details.", "type": "insufficient_quota",
                           "param": None, "code": "insufficient_quota"}}
