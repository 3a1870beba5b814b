"""The Engine protocol over HTTP, against a live vLLM server running behaviorc's worker
extension (see `behaviorc.engine.vllm.server` and `behaviorc.engine.vllm.inside.extension`)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

from behaviorc.core.vocabulary import ReadPosition, SteerPositions
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.engine.protocol import ModelInfo
from behaviorc.engine.vllm.http import ServerClient
from behaviorc.engine.vllm.inside.steer_spec import STEER_FROM_ARG
from behaviorc.engine.vllm.push import push_weights
from behaviorc.model.chat import PromptFormat, model_prompt, prompt_format, system_prompted


class VLLMEngine:
    """A live vLLM server as an Engine: generation, log-probs, steering, weight pushes."""

    reads_hidden_states = False  # see hidden_states: measurements that need them skip them
    # The positions this engine's own `set_steering` steers. Scoring sends a prompt and
    # its completion as one vLLM prompt, so with `generated` each request says where its
    # completion's choice starts (`steer_from`).
    _steering_positions: SteerPositions = "all"

    def __init__(self, url: str, api_key: str | None = None, name: str | None = None,
                 timeout: float | None = None):
        self.client = ServerClient(url, api_key, timeout)
        self.url = self.client.url
        self.api_key = api_key
        self._name = name

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @cached_property
    def _described(self) -> dict[str, Any]:
        found = self.client.rpc("behaviorc_info", doing="describing the served model")
        if not isinstance(found, dict):
            raise BehaviorError(
                f"the vLLM server at {self.url} does not run behaviorc's worker extension",
                hint="start it with `behaviorc serve MODEL`")
        return found

    @cached_property
    def info(self) -> ModelInfo:
        found = self._described
        return ModelInfo(name=self._name or found["path"], path=found["path"],
                         architecture=found["architecture"],
                         num_layers=int(found["num_layers"]),
                         hidden_size=int(found["hidden_size"]),
                         layer_kinds=tuple(found["layer_kinds"]))

    @cached_property
    def served_model_name(self) -> str:
        models = self.client.request("GET", "/v1/models", "listing served models")
        return models["data"][0]["id"]

    def health(self) -> bool:
        return self.client.healthy()

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        if temperature < 0:
            raise BehaviorError(f"temperature must be 0 or more, not {temperature}")
        if not prompts:
            return []
        rows = [self._prompt_ids(p) for p in prompts]
        answer = self._complete(rows, max_tokens=max_new_tokens, temperature=temperature,
                                seed=seed, doing="generating")
        return [choice["text"] for choice in answer]

    def completion_logprobs(self, prompts: Sequence[str],
                            completions: Sequence[str]) -> list[list[float]]:
        if len(prompts) != len(completions):
            raise BehaviorError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        encoded = [self._encode(p, c) for p, c in zip(prompts, completions)]
        # One request for all, or with `generated` steering one per prompt length: a
        # request's `steer_from` is its rows' last prompt token.
        groups: dict[int | None, list[int]] = {}
        for row, (_, start) in enumerate(encoded):
            groups.setdefault(start - 1 if self._steering_positions == "generated" else None,
                              []).append(row)
        scores: list[list[float]] = [[] for _ in encoded]
        for first, rows in groups.items():
            # prompt_logprobs=0 returns exactly the log-prob of each given token.
            answer = self._complete([encoded[row][0] for row in rows], max_tokens=1,
                                    temperature=0.0, seed=0, prompt_logprobs=0,
                                    doing="scoring completions",
                                    **({"vllm_xargs": {STEER_FROM_ARG: first}} if first is not None else {}))
            for row, choice in zip(rows, answer):
                ids, start = encoded[row]
                per_position = choice["prompt_logprobs"]
                scores[row] = [float(per_position[i][str(ids[i])]["logprob"])
                               for i in range(start, len(ids))]
        return scores

    # Tokenization as the embedded engine does it: the prompt rendered as the model reads
    # it (a chat model's user turn), then a completion is the tokens of prompt+completion
    # after the prompt's; an empty prompt starts from one start token.

    @cached_property
    def _template_tokenizer(self) -> Any:
        """The served folder's tokenizer, for its chat template; None when the folder is
        not on this machine (a remote server), and prompts then go as plain text."""
        folder = Path(self.info.path)
        if not (folder / "tokenizer_config.json").is_file():
            return None
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(folder)

    @property
    def prompt_format(self) -> PromptFormat:
        tokenizer = self._template_tokenizer
        return "plain" if tokenizer is None else prompt_format(tokenizer)

    def with_system(self, system: str, prompt: str) -> str:
        # without the served folder's tokenizer (a remote server) prompts go as plain text
        return system_prompted(self._template_tokenizer, system, prompt)

    def _model_prompt(self, prompt: str) -> str:
        tokenizer = self._template_tokenizer
        return prompt if tokenizer is None else model_prompt(tokenizer, prompt)

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenize(self._model_prompt(prompt)) or [self._start_token_id]

    def _encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        prompt = self._model_prompt(prompt)
        prompt_ids = self.tokenize(prompt)
        full = self.tokenize(prompt + completion)
        if not prompt_ids:
            return [self._start_token_id, *full], 1
        return full, min(len(prompt_ids), len(full))

    @cached_property
    def _start_token_id(self) -> int:
        start = self._described.get("start_token_id")
        if start is None:
            raise BehaviorError("the served tokenizer has no BOS or EOS token to start an "
                                "empty prompt with")
        return int(start)

    def tokenize(self, text: str) -> list[int]:
        answer = self.client.request(
            "POST", "/tokenize", "tokenizing",
            {"model": self.served_model_name, "prompt": text, "add_special_tokens": True})
        return list(answer["tokens"])

    def _complete(self, prompt: list[str] | list[list[int]], doing: str,
                  **sampling: Any) -> list[dict[str, Any]]:
        body = {"model": self.served_model_name, "prompt": prompt, **sampling}
        answer = self.client.request("POST", "/v1/completions", doing, body)
        return sorted(answer["choices"], key=lambda choice: choice["index"])

    def hidden_states(self, prompts: Sequence[str], completions: Sequence[str],
                      layers: Sequence[int],
                      read: ReadPosition = "mean",
                      after_final_norm: bool = False) -> dict[int, Any]:
        raise BehaviorError(
            "reading hidden states is not supported by the vLLM engine",
            hint="extract steering vectors with the embedded engine; the vLLM engine "
                 "serves, steers and takes weight pushes")

    def set_steering(self, vectors: Mapping[int, Any], strength: float,
                     positions: SteerPositions = "all") -> None:
        payload = {"strength": float(strength), "positions": positions,
                   "vectors": {str(int(layer)): _floats(vector)
                               for layer, vector in vectors.items()}}
        self.client.rpc("behaviorc_set_steering", payload, doing="setting steering")
        self._steering_positions = positions
        # Cached prefixes were computed without this steering.
        self.client.reset_prefix_cache()

    def clear_steering(self) -> None:
        self.client.rpc("behaviorc_clear_steering", doing="clearing steering")
        self._steering_positions = "all"
        self.client.reset_prefix_cache()

    def load_weights(self, source: Path | Mapping[str, Any]) -> None:
        push_weights([self.url], source, api_key=self.api_key)


def _floats(vector: Any) -> list[float]:
    if hasattr(vector, "detach"):
        vector = vector.detach().float().cpu().reshape(-1).tolist()
    return [float(x) for x in vector]
