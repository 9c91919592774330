"""A model folder's chat template, rendered with jinja2 alone (no transformers, no torch).

The sglang backend renders each intern prompt client side. All it needs from the model is the
chat template and the special tokens the template reads, which are plain files in the model
folder. `load_chat_template` finds them where transformers does:

- the template: `chat_template.jinja` (with `additional_chat_templates/*.jinja` as named
  ones), else `tokenizer_config.json`'s `chat_template` (a string, or a list of
  `{"name", "template"}`), else the processor's legacy `chat_template.json`; of several named
  templates, "default" is used;
- the special tokens (`bos_token`, `eos_token`, ...): `tokenizer_config.json`, where each is a
  string or an AddedToken dict with "content"; a legacy `special_tokens_map.json` overrides
  them when the config has no `added_tokens_decoder` (as transformers 5 does).

`ChatTemplate.apply_chat_template` renders as transformers' `render_jinja_template` does (a
sandboxed environment with trim_blocks and lstrip_blocks, loop controls, `{% generation %}`,
`raise_exception`, `strftime_now`, a `tojson` filter that does not escape HTML, `namespace`
and `dict` that refuse underscore names), so its text is byte-identical to
`tokenizer.apply_chat_template(messages, tokenize=False, ...)`;
tests/integration/test_template_source.py checks that against transformers itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from mics.errors import ConfigError, FatalError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(FatalError, ConfigError):
    """The model folder has no usable chat template: no intern prompt can be rendered, so a
    run stops (a FatalError); raised before any call, it is a ConfigError too."""


class ChatTemplate:
    """A chat template with the special tokens it may read; renders like transformers."""

    def __init__(self, chat_template: str, special_tokens: Mapping[str, str],
                 source: str = "") -> None:
        self.chat_template = chat_template
        self.special_tokens_map = dict(special_tokens)
        self.source = source

    def apply_chat_template(self, conversation: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None,
                            documents: list[dict[str, Any]] | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation as text, as `PreTrainedTokenizer.apply_chat_template` renders it
        with `tokenize=False` (other kwargs reach the template and override special tokens)."""
        if tokenize:
            raise ValueError("ChatTemplate renders text only: call it with tokenize=False")
        if unsupported := sorted(set(kwargs) & _TOKENIZER_ONLY):
            raise ValueError(f"ChatTemplate does not support {', '.join(unsupported)}")
        if not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = [_template_message(m) for m in conversation]
        return compile_jinja(self.chat_template).render(
            messages=chat, tools=_plain(tools), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs})


_TOKENIZER_ONLY = frozenset({"chat_template", "continue_final_message", "return_dict",
                             "return_assistant_tokens_mask", "sanitize_control_tokens",
                             "tokenizer_kwargs", "padding", "truncation", "max_length",
                             "return_tensors"})


def _template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh copy without None values, reasoning under its aliases (transformers' own
    normalisation of a message before rendering)."""
    if not isinstance(message, Mapping):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    out = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if out.get(k) is not None), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


@lru_cache(maxsize=16)
def compile_jinja(chat_template: str) -> Any:
    """The template compiled in the environment transformers uses for chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (mask tracking is
        transformers' business and never changes the text)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(chat_template)


class _TemplateDict:
    """`dict(...)` in a template, without attribute access to the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


# ---- finding the files ----------------------------------------------------------------------


def model_folder(path: str) -> Path | None:
    """`path` as a local folder: itself, or a hub id's newest snapshot in the local HF cache
    (`HF_HUB_CACHE`, `HF_HOME/hub`, ~/.cache/huggingface/hub); None if neither exists.
    Nothing is downloaded."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return None
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                    "huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))
    repo = cache / ("models--" + path.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshot := repo / "snapshots" / ref.read_text().strip()).is_dir():
        return snapshot
    return None


def _read_json(file: Path, model: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ChatTemplateError(f"{model}: cannot read {file} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{model}: {file} is not a JSON object")
    return data


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _templates(folder: Path, config: dict[str, Any], model: str
               ) -> tuple[str | dict[str, str] | None, str]:
    """The folder's template(s) as transformers' tokenizer reads them, and where from."""
    named: dict[str, str] = {}
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        named["default"] = jinja_file.read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            named[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if named:
        return named, str(jinja_file if "default" in named else extra)
    value = config.get("chat_template")
    if isinstance(value, list):
        try:
            return {t["name"]: t["template"] for t in value}, str(folder / "tokenizer_config.json")
        except (TypeError, KeyError):
            raise ChatTemplateError(f"{model}: {folder / 'tokenizer_config.json'}: chat_template "
                                    "must be a string or a list of {name, template}") from None
    if isinstance(value, str):
        return value, str(folder / "tokenizer_config.json")
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        value = _read_json(legacy, model).get("chat_template")
        if isinstance(value, str):
            return value, str(legacy)
    return None, ""


def load_chat_template(path: str, model: str) -> ChatTemplate:
    """The chat template and special tokens of the model folder `path` (or a hub id already in
    the local HF cache). A ChatTemplateError names `model` and the folder if there is none."""
    folder = model_folder(path)
    if folder is None:
        raise ChatTemplateError(
            f"{model}: {path!r} is not a local model folder (nor a model in the local Hugging "
            "Face cache); the sglang backend reads the chat template from the model folder's "
            "chat_template.jinja or tokenizer_config.json: set options.tokenizer to a local copy")
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file, model) if config_file.is_file() else {}
    template, source = _templates(folder, config, model)
    if isinstance(template, dict):
        if "default" not in template:
            raise ChatTemplateError(f"{model}: {folder} has several chat templates and none named "
                                    f"'default' ({', '.join(sorted(template))})")
        template = template["default"]
    if not template:
        raise ChatTemplateError(
            f"{model}: no chat template in {folder} (looked for chat_template.jinja, "
            "tokenizer_config.json's chat_template and chat_template.json)")
    tokens = {k: t for k in SPECIAL_TOKENS if (t := _token(config.get(k))) is not None}
    legacy_map = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy_map.is_file():
        for key, value in _read_json(legacy_map, model).items():
            if key in SPECIAL_TOKENS and (t := _token(value)) is not None:
                tokens[key] = t
    return ChatTemplate(template, tokens, source)

