"""The reference schedule, for the benchmark only: the Chiron-o1 call order as a baseline.

Per depth, for each mentor in order: its proposal, then each intern at each temperature, one
call at a time, each answer judged as soon as it arrives. The trees it builds are the product
engine's trees (same policy, same prompts, same memo keys); only the order and batching of the
calls differ, which is what `mics bench loop` measures against `mics.engine.Engine`.
"""

from __future__ import annotations

from typing import Any

from backends.base import Call
from mics.engine import Engine
from mics.prompts import intern_prompt, mentor_prompt
from mics.types import Node, Question


class ReferenceEngine(Engine):
    """`Engine` that issues one call at a time in the reference order (`mics bench loop`)."""

    async def _depth(self, q: Question, tree: Any, depth: int
                     ) -> tuple[list[Node], dict[str, str]]:
        """A mentor, then each intern at each temperature, each answer judged at once."""
        nodes: list[Node] = []
        errors: dict[str, str] = {}
        for mentor in self.models.mentors:
            prompt = mentor_prompt(q, tree.prefix, self.cfg.prompts)
            proposal = await self._propose_one(q, tree, depth, mentor, prompt)
            if isinstance(proposal, str):
                errors[mentor.config.name] = proposal
                continue
            tree.chains[proposal.mentor] = proposal
            nodes.append(node := self._node(q, tree, depth, proposal))
            await self._evaluate_in_order(q, node, tree)
        return nodes, errors

    async def _evaluate_in_order(self, q: Question, node: Node, tree: Any) -> None:
        """The reference order for one candidate: one intern call at a time, judged at once."""
        prompt = intern_prompt(q, node.prefix, self.cfg.prompts)
        for intern in self.models.interns:
            for temp, number in self.search.sample_plan():
                call = Call(prompt, self._intern_sampling(temp), number)
                [reply] = await self.gate.rollouts(intern, [call], qid=q.qid)
                parsed = await self._judge_all(q, {0: reply}, tree)
                self._note_failure(tree, intern.config.name, reply)
                node.samples.append(self._sample(intern.config.name, temp, reply, tree.verdicts,
                                                 number, parsed.get(0)))
        self._tally([node], tree)

