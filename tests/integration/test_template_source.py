"""The sglang backend's chat template without transformers: read from the model folder and
rendered with jinja2 alone, byte-identical to transformers' `apply_chat_template`; a search
with SGLang interns never imports torch or transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ROOT, Imports, command_imports
from test_chat_templates import (
    INTERNVL,
    QWEN2_TEXT,
    QWEN2_VL,
    SKIPS_EMPTY_SYSTEM,
    TRIMMING,
    _prompts,
)

from backends.chat_templates import compile_template, render_prompt
from backends.messages import family_messages
from backends.template_source import ChatTemplate, ChatTemplateError, load_chat_template
from mics.errors import ConfigError, FatalError
from mics.types import Prompt, Text

FAMILIES = ("qwen2-vl", "internvl", "text")

# Everything transformers' template environment offers that the known templates do not use.
FEATURES = (
    "{%- set ns = namespace(n=0) -%}{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|"
    "{{ tools is none }}{{ documents is none }}|{{ dict(a=1) | tojson }}"
    "{% for message in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if message['content'] is string and message['content'] == '' %}{% continue %}{% endif %}"
    "<{{ message['role'] }}:{{ message['content'] | tojson }}>"
    "{% generation %}{{ message['content'] | tojson(indent=2) }}{% endgeneration %}"
    "{% if ns.n > 5 %}{% break %}{% endif %}{% endfor %}"
    "{{ strftime_now('') }}{% if add_generation_prompt %}[go]{% endif %}"
    "{% if messages | length == 0 %}{{ raise_exception('empty') }}{% endif %}"
)
# Written on several lines with indented, undashed blocks: trim_blocks and lstrip_blocks matter.
MULTILINE = """{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] }}<</SYS>>
    {% else %}
[{{ message['role'] | upper }}] {% if message['content'] is string %}{{ message['content'] }}
{% else %}{{ message['content'] | map(attribute='type') | join(',') }}
{% endif %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}"""
TEMPLATES = {"multiline": MULTILINE, "bench": None, "qwen2-vl": QWEN2_VL,
             "qwen2-text": QWEN2_TEXT, "internvl": INTERNVL, "trimming": TRIMMING,
             "skips-empty": SKIPS_EMPTY_SYSTEM, "features": FEATURES}


def _auto_tokenizer(folder: Path):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _outcome(render, chat: list, gen: bool) -> tuple[str, str]:  # noqa: ANN001
    """The rendered text, or the type of error rendering raised (a text template given
    content lists fails alike in both)."""
    try:
        return "text", render(chat, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # noqa: BLE001 - compared, not swallowed
        return "error", type(e).__name__


def _assert_same(ours: ChatTemplate, theirs, seed: int = 0) -> None:  # noqa: ANN001
    rendered = 0
    for family in FAMILIES:
        for prompt in _prompts(60, seed=seed):
            chat = family_messages(prompt, family)
            for gen in (True, False):
                mine = _outcome(ours.apply_chat_template, chat, gen)
                assert mine == _outcome(theirs.apply_chat_template, chat, gen), (family, prompt)
                rendered += mine[0] == "text"
    assert rendered >= 120  # at least the string-content families rendered


def _folder_with(tmp_path: Path, base: Path, name: str, template: str, how: str) -> Path:
    """A copy of the tokenizer folder `base` whose chat template is stored as `how`."""
    out = tmp_path / f"{name}-{how}"
    shutil.copytree(base, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if how == "jinja":
        (out / "chat_template.jinja").write_text(template)
    elif how == "config":
        config["chat_template"] = template
    elif how == "named":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                   {"name": "default", "template": template}]
    elif how == "extra-files":
        (out / "chat_template.jinja").write_text(template)
        (out / "additional_chat_templates").mkdir()
        (out / "additional_chat_templates" / "rag.jinja").write_text("{{ 'rag' }}")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("how", ["jinja", "config", "named", "extra-files"])
def test_rendering_equals_transformers_for_every_template_and_file_layout(
        tmp_path: Path, tokenizer_dir: Path, name: str, how: str) -> None:
    from bench.models import CHAT_TEMPLATE

    folder = _folder_with(tmp_path, tokenizer_dir, name, TEMPLATES[name] or CHAT_TEMPLATE, how)
    ours, theirs = load_chat_template(str(folder), "i0"), _auto_tokenizer(folder)
    assert ours.chat_template == (TEMPLATES[name] or CHAT_TEMPLATE)
    _assert_same(ours, theirs, seed=len(name))


def test_special_tokens_as_added_token_dicts(tmp_path: Path, tokenizer_dir: Path) -> None:
    folder = _folder_with(tmp_path, tokenizer_dir, "internvl", FEATURES, "jinja")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    config["bos_token"] = {"__type": "AddedToken", "content": "<|im_start|>", **flags}
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", **flags}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_chat_template(str(folder), "i0")
    assert ours.special_tokens_map["bos_token"] == "<|im_start|>"
    _assert_same(ours, _auto_tokenizer(folder))
    text = ours.apply_chat_template([{"role": "user", "content": "x"}])
    assert text.startswith("<|im_start|>|<|im_end|>|<|endoftext|>|TrueTrue|")


def test_the_tiny_models_of_the_suite_render_alike(tiny_lm: Path, tiny_vl: Path) -> None:
    """The tiny Qwen2 and Qwen2-VL folders, against their tokenizers and against the Qwen2-VL
    processor the local backend builds (processors render content lists with images)."""
    from transformers import AutoImageProcessor

    from backends.local_loading import image_only_processor_class

    _assert_same(load_chat_template(str(tiny_lm), "lm"), _auto_tokenizer(tiny_lm), seed=1)
    vl, tok = load_chat_template(str(tiny_vl), "vl"), _auto_tokenizer(tiny_vl)
    _assert_same(vl, tok, seed=2)
    processor = image_only_processor_class()(AutoImageProcessor.from_pretrained(tiny_vl), tok,
                                              chat_template=tok.chat_template)
    _assert_same(vl, processor, seed=3)


def test_processor_legacy_chat_template_json(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A processor folder whose template is only in chat_template.json (older saves)."""
    folder = _folder_with(tmp_path, tokenizer_dir, "qwen2-vl", QWEN2_VL, "none")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL}))
    ours = load_chat_template(str(folder), "i0")
    assert ours.chat_template == QWEN2_VL
    theirs = _auto_tokenizer(tokenizer_dir)
    theirs.chat_template = QWEN2_VL
    _assert_same(ours, theirs, seed=5)


