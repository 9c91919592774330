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
from mics.records import StoredQuestion
from mics.types import Node, Outcome, Question, QuestionStatus, Sample, StopReason
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


def node(node_id: str, parent: str | None, attempt: int, depth: int, mentor: str | None,
         step: str, correct: int = 0, total: int = 0, chosen: bool = False,
         leaks_answer: bool = False, samples: int = 0) -> Node:
    """A tree node as the engine stores it (prefix and chain do not show on the page)."""
    return Node(node_id=node_id, parent_id=parent, attempt=attempt, depth=depth, mentor=mentor,
                step=step, prefix=step, chain=step, correct=correct, total=total, chosen=chosen,
                leaks_answer=leaks_answer,
                samples=[Sample(intern="i0", temperature=1.2, answer="x", raw="x", correct=True,
                                verdict="yes")] * samples)


def stored(qid: str, status: QuestionStatus, stop_reason: StopReason, question: str,
           gt_answer: str, final_depth: int, error: str = "",
           details: dict | None = None) -> StoredQuestion:
    """A finished question's stored record, typed."""
    q = Question(qid=qid, index=0, question=question, gt_answer=gt_answer, images=(),
                 image_paths=(), case_info="")
    o = Outcome(qid=qid, status=status, stop_reason=stop_reason,  # type: ignore[arg-type]
                final_depth=final_depth, error=error, details=details or {})
    return StoredQuestion(qid=qid, status=status, stop_reason=stop_reason, question=q, outcome=o)


def test_html_escapes_hostile_text():
    nodes = [node("a0.root", None, 0, -1, None, "root", chosen=True),
             node("a0.d0.<m>", "a0.root", 0, 0, "<m>",
                  "</script><script>alert(1)</script> & \u2028", correct=1, total=2)]
    rec = stored("q<1>", "failed", "all_zero", "<b>q</b>", "a & b", 1, error="x")
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
        assert status == {"data-errors": "0", "data-nodes": str(n), "data-ready": "1",
                          "data-ghosts": "0"}, qid
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


# ---------------------------------------------------------------- the tree page for real trees


MENTORS = ("mentor-a", "mentor-b", "mentor-c")


def deep_tree(failed: bool = False) -> nx.DiGraph:
    """Depth 5 after a restart (attempt 0 was all zero), mentor-c's call failed at depth 3,
    mentor-a's depth-2 step leaks the answer; `failed`: stops at depth 4, no mentor left."""
    nodes = [node("a0.root", None, 0, -1, None, "root", chosen=True)]
    for m in MENTORS:
        nodes.append(node(f"a0.d0.{m}", "a0.root", 0, 0, m, f"### Step 1\n{m} first try",
                          total=6))
    nodes.append(node("a1.root", None, 1, -1, None, "root", chosen=True))
    parent, last = "a1.root", 4 if failed else 5
    for d in range(last if not failed else last - 1):
        for k, m in enumerate(MENTORS):
            if d == 2 and m == "mentor-c":
                continue  # its call failed: no node
            correct = [3, 2, 1][k] if d < 4 else [6, 5, 3][k]  # of 6 samples
            nodes.append(node(
                f"a1.d{d}.{m}", parent, 1, d, m,
                f"### Step {d + 1}\nThe {m} step at depth {d + 1}: findings, "
                "reasoning and a differential. " * 3,
                correct=correct, total=6, chosen=k == 0,
                leaks_answer=d == 1 and m == "mentor-a", samples=1))
        parent = f"a1.d{d}.mentor-a"
    errors = {"3": {"mentor-c": "call failed after 7 attempt(s): HTTP 503 from m-c"}}
    qid = "deep-failed" if failed else "deep"
    if failed:
        errors["4"] = {m: "call failed after 7 attempt(s): connection refused" for m in MENTORS}
        rec = stored(qid, "failed", "no_mentor", "A deep case?", "answer", 4,
                     error="no mentor produced a valid step at depth 4",
                     details={"depth": 3, "mentor_errors": errors["4"],
                              "mentor_errors_by_depth": errors})
    else:
        rec = stored(qid, "succeeded", "full_score", "A deep case?", "answer", 5,
                     details={"mentor_errors_by_depth": errors})
    return question_graph(qid, rec, nodes)


