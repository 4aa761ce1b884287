"""The prompts and per-side token limits an embedding stage trains with.

Why one object: the query side (queries; both texts of a symmetric kind) and the passage
side each have a prompt and a token limit, and an instructed task replaces the query prompt
with its instruction's. The loss's encodes, DHNM's no-grad re-encodes and the held-out loss
must agree on all of them, so they ask :class:`Prompts` instead of reading the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from conan_embedding.config import TrainConfig
from conan_embedding.modeling.embedder import set_side_lengths

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@dataclass(frozen=True)
class Prompts:
    """The run's prompt texts (not names) and per-side lengths (None = ``max_seq_length``)."""

    query: str | None
    passage: str | None
    tasks: dict[str, str]
    """Per task with an ``instruction``: its query-side prompt (also a model prompt)."""
    query_length: int | None = None
    passage_length: int | None = None

    @classmethod
    def install(cls, model: SentenceTransformer, config: TrainConfig) -> Prompts:
        """The prompts of ``config`` on ``model``, whose per-side lengths and instruction
        prompts it sets (both are saved with the model)."""
        mc = config.model
        query = model_prompt(model, mc.query_prompt)
        passage = model_prompt(model, mc.passage_prompt)
        set_side_lengths(model, mc.query_max_length, mc.passage_max_length)
        tasks = instruction_prompts(model, config)  # after: names resolve among the model's own
        return cls(query, passage, tasks, mc.query_max_length, mc.passage_max_length)

    def query_of(self, task: str | None) -> str | None:
        """The query-side prompt of the task named ``task``: its instruction's, else
        ``model.query_prompt``."""
        return self.tasks.get(task or "", self.query)

    def of_role(self, role: str | None, task: str | None = None) -> tuple[str | None, int | None]:
        """The prompt and token limit of ``role`` (``query`` / ``passage``, ``task``'s
        instruction on the query side); ``(None, None)`` for any other role."""
        if role == "query":
            return self.query_of(task), self.query_length
        if role == "passage":
            return self.passage, self.passage_length
        return None, None


def model_prompt(model: SentenceTransformer, name: str | None) -> str | None:
    """The text of the model's prompt ``name`` (None: no prompt)."""
    if name is None:
        return None
    prompts = model.prompts or {}
    if name not in prompts:
        raise ValueError(f"prompt '{name}' is not among the model's prompts {sorted(prompts)}")
    return prompts[name]


def instruction_prompts(model: SentenceTransformer, config: TrainConfig) -> dict[str, str]:
    """Each instructed task's prompt, added to the model's prompts under the task's name
    (saved in the sentence-transformers config: ``encode(prompt_name=task)`` applies it)."""
    mc = config.model
    out: dict[str, str] = {}
    prompts = dict(model.prompts or {})
    for task in config.tasks:
        if not task.instruction:
            continue
        prompt = mc.instruction_prompt(task.instruction)
        if prompts.get(task.name, prompt) != prompt:
            raise ValueError(
                f"task '{task.name}' has an instruction, and the model already has a "
                f"different prompt named '{task.name}': rename the task or the prompt"
            )
        prompts[task.name] = out[task.name] = prompt
    if out:
        model.prompts = prompts
    return out
