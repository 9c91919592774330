"""Tree pictures: the offline HTML page (checked in a real headless Chromium) and DOT."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import pytest
from PIL import Image
from test_exports import build_fixed_run
from typer.testing import CliRunner

from cli.app import app
from mics.analysis import load_tree, question_graph
from mics.viz import page_name, to_dot, tree_html, write_all
from store import RunStore

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_fixed_run(tmp_path_factory.mktemp("viz") / "run")


def stored_counts(run: Path) -> dict[str, int]:
    with RunStore.open(run, write=False) as store:
        return {qid: len(store.get_nodes(qid)) for qid, _ in store.iter_questions()}


def embedded_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="mics-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


# ---------------------------------------------------------------- HTML without a browser


def test_html_is_self_contained(run):
    with RunStore.open(run, write=False) as store:
        page = tree_html(load_tree(store, "q0"))
    assert "<link" not in page and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert re.findall(r"https?://[^'\"\s]*", page) == ["http://www.w3.org/2000/svg"]  # namespace
    data = embedded_data(page)
    assert data["qid"] == "q0" and len(data["nodes"]) == stored_counts(run)["q0"]


def test_html_escapes_hostile_text():
    nodes = [{"node_id": "a0.root", "parent_id": None, "attempt": 0, "depth": -1,
              "mentor": None, "step": "root", "score": 0.0, "correct": 0, "total": 0,
              "chosen": True, "samples": []},
             {"node_id": "a0.d0.<m>", "parent_id": "a0.root", "attempt": 0, "depth": 0,
              "mentor": "<m>", "step": "</script><script>alert(1)</script> & \u2028",
              "score": 0.5, "correct": 1, "total": 2, "chosen": False, "samples": []}]
    rec = {"status": "failed", "stop_reason": "all_zero",
           "question": {"question": "<b>q</b>", "gt_answer": "a & b", "image_paths": []},
           "outcome": {"final_depth": 1, "error": "x"}}
    page = tree_html(question_graph("q<1>", rec, nodes))
    assert "<script>alert" not in page and "<b>q</b>" not in page
    assert embedded_data(page)["nodes"][1]["step"].startswith("</script>")


@pytest.mark.filterwarnings("ignore")  # pydot's own deprecation warnings
def test_dot_parses_with_networkx(run, tmp_path):
    pytest.importorskip("pydot")
    with RunStore.open(run, write=False) as store:
        g = load_tree(store, "q2")
    (tmp_path / "t.dot").write_text(to_dot(g), encoding="utf-8")
    parsed = nx.nx_pydot.read_dot(tmp_path / "t.dot")
    names = {n.strip('"') for n in parsed.nodes}
    assert names == set(g.nodes)
    assert {(u.strip('"'), v.strip('"')) for u, v in parsed.edges()} == set(g.edges)
    chosen = {n.strip('"') for n, a in parsed.nodes(data=True)
              if a.get("on_path", "").strip('"') == "True"}
    assert chosen == {n for n, a in g.nodes(data=True) if a["on_path"]}


def test_dot_structure_without_pydot(run):
    with RunStore.open(run, write=False) as store:
        g = load_tree(store, "q0")
    dot = to_dot(g)
    assert dot.startswith('digraph "mics_q0" {') and dot.rstrip().endswith("}")
    assert len(re.findall(r'^  "[^"]+" \[label=', dot, re.M)) == g.number_of_nodes()
    assert len(re.findall(r"^  \"[^\"]+\" -> ", dot, re.M)) == g.number_of_edges()


def test_write_all_and_cli(run, tmp_path):
    counts = stored_counts(run)
    with RunStore.open(run, write=False) as store:
        trees = [load_tree(store, q) for q in counts]
    written = write_all(trees, tmp_path / "all", str(run))
    assert {p.name for p in written} == {page_name(q) for q in counts} | {"index.html"}
    index = (tmp_path / "all" / "index.html").read_text()
    assert all(f'href="{page_name(q)}"' in index for q in counts)
    runner = CliRunner()
    for args, path in ((["q0", "-o", str(tmp_path / "t.html")], tmp_path / "t.html"),
                       (["q0", "--format", "dot", "-o", str(tmp_path / "t.dot")],
                        tmp_path / "t.dot"),
                       (["--all", "-o", str(tmp_path / "cli")], tmp_path / "cli" / "index.html")):
        res = runner.invoke(app, ["viz", str(run), *args])
        assert res.exit_code == 0, res.output
        assert path.is_file()
    assert embedded_data((tmp_path / "t.html").read_text())["qid"] == "q0"
    res = runner.invoke(app, ["viz", str(run)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["viz", str(run), "nope", "-o", str(tmp_path / "n.html")])
    assert res.exit_code == 2 and "nope" in res.output


def test_page_names_are_safe_and_distinct():
    names = {page_name(q) for q in ("a/b", "a_b", "../x", "q1", "")}
    assert len(names) == 5 and all("/" not in n and not n.startswith(".") for n in names)


# ---------------------------------------------------------------- real headless Chromium


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and possible; else skip."""
    if os.environ.get("MICS_SKIP_BROWSER"):
        pytest.skip("MICS_SKIP_BROWSER is set")
    found = shutil.which("chromium")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("chromium is missing and apt-get cannot install it here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "install", "-y", "-q", "chromium"], [apt, "update", "-q"],
                [apt, "install", "-y", "-q", "chromium"]):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired):
            break
        if shutil.which("chromium"):
            return shutil.which("chromium")  # type: ignore[return-value]
    pytest.skip("chromium could not be installed")


def browse(chromium: str, url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", *extra, url],
                          capture_output=True, text=True, timeout=120)


def status_of(dom: str) -> dict[str, str]:
    m = re.search(r'<div id="mics-status"([^>]*)>', dom)
    assert m is not None, dom[:500]
    return dict(re.findall(r'(data-[a-z]+)="([^"]*)"', m.group(1)))


@pytest.mark.timeout(900)
def test_pages_in_headless_chromium(chromium, run, tmp_path):
    counts = stored_counts(run)
    with RunStore.open(run, write=False) as store:
        trees = [load_tree(store, q) for q in counts]
    write_all(trees, tmp_path / "pages", str(run))
    for qid, n in counts.items():
        page = tmp_path / "pages" / page_name(qid)
        proc = browse(chromium, page.as_uri(), tmp_path, "--dump-dom")
        assert proc.returncode == 0, proc.stderr[-2000:]
        status = status_of(proc.stdout)
        assert status == {"data-errors": "0", "data-nodes": str(n), "data-ready": "1"}, qid
        assert "Uncaught" not in proc.stderr
    # a click (driven by #node=) fills the detail panel with the step and intern verdicts
    proc = browse(chromium, (tmp_path / "pages" / page_name("q2")).as_uri() + "#node=a0.d0.m1",
                  tmp_path, "--dump-dom")
    detail = re.search(r'<aside id="detail">(.*?)</aside>', proc.stdout, re.S)
    assert detail is not None and "a0.d0.m1" in detail.group(1)
    assert "Intern samples" in detail.group(1) and "verdict" in detail.group(1)
    assert status_of(proc.stdout)["data-errors"] == "0"
    shot = tmp_path / "shot.png"
    proc = browse(chromium, (tmp_path / "pages" / page_name("q0")).as_uri(), tmp_path,
                  f"--screenshot={shot}", "--window-size=1200,800")
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20  # not blank: text, circles, edges