def test_ink_is_readable_on_every_score_colour():
    from mics.viz import contrast, ink_for, score_color

    worst = min(contrast(score_color(x / 100), ink_for(score_color(x / 100)))
                for x in range(101))
    assert worst >= 4.5  # WCAG AA for normal text; white on olive was ~2:1
    data = embedded_data(tree_html(deep_tree()))
    assert all(n["ink"] == ink_for(n["fill"]) for n in data["nodes"])


def test_page_lists_ghosts_legend_and_leaks():
    page = tree_html(deep_tree())
    assert "orange ring: selected" in page and "leaks the answer" in page
    data = embedded_data(page)
    assert [(g["depth"], g["mentor"], g["parent"]) for g in data["ghosts"]] == [
        (3, "mentor-c", "a1.d1.mentor-a")]
    assert "HTTP 503" in data["ghosts"][0]["error"]
    assert [n["id"] for n in data["nodes"] if n["leaks_answer"]] == ["a1.d1.mentor-a"]


def dom(chromium: str, page: Path, tmp: Path, fragment: str = "") -> str:
    proc = browse(chromium, page.as_uri() + fragment, tmp, "--dump-dom",
                  "--window-size=1200,800")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert status_of(proc.stdout)["data-errors"] == "0", proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(900)
def test_real_tree_items_in_headless_chromium(chromium, tmp_path):
    shots = Path(os.environ.get("MICS_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    deep, failed = tmp_path / "deep.html", tmp_path / "failed.html"
    deep.write_text(tree_html(deep_tree()), encoding="utf-8")
    failed.write_text(tree_html(deep_tree(failed=True)), encoding="utf-8")

    page = dom(chromium, deep, tmp_path)
    st = status_of(page)
    assert st["data-nodes"] == str(len(embedded_data(deep.read_text())["nodes"]))
    assert st["data-ghosts"] == "1"
    scale = float(re.search(r'<svg[^>]*data-scale="([0-9.]+)"', page).group(1))
    assert scale >= 0.9  # a deep tree is not shrunk until its labels are unreadable
    assert re.search(r'<g class="node path leaks[^"]*" data-id="a1.d1.mentor-a"', page)
    assert "\u26a0 leak" in page
    # hover shows the step text, no click needed
    page = dom(chromium, deep, tmp_path, "#hover=a1.d3.mentor-b")
    hover = re.search(r'<div id="hover"[^>]*data-for="a1.d3.mentor-b"[^>]*>(.*?)</div>', page,
                      re.S)
    assert hover is not None and "mentor-b step at depth 4" in hover.group(1)
    # a failed mentor call is drawn and explains itself
    page = dom(chromium, deep, tmp_path, "#node=a1.d2.mentor-c.failed")
    detail = re.search(r'<aside id="detail">(.*?)</aside>', page, re.S).group(1)
    assert "call failed" in detail and "HTTP 503 from m-c" in detail
    # zoom
    page = dom(chromium, deep, tmp_path, "#zoom=2")
    assert 'data-scale="2.000"' in page
    # a failed question opens on its failure
    page = dom(chromium, failed, tmp_path)
    detail = re.search(r'<aside id="detail">(.*?)</aside>', page, re.S).group(1)
    assert "Failed: no_mentor" in detail and "connection refused" in detail
    assert re.search(r'<g class="ghost selected" data-id="a1.d3.mentor-[abc].failed"', page)

    for name, path, fragment in (("deep", deep, "#hover=a1.d3.mentor-b"),
                                 ("failed", failed, ""), ("zoomed-out", deep, "#zoom=0.5")):
        shot = shots / f"tree-{name}.png"
        browse(chromium, path.as_uri() + fragment, tmp_path, f"--screenshot={shot}",
               "--window-size=1400,900")
        with Image.open(shot) as img:
            colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, name
