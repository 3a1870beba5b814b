"""The teacher's distribution: what `objective kl` and `anchor kl` train toward.

Training on a steered model's samples (`objective sft`) teaches the plain model the
tokens the teacher happened to say; it cannot teach what the teacher would NOT have
said, and on the real model much of a steering's effect is exactly that (the plain
replies becoming unlikely). Here the student learns the teacher's whole next-token
distribution at every position that predicts a response token: the forward KL
KL(teacher || student), whose minimum is the teacher itself.

The distributions are computed once, before training, with the base weights: the
teacher reads its own context (the prompt with the teacher's system prompt, for a prompt
teacher) followed by the response's tokens, with the behavior's steering on for a
steered teacher (at its positions: with `generated`, from the context's last token on),
and off for the general-data anchor (`anchor kl`: the base model as it was). Each
position keeps its `top_k` tokens' log-probs and one lumped outcome, "any
other token", whose log-prob is what the k leave, so a sample set of R positions costs
R x (k + 1) numbers, not R x vocabulary. The student's distribution is lumped over the
same k tokens, so the KL is over k + 1 outcomes and is exact for k = the vocabulary
(`top_k all`). At temperature T both distributions are softmaxes of logits / T and the
KL is multiplied by T^2, so its gradient keeps its size whatever T (Hinton et al. 2015).

A teacher that loops ("Aye, aye, aye, ...") puts its mass on the next repeat, and its
student learns the loop. With `no_repeat n` a reply's row is read as no-repeat decoding
would read it: before the top k are taken, every token that would repeat an n-gram of
the response so far gets probability 0 and the others are renormalized, so the student
learns what the teacher says instead of repeating itself (README, "Defaults").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from behaviorc.core.vocabulary import SteerPositions
from behaviorc.engine.hooks import add_to_output, steering_addition
from behaviorc.train.data import TrainSequence
from behaviorc.train.frozen import padded_ids

TEACHER_BATCH = 8  # sequences per teacher forward: [batch, length, vocab] logits in memory


@dataclass(frozen=True)
class TeacherRow:
    """One sequence the student trains on with a teacher: the student reads `sequence`
    (its context, then the response), the teacher reads `context` then the same response
    tokens."""

    sequence: TrainSequence
    context: tuple[int, ...]
    steered: bool  # the behavior's steering on while the teacher reads it
    weight: float  # of this sequence's KL beside the other losses
    temperature: float
    no_repeat: int = 0  # n > 0: no token that repeats an n-gram of the response (`repeat_bans`)


@dataclass(frozen=True)
class Distribution:
    """The teacher's next-token distributions over one response's positions."""

    tokens: torch.Tensor  # [R, k] the top-k token ids
    logprobs: torch.Tensor  # [R, k] their log-probs at `temperature`
    rest: torch.Tensor  # [R] log-prob of every other token together (-inf when k covers all)
    weight: float
    temperature: float

    @property
    def numbers(self) -> int:
        return self.tokens.numel() + self.logprobs.numel() + self.rest.numel()


@dataclass(frozen=True)
class Teacher:
    """The teacher's rows and how to read them; `distributions` computes them where the
    training runs, with the model it trains, before its first step."""

    rows: tuple[TeacherRow, ...]
    directions: Mapping[int, torch.Tensor]
    strength: float
    top_k: int  # 0: the whole vocabulary
    positions: SteerPositions = "all"  # where the steering adds (the vectors' own)

    @torch.no_grad()
    def distributions(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module],
                      pad_id: int) -> dict[TrainSequence, Distribution]:
        param = next(model.parameters())
        deltas = {layer: (self.strength * vector.float()).to(param.device, param.dtype)
                  for layer, vector in self.directions.items()}
        found: dict[TrainSequence, Distribution] = {}
        for steered in (False, True):
            rows = [r for r in self.rows if r.steered == steered]
            for start in range(0, len(rows), TEACHER_BATCH):
                batch = rows[start:start + TEACHER_BATCH]
                first = torch.tensor([len(r.context) - 1 for r in batch])
                hooks = [layers[layer].register_forward_hook(
                    add_to_output(steering_addition(delta, self.positions, first)))
                    for layer, delta in deltas.items()] if steered else []
                try:
                    found.update(self._read(model, batch, pad_id))
                finally:
                    for handle in hooks:
                        handle.remove()
        return found

    def _read(self, model: torch.nn.Module, batch: Sequence[TeacherRow],
              pad_id: int) -> dict[TrainSequence, Distribution]:
        device = next(model.parameters()).device
        texts = [r.context + r.sequence.response for r in batch]
        ids = padded_ids(texts, pad_id, device)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            mask[row, :len(text)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        found = {}
        for row, r in enumerate(batch):
            first = len(r.context) - 1  # the position that predicts the first response token
            span = logits[row, first:first + len(r.sequence.response)].float() / r.temperature
            logprobs = torch.log_softmax(span, dim=-1)
            if r.no_repeat:
                logprobs = _without(logprobs, repeat_bans(r.sequence.response, r.no_repeat))
            k = logprobs.shape[-1] if self.top_k == 0 else min(self.top_k, logprobs.shape[-1])
            top, tokens = logprobs.topk(k, dim=-1)
            rest = (logprobs.scatter(-1, tokens, float("-inf")).logsumexp(-1) if k < logprobs.shape[-1]
                    else torch.full(top.shape[:1], float("-inf"), device=top.device))
            found[r.sequence] = Distribution(tokens, top, rest, r.weight, r.temperature)
        return found


def repeat_bans(response: Sequence[int], n: int) -> list[tuple[int, int]]:
    """(position, token) pairs where placing `token` at `position` of `response` would
    repeat an n-gram that the response already holds before it (its context excluded: a
    reply may quote its prompt), as no-repeat decoding bans them."""
    seen: dict[tuple[int, ...], set[int]] = {}
    bans: list[tuple[int, int]] = []
    for position in range(n - 1, len(response)):
        prefix = tuple(response[position - n + 1:position])
        bans.extend((position, token) for token in sorted(seen.get(prefix, ())))
        seen.setdefault(prefix, set()).add(response[position])
    return bans


def _without(logprobs: torch.Tensor, bans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """`logprobs` [R, vocab] with the banned (position, token)s at probability 0 and each
    position's other tokens renormalized; a position whose every likely token is banned
    keeps its distribution (it cannot happen with a real vocabulary, but a division by 0
    must not)."""
    if not bans:
        return logprobs
    positions, tokens = zip(*bans)
    banned = logprobs.index_put((torch.tensor(positions, device=logprobs.device),
                                 torch.tensor(tokens, device=logprobs.device)),
                                torch.tensor(float("-inf"), device=logprobs.device))
    left = banned.logsumexp(-1, keepdim=True)
    return torch.where(torch.isfinite(left), banned - left, logprobs)


def lumped_kl(student_logits: torch.Tensor, tokens: torch.Tensor, teacher_logprobs: torch.Tensor,
              teacher_rest: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Per position [N], T^2 x KL(teacher || student) over the teacher's k tokens and the
    rest of the vocabulary lumped into one outcome. `student_logits` [N, vocab] (with
    gradient), `tokens`/`teacher_logprobs` [N, k], `teacher_rest` [N], `temperature` [N]."""
    logq = torch.log_softmax(student_logits.float() / temperature[:, None], dim=-1)
    logq_k = logq.gather(-1, tokens)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - logq_k)).sum(-1)
    if tokens.shape[-1] < logq.shape[-1]:  # else there is no rest (a logsumexp over nothing)
        logq_rest = logq.scatter(-1, tokens, float("-inf")).logsumexp(-1)
        kl = kl + teacher_rest.exp() * (teacher_rest - logq_rest)
    return kl * temperature * temperature


def kl_loss_sum(logits: torch.Tensor, rows: Sequence[tuple[int, int, Distribution]]) -> torch.Tensor:
    """Summed weighted KL of the batch rows that have a teacher: `rows` holds (row, the
    position in `logits` [B, S, vocab] that predicts its first response token, its
    teacher's distribution)."""
    spans = [logits[row, first:first + d.tokens.shape[0]] for row, first, d in rows]
    tokens = torch.cat([d.tokens for _, _, d in rows])
    teacher = torch.cat([d.logprobs for _, _, d in rows])
    rest = torch.cat([d.rest for _, _, d in rows])
    device = tokens.device
    temperature = torch.cat([torch.full((d.tokens.shape[0],), d.temperature, device=device) for _, _, d in rows])
    weight = torch.cat([torch.full((d.tokens.shape[0],), d.weight, device=device) for _, _, d in rows])
    return (weight * lumped_kl(torch.cat(spans), tokens, teacher, rest, temperature)).sum()