@pytest.mark.parametrize("family,name", [
    ("qwen2-vl", "bench"), ("text", "bench"), ("internvl", "bench"), ("qwen2-vl", "qwen2-vl"),
    ("text", "qwen2-text"), ("text", "qwen2-vl"), ("internvl", "internvl"),
    ("internvl", "qwen2-text"),
])
def test_compiled_fast_path_works_on_the_jinja2_template(tmp_path: Path, tokenizer_dir: Path,
                                                         family: str, name: str) -> None:
    """The pairs test_chat_templates.py compiles, now from the jinja2-only template."""
    from bench.models import CHAT_TEMPLATE

    folder = _folder_with(tmp_path, tokenizer_dir, name, TEMPLATES[name] or CHAT_TEMPLATE,
                          "jinja")
    ours, theirs = load_chat_template(str(folder), "i0"), _auto_tokenizer(folder)
    assert compile_template(ours, family) is not None
    for prompt in _prompts(80, seed=11):
        assert render_prompt(ours, family, prompt) == theirs.apply_chat_template(
            family_messages(prompt, family), tokenize=False, add_generation_prompt=True)


def test_content_dependent_template_still_falls_back(tmp_path: Path, tokenizer_dir: Path) -> None:
    folder = _folder_with(tmp_path, tokenizer_dir, "trim", TRIMMING, "jinja")
    ours = load_chat_template(str(folder), "i0")
    assert compile_template(ours, "text") is None
    assert render_prompt(ours, "text", Prompt("s", (Text(" a "),))) is None


