"""The ``llm.ask`` provider (:class:`LLM`): one question to a configured model, as a governed
action, so that every ``ask_llm()`` of agent-written code is decided and recorded.

A request is ``ActionRequest("llm.ask", model, {"prompt": ..., "system": ...})``; the resource
is the model's name (``openai/gpt-4o-mini``), judged as the operation ``llm`` under the
permission ``network`` (a model call leaves the host). The policy's context has ``prompt``,
``content`` (the prompt and the system text, for content rules) and ``model``. The model is
asked through :class:`~agent_os.control_plane.actions.loop.AgentLoop` with no tools and one
turn (its retry rule, timeouts and traces). ``docs/code-execution.md`` says how to use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.actions.loop import AgentLoop
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.actions.tools import ToolDef
from agent_os.control_plane.errors import KernelError

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry

MAX_PROMPT: Final = 200_000
"""Characters of prompt (and system text) :class:`LLM` accepts by default."""


async def _no_actions(request: ActionRequest) -> ActionResult:  # pragma: no cover - no tools
    raise KernelError("llm.ask offers the model no tools")


class LLM:
    """The ``llm.ask`` action (permission ``network``, operation ``llm``): ask ``model`` (a
    litellm model id) one question; the output is the model's text.

    ``models``: more model ids a request may name as its target (the default is ``model``);
    ``api_base``, ``api_key``, ``params`` (more ``litellm.acompletion`` arguments),
    ``timeout`` (seconds per attempt), ``retries``: as for
    :class:`~agent_os.control_plane.actions.loop.AgentLoop`; ``max_prompt``: the longest
    prompt. Raises KernelError for a bad limit."""

    ACTION: Final = "llm.ask"
    PERMISSION: Final = "network"
    OPERATION: Final = "llm"

    def __init__(
        self,
        model: str,
        *,
        models: tuple[str, ...] = (),
        api_base: str | None = None,
        api_key: str | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        max_prompt: int = MAX_PROMPT,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise KernelError("an LLM needs a model id")
        whole(max_prompt, "max_prompt", error=KernelError)
        seconds(timeout, "timeout", error=KernelError)
        whole(retries, "retries", 0, error=KernelError)
        self.model = model
        self.models = frozenset((model, *models))
        self.max_prompt = max_prompt
        self._options: dict[str, Any] = {
            "api_base": api_base,
            "api_key": api_key,
            "params": dict(params or {}),
            "timeout": timeout,
            "retries": retries,
            "max_turns": 1,
        }

    def __repr__(self) -> str:
        return f"LLM({self.model!r})"

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``llm.ask`` (permission ``network``, operation ``llm``) in ``registry``."""
        registry.register(self.ACTION, self, self.PERMISSION, operation=self.OPERATION, replace=replace)

    def tool(self, name: str = "ask_llm") -> ToolDef:
        """The tool that asks this provider's model: ``ask_llm(prompt, system=None)`` in code."""
        schema = {
            "type": "object",
            "properties": {
                "prompt": {"type": "string", "description": "The question"},
                "system": {"type": "string", "description": "A system prompt"},
            },
            "required": ["prompt"],
            "additionalProperties": False,
        }
        description = f"Ask the language model {self.model} and get its answer as text."
        return ToolDef(name, description, schema, self.ACTION, "", fixed_target=self.model)

    # -- the provider ---------------------------------------------------------------------------

    def resource(self, request: ActionRequest) -> str:
        """The model; refuses a model not configured, a prompt that is not a string or is over
        ``max_prompt`` characters, and a system text that is not a string."""
        if request.target not in self.models:
            raise ActionRefused(f"model {request.target[:80]!r} is not configured for llm.ask")
        prompt, system = self._texts(request)
        if len(prompt) + len(system or "") > self.max_prompt:
            raise ActionRefused(f"a prompt over {self.max_prompt} characters (max_prompt)")
        return request.target

    def context(self, request: ActionRequest) -> dict[str, Any]:
        """``model``, ``prompt`` and ``content`` (the prompt and the system text)."""
        prompt, system = self._texts(request)
        texts = (prompt,) if system is None else (prompt, system)
        return {"model": request.target, "prompt": prompt, "content": texts}

    async def run(self, request: ActionRequest) -> str:
        """The model's answer. Raises LLMError when the model cannot be asked."""
        prompt, system = self._texts(request)
        loop = AgentLoop(_no_actions, [], request.target, system=system, **self._options)
        return (await loop.run(prompt)).text

    @staticmethod
    def _texts(request: ActionRequest) -> tuple[str, str | None]:
        prompt = request.params.get("prompt")
        system = request.params.get("system")
        if not isinstance(prompt, str):
            raise ActionRefused("params['prompt'] must be a string")
        if system is not None and not isinstance(system, str):
            raise ActionRefused("params['system'] must be a string")
        return prompt, system
