"""Issue 10 item 4: steps that give the answer away are caught (rule, engine modes, exports)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_questions, sim_config
from test_engine import run_engine

from backends.simulator import CLUE, CODE, intern_reply, mentor_reply
from mics.config import parse_config
from mics.export import Filters, export
from mics.leaks import content_words, leaks_answer
from store import RunStore


def chiron_answers(chiron: Path) -> dict[str, str]:
    out = {}
    for line in (chiron / "demo.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["rid"]] = rec["messages"][1]["content"].replace("**Correct Answer:**", "").strip()
    return out


# rid -> (a step that states the answer, a step about the same case that does not)
CHIRON_STEPS = {
    "169992": ("### Step 2: The left coronary artery takes an anomalous interarterial course "
               "between the aorta and pulmonary trunk, with myocardial ischemia.",
               "### Step 2: Trace the origin of the coronary arteries on the CT angiogram."),
    "159949": ("### Step 3: The malignant course puts the patient at risk of sudden cardiac "
               "death.",
               "### Step 3: Assess the cardiac chambers and the great vessels."),
    "189353": ("### Step 2: The radiograph shows a pacemaker lead fracture near the clavicle.",
               "### Step 2: Follow the pacemaker lead along its course to the right ventricle."),
    "190893": ("### Step 2: There is myocardial bridging of the LAD in its mid segment.",
               "### Step 2: Evaluate the left anterior descending artery for stenosis."),
    "158377": ("### Step 2: The left atrial appendage is enlarged, in keeping with mitral valve "
               "disease.",
               "### Step 2: Inspect the left atrium and the mitral annulus."),
    "178062": ("### Step 1: These findings fit a post-traumatic headache.",
               "### Step 1: The patient reports headache after a fall; CT shows no bleed."),
    "160688": ("### Step 2: The spiculated mass is an invasive ductal carcinoma.",
               "### Step 2: Describe the spiculated breast mass and its margins."),
    "177194": ("### Step 2: Beta-2 transferrin confirms a CSF leak: cerebrospinal fluid "
               "escapes through the left cribriform plate.",
               "### Step 2: Look at the anterior skull base on coronal CT."),
    "189817": ("### Step 2: Both kidneys are absent: bilateral renal agenesis, with tricuspid "
               "regurgitation on echo.",
               "### Step 2: Look for the kidneys in the renal fossae and the pelvis."),
    "181112": ("### Step 2: The fat-density intracardiac mass is a cardiac lipoma.",
               "### Step 2: Measure the density of the intracardiac mass."),
}


def test_rule_on_every_chiron_demo_case(chiron: Path) -> None:
    answers = chiron_answers(chiron)
    assert set(answers) == set(CHIRON_STEPS)
    for rid, gt in answers.items():
        leak, near_miss = CHIRON_STEPS[rid]
        assert content_words(gt), rid
        assert leaks_answer(leak, gt), (rid, leak)
        assert not leaks_answer(near_miss, gt), (rid, near_miss)
        assert not leaks_answer("Let's think about how to solve this problem clearly and "
                                "reasonably step by step.", gt)


@pytest.mark.parametrize(("step", "gt", "leaks"), [
    ("### Step 1: This points toward: Pneumothorax.", "Pneumothorax", True),
    ("### Step 1: The PNEUMOTHORAX is large.", "Pneumothorax", True),
    ("### Step 1: Consider pneumothorax versus bulla.", "Pneumothorax", True),
    ("### Step 1: The lung markings are absent at the apex.", "Pneumothorax", False),
    # the final-answer line is where the answer belongs
    ("### Step 1: Review.\n### The final answer is: Pneumothorax", "Pneumothorax", False),
    ("### Step 1: Renal cell carcinoma is likely.\n### The final answer is: x",
     "Renal cell carcinoma", True),
    # distinctive words: enough of them, stems count
    ("### Step 2: Enlarged left atrial appendage from mitral stenosis.",
     "Enlargement of the left atrial appendage due to mitral valve disease.", True),
    ("### Step 2: The atrial septum is intact.",
     "Enlargement of the left atrial appendage due to mitral valve disease.", False),
    ("### Step 1: Check the pacemaker lead course.", "Pacemaker lead fracture", False),
    # signs, numbers and sides are kept
    ("### Step 1: Immunohistochemistry is HER2-.", "HER2+", False),
    ("### Step 1: Immunohistochemistry is HER2+.", "HER2+", True),
    ("### Step 1: The lesion measures 5 cm.", "-5", False),
    # multiple choice
    ("### Step 1: So the answer is (B).", "B", True),
    ("### Step 1: Option B fits best.", "B. Pneumonia", True),
    ("### Step 1: B-lines are seen on ultrasound.", "B", False),
    ("### Step 1: Consolidation suggests pneumonia.", "B. Pneumonia", True),
    ("", "Pneumonia", False),
    ("### Step 1: Anything.", "", False),
])
def test_crafted_leaks_and_near_misses(step: str, gt: str, leaks: bool) -> None:
    assert leaks_answer(step, gt) is leaks


def test_simulator_leak_rate_codes_clues_the_intern_still_reads() -> None:
    prompt = "Correct answer: Pneumothorax\nReasoning prefix: Let's think."
    kw = {"seed": 0, "model": "m", "temperature": 1.0, "quality": 1.0}
    legacy = mentor_reply(prompt, **kw)
    assert CLUE in legacy and CODE not in legacy  # unset: exactly the old replies
    coded = mentor_reply(prompt, leak_rate=0.0, **kw)
    assert CLUE not in coded and CODE in coded
    assert not leaks_answer(coded.split("### The final answer")[0], "Pneumothorax")
    assert CLUE in mentor_reply(prompt, leak_rate=1.0, **kw)
    reply = intern_reply(f"Reasoning prefix: {coded}", seed=0, model="i", temperature=0.2,
                         skill=1.0)
    assert reply.endswith("Pneumothorax")


def leak_config(mode: str, leak_rate: float = 0.5, **search: object) -> dict:
    data = sim_config(on_answer_leak=mode, max_depth=2, **search)
    for m in data["mentors"]:
        m["options"] = {**m["options"], "quality": 0.9, "leak_rate": leak_rate}
    return data


def _nodes(store: RunStore, qs: list) -> list[dict]:
    return [n for q in qs for n in store.get_nodes(q.qid) if n["depth"] >= 0]


def test_flag_records_leaks_on_nodes_and_keeps_decisions(tmp_path: Path) -> None:
    qs = make_questions(4)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, parse_config(leak_config("flag")), qs)
        nodes = _nodes(store, qs)
        gts = {q.qid: q.gt_answer for q in qs}
        for q in qs:
            for n in store.get_nodes(q.qid):
                if n["depth"] >= 0:
                    assert n["leaks_answer"] is leaks_answer(n["step"], gts[q.qid])
    assert any(n["leaks_answer"] for n in nodes) and not all(n["leaks_answer"] for n in nodes)


def test_reject_never_evaluates_a_leaking_step(tmp_path: Path) -> None:
    qs = make_questions(4)
    with RunStore.open(tmp_path / "r", create=True) as store:
        outcomes, _, _ = run_engine(store, parse_config(leak_config("reject")), qs)
        nodes = _nodes(store, qs)
    assert nodes and not any(n["leaks_answer"] for n in nodes)
    errors = [e for o in outcomes.values()
              for by_m in o.details.get("mentor_errors_by_depth", {}).values()
              for e in by_m.values()]
    errors += [e for o in outcomes.values() for e in o.details.get("mentor_errors", {}).values()]
    assert any("states the correct answer" in e for e in errors)


def test_reask_asks_once_more_with_a_reminder(tmp_path: Path) -> None:
    qs = make_questions(4)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, parse_config(leak_config("reask")), qs)
        nodes = _nodes(store, qs)
        calls = [c for c in store.iter_calls() if c["role"] == "mentor"]
    reasked = [n for n in nodes if n["reasked"]]
    assert reasked  # some leaking replies were asked again ...
    assert any(not n["leaks_answer"] for n in reasked)  # ... and some came back clean
    flagged = sum(n["leaks_answer"] for n in nodes)
    with RunStore.open(tmp_path / "f", create=True) as store:
        run_engine(store, parse_config(leak_config("flag")), qs)
        plain = [c for c in store.iter_calls() if c["role"] == "mentor"]
        assert flagged < sum(n["leaks_answer"] for n in _nodes(store, qs))
    assert len(calls) > len(plain)  # the re-asks were real calls


def test_exports_carry_the_flag_and_exclude_leaks_filters(tmp_path: Path) -> None:
    qs = make_questions(6)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, parse_config(leak_config("flag", leak_rate=0.3)), qs)
        counts_all = export(store, tmp_path / "all", ["reference", "sft", "step-values",
                                                      "preferences"])
        counts_clean = export(store, tmp_path / "clean", ["reference", "sft"],
                              Filters(exclude_leaks=True))
    rows = {f: [json.loads(x) for x in (tmp_path / "all" / f).read_text().splitlines()]
            for f in ("results.jsonl", "sft.jsonl", "step_values.jsonl", "preferences.jsonl")}
    for name, recs in rows.items():
        for r in recs:
            assert isinstance(r["leaks_answer"] if name != "preferences.jsonl"
                              else r["metadata"]["chosen"]["leaks_answer"], bool), name
    leaking = {r["rid"] for r in rows["results.jsonl"] if r["leaks_answer"]}
    assert leaking and len(leaking) < len(rows["results.jsonl"])
    clean = [json.loads(x) for x in (tmp_path / "clean" / "results.jsonl").read_text()
             .splitlines()]
    assert clean and not any(r["leaks_answer"] for r in clean)
    assert not leaking & {r["rid"] for r in clean}
    assert counts_clean["results"] < counts_all["results"]
    assert counts_clean["leaks_left_out"] == len(leaking)


def test_exclude_leaks_drops_leaking_steps_and_what_continues_them(tmp_path: Path) -> None:
    """In the questions kept, step-level exports leave out every leaking step and every step
    below one (its prefix holds the answer); clean steps of those questions stay."""
    qs = make_questions(8)
    steps = ["step-values", "preferences", "prm"]
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, parse_config(leak_config("flag", leak_rate=0.3)), qs)
        export(store, tmp_path / "all", ["reference", *steps])
        counts = export(store, tmp_path / "clean", steps, Filters(exclude_leaks=True))
        trees = {q.qid: {n["node_id"]: n for n in store.get_nodes(q.qid)} for q in qs}

    def read(where: str, name: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / where / name).read_text().splitlines()]

    def tainted(qid: str, node_id: str) -> bool:
        node = trees[qid].get(node_id)
        while node is not None:
            if node["leaks_answer"]:
                return True
            node = trees[qid].get(node["parent_id"] or "")
        return False

    leaking_q = {r["rid"] for r in read("all", "results.jsonl") if r["leaks_answer"]}
    every, kept = read("all", "step_values.jsonl"), read("clean", "step_values.jsonl")
    expected = [r for r in every if r["rid"] not in leaking_q
                and not tainted(r["rid"], r["node_id"])]
    assert kept == expected and counts["step-values"] == len(expected)
    assert any(tainted(r["rid"], r["node_id"]) for r in every if r["rid"] not in leaking_q)
    assert counts["leaks_left_out"] == len(leaking_q)
    for pair in read("clean", "preferences.jsonl"):
        meta = pair["metadata"]
        assert not tainted(meta["rid"], meta["chosen"]["node_id"])
        assert not tainted(meta["rid"], meta["rejected"]["node_id"])
    for row in read("clean", "prm.jsonl"):
        assert not any(row["metadata"]["leaks_answer"])


def test_inspect_and_viz_show_leaks_and_mentor_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app
    from mics.analysis import load_tree, run_summary
    from mics.viz import tree_html

    data = leak_config("flag")
    data["mentors"][2]["options"] = {"malformed_rate": 1.0}
    qs = make_questions(2)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, parse_config(data), qs)
        summary = run_summary(store)
        g = load_tree(store, "q0")
    rates = {r["mentor"]: r for r in summary["answer_leaks"]}
    assert set(rates) == {"m0", "m1"} and all(r["steps"] for r in rates.values())
    assert any(r["leaking"] for r in rates.values())
    page = tree_html(g)
    assert "Mentor errors:" in page and "m2" in page and "malformed" in page
    assert '"leaks_answer":true' in page.replace(" ", "")
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "r"), "q0"],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "mentor error" in out.stdout and "m2" in out.stdout
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "r")], env={"COLUMNS": "200"})
    assert "answer leaks per mentor" in out.stdout


def test_a_chain_may_conclude_with_the_answer_in_its_last_step() -> None:
    """The mentor prompt asks never to state the answer *before the final step*: the exported
    reasoning leaks when an earlier step states it, not when its last step concludes with it
    (which real chains do, so --exclude-leaks would otherwise drop most of them)."""
    from mics.export import question_leaks
    from mics.records import StoredQuestion
    from mics.types import Outcome, Question

    gt = "Anomalous interarterial course of the left coronary artery"
    concluding = ("Let's think.\n### Step 1: Trace the coronary origins on the CT angiogram.\n"
                  "### Step 2: The left coronary artery takes an anomalous interarterial course "
                  "between the aorta and pulmonary trunk.\n### The final answer is: " + gt)
    early = ("Let's think.\n### Step 1: The left coronary artery takes an anomalous "
             "interarterial course.\n### Step 2: So the patient is at risk.\n"
             "### The final answer is: " + gt)

    def stored(reasoning: str) -> StoredQuestion:
        q = Question(qid="q", index=0, question="?", gt_answer=gt, images=(), image_paths=(),
                     case_info="")
        o = Outcome(qid="q", status="succeeded", stop_reason="full_score", reasoning=reasoning)
        return StoredQuestion.from_record("q", {"status": "succeeded", "index": 0,
                                                "question": q.to_dict(),
                                                "outcome": o.to_dict()})

    assert not question_leaks(stored(concluding))
    assert question_leaks(stored(early))
    assert leaks_answer(concluding.split("### Step 2")[1], gt)  # the last step does state it
