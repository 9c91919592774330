"""Plain data shared by every layer: questions, prompts, model replies, tree nodes."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field, fields
from typing import Any, Literal

ROOT_TEXT = "Let's think about how to solve this problem clearly and reasonably step by step."

QuestionStatus = Literal["running", "succeeded", "failed", "deferred"]
# deferred: a call still failed after retries with on_call_failure = "defer"; resume decides it
FinalStatus = Literal["succeeded", "failed", "deferred"]
# full_score / max_depth: succeeded; all_zero: failed (MICS said no); no_mentor / no_intern /
# no_judge: failed for lack of a working model (retried on resume); deferred: left undecided by
# a failed call (resumed); bad_record: unusable input
StopReason = Literal["full_score", "max_depth", "all_zero", "no_mentor", "no_intern", "no_judge",
                     "deferred", "bad_record"]
NO_MODEL_STOPS = ("no_mentor", "no_intern", "no_judge")  # failed for lack of a working model
Verdict = Literal["yes", "no", "no-answer", "call-failed", "judge-failed", "unparsable"]


@dataclass(frozen=True)
class ImageRef:
    """An image on disk, identified by the hash of its bytes."""

    path: str  # resolved absolute path
    sha256: str
    mime: str  # from the decoded image format, never the file extension (B21)
    width: int
    height: int


@dataclass(frozen=True)
class Question:
    """One dataset record, cleaned and validated."""

    qid: str
    index: int  # position in the dataset, for stable export order
    question: str
    gt_answer: str
    images: tuple[ImageRef, ...]
    image_paths: tuple[str, ...]  # as written in the record (exported unchanged)
    case_info: str
    captions: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:  # by hand: what dataclasses.asdict gives, faster
        return {"qid": self.qid, "index": self.index, "question": self.question,
                "gt_answer": self.gt_answer,
                "images": tuple({"path": i.path, "sha256": i.sha256, "mime": i.mime,
                                 "width": i.width, "height": i.height} for i in self.images),
                "image_paths": tuple(self.image_paths), "case_info": self.case_info,
                "captions": tuple(self.captions)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Question:
        d = dict(d)
        d["images"] = tuple(ImageRef(**i) for i in d["images"])
        d["image_paths"] = tuple(d["image_paths"])
        d["captions"] = tuple(d.get("captions", ()))
        return Question(**d)


@dataclass(frozen=True)
class RecordError:
    """A dataset record that could not become a Question."""

    qid: str  # the record's id when readable, else "line-<n>"
    index: int
    line: int
    field: str
    message: str
    id_field: str = "rid"  # what the dataset format calls a record's id ("id" in generic)

    def __str__(self) -> str:
        return (f"line {self.line}, {self.id_field} {self.qid!r}, field {self.field!r}: "
                f"{self.message}")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    image: ImageRef


Part = Text | Image


@dataclass(frozen=True)
class Prompt:
    """A backend-neutral chat prompt: a system message and one user turn of parts.

    Parts are kept in order so that prompts sharing a prefix render to a shared prefix.
    """

    system: str
    parts: tuple[Part, ...]
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        """The generated dataclass hash, `hash((system, parts))`, worked out once: a prompt is
        hashed for every call key (issue 15), and hashing recurses through every part."""
        h = self._hash
        if h is None:
            h = hash((self.system, self.parts))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the kept hash: string hashes differ between processes."""
        return {"system": self.system, "parts": self.parts}

    def user_text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, Text))

    def images(self) -> tuple[ImageRef, ...]:
        return tuple(p.image for p in self.parts if isinstance(p, Image))

    def key_material(self) -> dict[str, Any]:
        """The prompt as hashable data: text verbatim, images by content hash."""
        return {
            "system": self.system,
            "parts": [
                {"text": p.text} if isinstance(p, Text) else {"image": p.image.sha256}
                for p in self.parts
            ],
        }


@dataclass(frozen=True)
class Sampling:
    """Explicit sampling parameters, sent on every call (B8)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "stop": list(self.stop)}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0


@dataclass(frozen=True)
class Reply:
    """What a model returned for one call."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"

    def to_dict(self) -> dict[str, Any]:  # by hand: dataclasses.asdict is slow on a hot path
        u = self.usage
        return {"text": self.text, "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": u.prompt_tokens,
                          "completion_tokens": u.completion_tokens,
                          "cached_tokens": u.cached_tokens, "latency_s": u.latency_s}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Reply:
        return Reply(
            text=d["text"],
            usage=Usage(**d.get("usage", {})),
            finish_reason=d.get("finish_reason", "stop"),
        )


@dataclass(frozen=True)
class CallFailure:
    """A call that still failed after its retries; recorded, never fatal on its own."""

    error: str
    attempts: int
    retryable: bool


@dataclass
class Sample:
    """One intern answer to one candidate prefix, with the judge's verdict."""

    intern: str
    temperature: float
    answer: str | None  # text after the final-answer marker; None when missing
    raw: str | None
    correct: bool
    verdict: Verdict
    usage: dict[str, Any] = field(default_factory=dict)
    sample_index: int = 0  # the sample number at this temperature (its own call)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Sample:
        """A stored sample (one stored before `sample_index` existed is sample 0)."""
        return Sample(**d)


@dataclass
class Node:
    """One candidate step in a question's search tree."""

    node_id: str
    parent_id: str | None
    attempt: int
    depth: int
    mentor: str | None
    step: str  # the candidate step text (one or more "### Step k" sections)
    prefix: str  # the full reasoning prefix shown to interns (path + step)
    chain: str  # the mentor's full chain: path + its raw continuation
    correct: int = 0
    total: int = 0
    samples: list[Sample] = field(default_factory=list)
    chosen: bool = False
    reused: bool = False  # step taken from the mentor's cached chain, no new call
    usage: dict[str, Any] = field(default_factory=dict)
    leaks_answer: bool = False  # the step states the correct answer (mics.leaks)
    reasked: bool = False  # the mentor was asked again after a leak (on_answer_leak = reask)

    @property
    def score(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def evaluated(self) -> bool:
        """Interns answered from it (a root, or a node never evaluated, has no samples)."""
        return self.total > 0

    def to_dict(self) -> dict[str, Any]:  # by hand: dataclasses.asdict is slow on a hot path
        d = {f: getattr(self, f) for f in _NODE_FIELDS}
        d["samples"] = [{f: getattr(s, f) for f in _SAMPLE_FIELDS} for s in self.samples]
        d["score"] = self.score
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Node:
        d = dict(d)
        d.pop("score", None)
        d["samples"] = [Sample.from_dict(s) for s in d.get("samples", [])]
        return Node(**d)


@dataclass
class Outcome:
    """How one question's search ended."""

    qid: str
    status: FinalStatus
    stop_reason: StopReason  # why the search ended: see StopReason above
    reasoning: str = ""
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # None: no candidate
    final_depth: int = 0
    generated_by: list[str] = field(default_factory=list)
    search_id: str = ""
    stage: str = ""
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:  # by hand: what dataclasses.asdict gives, faster
        return {"qid": self.qid, "status": self.status, "stop_reason": self.stop_reason,
                "reasoning": self.reasoning,
                "scores": {k: list(v) for k, v in self.scores.items()},
                "final_depth": self.final_depth, "generated_by": list(self.generated_by),
                "search_id": self.search_id, "stage": self.stage, "error": self.error,
                "details": deepcopy(self.details)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Outcome:
        return Outcome(**d)


_NODE_FIELDS = tuple(f.name for f in fields(Node) if f.name != "samples")
_SAMPLE_FIELDS = tuple(f.name for f in fields(Sample))