def test_a_folder_without_a_template_is_a_clear_config_error(tmp_path: Path,
                                                             tokenizer_dir: Path) -> None:
    from backends.sglang import SGLangRollout
    from mics.config import ModelConfig

    empty = tmp_path / "no-template"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    model = SGLangRollout(ModelConfig(name="i0", backend="sglang", model="org/i0",
                                      base_url="http://127.0.0.1:9",
                                      options={"tokenizer": str(empty)}))
    with pytest.raises(ConfigError) as err:
        model.render(Prompt("s", (Text("q"),)))
    assert isinstance(err.value, FatalError)  # a run stops: no prompt can be rendered
    assert "'i0'" in str(err.value) and str(empty) in str(err.value)
    assert "chat_template.jinja" in str(err.value)

    with pytest.raises(ChatTemplateError, match="not a local model folder"):
        load_chat_template(str(tmp_path / "missing"), "model 'i0'")
    named = _folder_with(tmp_path, tokenizer_dir, "x", QWEN2_TEXT, "none")
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "a", "template": "x"}, {"name": "b", "template": "y"}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(str(named), "model 'i0'")
    (named / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json"):
        load_chat_template(str(named), "model 'i0'")


def test_a_hub_id_is_found_in_the_local_hf_cache(tmp_path: Path, tokenizer_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tokenizer_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_chat_template("org/tiny", "i0").source.startswith(str(repo / "snapshots"))
    with pytest.raises(ChatTemplateError, match="org/other"):
        load_chat_template("org/other", "i0")


def test_search_with_sglang_interns_never_imports_torch_or_transformers(
        tmp_path: Path, tokenizer_dir: Path) -> None:
    from bench.loopback import LoopbackServer
    from mics.demo_data import write_demo_dataset
    from store import RunStore

    data, images = write_demo_dataset(tmp_path / "demo")
    models = {"m0": {"role": "mentor", "quality": 0.6}, "i0": {"role": "intern", "skill": 0.9},
              "judge": "judge"}
    with LoopbackServer(models, keep_bodies=True) as srv:
        cfg = tmp_path / "sglang.toml"
        cfg.write_text("\n".join([
            "[search]", "concurrency = 4", "",
            "[[mentors]]", 'name = "m0"', 'backend = "openai"', 'model = "m0"',
            f'base_url = "{srv.url}/v1"', "",
            "[[interns]]", 'name = "i0"', 'backend = "sglang"', 'model = "i0"',
            f'base_url = "{srv.url_for("i0")}"', f'options = {{ tokenizer = "{tokenizer_dir}" }}',
            "",
            "[judge]", 'name = "judge"', 'backend = "openai"', 'model = "judge"',
            f'base_url = "{srv.url}/v1"', ""]))
        args = ["search", data, "--image-root", images, "-c", cfg, "--run", tmp_path / "R",
                "--limit", "2"]
        report = command_imports(*args)
        generated = [body for path, body in srv.bodies if path.endswith("/generate")]
    assert report == Imports(heavy=[], code=0, jinja=True)
    texts = [t for body in generated for t in
             (body["text"] if isinstance(body["text"], list) else [body["text"]])]
    assert texts, "no /generate request reached the server"
    # The bench ChatML template, images as Qwen-VL placeholders; warm-up prefixes stop early.
    assert all(t.startswith("<|im_start|>system\n") for t in texts)
    assert any(t.endswith("<|im_end|>\n<|im_start|>assistant\n") for t in texts)
    assert any("<|vision_start|><|image_pad|><|vision_end|>" in t for t in texts)
    with RunStore.open(tmp_path / "R", write=False) as store:
        assert any(e["role"] == "intern" for e in store.iter_calls())


@pytest.mark.parametrize("placeholder", ["<image>", "<IMG_CONTEXT>"])
def test_internvl_fast_path_uses_the_servers_placeholder(tmp_path: Path, tokenizer_dir: Path,
                                                         placeholder: str) -> None:
    """The compiled InternVL form puts the placeholder the server version asks for (SGLang
    before 0.5.7 wants <IMG_CONTEXT>), equal to apply_chat_template on that text."""
    folder = _folder_with(tmp_path, tokenizer_dir, "internvl", INTERNVL, "jinja")
    ours, theirs = load_chat_template(str(folder), "i0"), _auto_tokenizer(folder)
    with_images = [p for p in _prompts(80, seed=3) if len(p.parts) > 1][:30]
    for prompt in with_images:
        fast = render_prompt(ours, "internvl", prompt, lambda: f"{placeholder}\n")
        assert fast == theirs.apply_chat_template(
            family_messages(prompt, "internvl", f"{placeholder}\n"), tokenize=False,
            add_generation_prompt=True)
    assert sum(render_prompt(ours, "internvl", p, lambda: f"{placeholder}\n").count(placeholder)
               for p in with_images) > 0


def test_tools_and_extra_variables_reach_the_template_as_in_transformers(
        tmp_path: Path, tokenizer_dir: Path) -> None:
    template = ("{{ tools | tojson }}|{{ documents | tojson }}|{{ flavour }}|{{ eos_token }}|"
                "{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}")
    folder = _folder_with(tmp_path, tokenizer_dir, "vars", template, "jinja")
    ours, theirs = load_chat_template(str(folder), "i0"), _auto_tokenizer(folder)
    chat = [{"role": "system", "content": "s", "name": None}, {"role": "user", "content": "é<"}]
    kwargs = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
              "documents": [{"title": "t", "text": "x"}], "flavour": "<b>",
              "eos_token": "OVERRIDE"}
    text = ours.apply_chat_template(chat, tokenize=False, **kwargs)
    assert text == theirs.apply_chat_template(chat, tokenize=False, **kwargs)
    assert "OVERRIDE" in text and "<b>" in text
    with pytest.raises(ValueError, match="continue_final_message"):
        ours.apply_chat_template(chat, continue_final_message=True)


def test_a_search_without_a_chat_template_stops_before_creating_the_run(tmp_path: Path) -> None:
    """`mics search` loads each SGLang intern's chat template before the run directory exists:
    a folder without one is one error line, exit code 2, and nothing created."""
    empty = tmp_path / "no-template"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    text = (ROOT / "examples" / "simulated.toml").read_text()
    intern = ('name = "sim-intern-1"\nbackend = "simulated"\nmodel = "sim-intern-1"\n'
              'options = { skill = 0.95 }')
    assert intern in text
    cfg = tmp_path / "sglang.toml"
    cfg.write_text(text.replace(intern, (
        'name = "sim-intern-1"\nbackend = "sglang"\nmodel = "org/i1"\n'
        'base_url = "http://127.0.0.1:9"\n'
        f'options = {{ tokenizer = "{empty}", family = "text" }}')))
    from test_cli import mics
    from test_cli_ux import one_error_line

    from mics.demo_data import write_demo_dataset

    data, images = write_demo_dataset(tmp_path / "data", n=2)
    run = tmp_path / "runs" / "r1"
    proc = mics("search", data, "--image-root", images, "--config", cfg, "--run", run,
                check=False)
    assert str(empty) in one_error_line(proc) and not proc.stdout.strip(), proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing created, not even the parent folder
