"""One prompt format shared by generation, training and evaluation, as the checkpoint's template says.

    .venv/bin/pytest tests/unit/models/test_families.py -q

`ChatFormat` (from `checkpoints.load_format(path)`) renders a prompt x with the tokenizer's chat template
(one user turn, a system turn if the row has one, `add_generation_prompt=True`) or, without a template,
with `PLAIN_TEMPLATE`. The rules every family needs (docs/concepts.md, "Real checkpoints"):

- y is tokenized in context: its ids are those the rendered [user, assistant] conversation has after
  the rendered prompt, up to and including the end-of-turn token (what the model generates; "586" alone
  is ['▁5', '86'] for a SentencePiece tokenizer, after "<|assistant|>\\n" it is ['58', '6']). A template
  whose prompt is not a token prefix of the conversation is refused in one line.
- BOS once: prepended only when the tokenizer's post-processor adds one and the template did not write it.
- `stop_ids`: every id that ends an answer (the template's end of turn first, then generation_config's
  EOS list and the tokenizer's EOS); engines stop at all of them, `cut`/`decode` too.
- `pad_id`: the pad token, or the end of turn when there is none (padding sits under an attention mask).

Truncation (one rule, `response_budget`): prompts are never cut; every response (y, y', y0) keeps at most
min(data.max_response_tokens, training.max_length - prompt tokens) tokens, at least one, so prompt +
response fits in training.max_length whenever the prompt leaves room. A cut response loses its end of turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tspin_ray.errors import UserError

# Fallback for base models with no chat template (the Alpaca-style layout most SFT recipes use).
PLAIN_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "
_PROBE = ("1+2=", "3")  # a conversation rendered once to find the template's end-of-turn token


def response_budget(prompt_len: int, max_response_tokens: int, max_length: int) -> int:
    """Most response tokens a row keeps: min(max_response_tokens, max_length - prompt_len), at least 1.

    >>> response_budget(10, 512, 64), response_budget(60, 512, 64), response_budget(64, 512, 64)
    (54, 4, 1)
    """
    return max(1, min(max_response_tokens, max_length - prompt_len))


@dataclass(frozen=True, eq=False)
class ChatFormat:
    tokenizer: PreTrainedTokenizerBase
    stop_ids: tuple[int, ...]  # end of turn first
    pad_id: int
    bos_id: int | None  # prepended to rendered text that does not start with it (None: never)

    @property
    def end_of_turn(self) -> int:
        return self.stop_ids[0]

    def render(self, prompt: str, system: str = "", response: str | None = None, history: str = "") -> str:
        """The text of the prompt (response None: ready for the answer) or of the whole exchange. `history`:
        earlier turns as a JSON list of {role, content} (data.turns: last), between system and prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            if history:
                raise UserError("data.turns: last needs a tokenizer with a chat template (earlier turns have "
                                "no place in the plain layout)")
            return PLAIN_TEMPLATE.format(prompt=prompt) + (response or "")
        messages = ([{"role": "system", "content": system}] if system else []) + (json.loads(history) if history else [])
        messages.append({"role": "user", "content": prompt})
        if response is None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                  tokenize=False)

    def encode(self, text: str) -> list[int]:
        """Ids of rendered text, with BOS exactly once (the template's own, or the tokenizer's)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.bos_id] + ids if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def prompt_ids(self, prompt: str, system: str = "", history: str = "") -> list[int]:
        return self.encode(self.render(prompt, system, history=history))

    def response_ids(self, prompt: str, response: str, system: str = "", max_tokens: int | None = None,
                     history: str = "") -> list[int]:
        """y's ids as the model sees them after the prompt, end of turn included; cut to `max_tokens`."""
        return self._tail(self.prompt_ids(prompt, system, history), prompt, response, system, max_tokens, history)

    def example_ids(self, prompt: str, response: str, system: str, max_response_tokens: int,
                    max_length: int, history: str = "") -> tuple[list[int], list[int]]:
        """(prompt ids, y ids) of one training row, y cut by `response_budget`; the prompt rendered once."""
        head = self.prompt_ids(prompt, system, history)
        budget = response_budget(len(head), max_response_tokens, max_length)
        return head, self._tail(head, prompt, response, system, budget, history)

    def _tail(self, head: list[int], prompt: str, response: str, system: str, max_tokens: int | None,
              history: str = "") -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):  # plain layout: the answer follows as written
            tail = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        else:
            full = self.encode(self.render(prompt, system, response, history))
            if full[:len(head)] != head:
                at = next((i for i, (a, b) in enumerate(zip(head, full, strict=False)) if a != b), len(full))
                raise UserError(f"the chat template is not prefix-stable: the rendered prompt of {prompt[:40]!r} "
                                f"is not the start of the rendered conversation (token {at} differs), so y "
                                f"cannot be tokenized in context; use a template whose prompt is a prefix")
            tail = full[len(head):]
            end = next((i for i, t in enumerate(tail) if t in self.stop_ids), None)
            if end is None:
                raise UserError(f"the chat template ends the assistant turn with no end-of-turn token "
                                f"(declared: {list(self.stop_ids)}); set eos_token_id in generation_config.json")
            tail = tail[:end + 1]
        return tail if max_tokens is None else tail[:max_tokens]

    def cut(self, ids: Sequence[int]) -> list[int]:
        """Generated ids up to and including the first stop id (all of them when none was produced)."""
        ids = list(ids)
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        return ids if end is None else ids[:end + 1]

    def ends(self, ids: Sequence[int]) -> bool:
        """Whether generated ids (cut) end at a stop id, i.e. the answer finished within its token limit."""
        return len(ids) > 0 and int(ids[-1]) in self.stop_ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids up to the first stop id, without special tokens."""
        ids = self.cut(ids)
        if self.ends(ids):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def chat_format(tokenizer: PreTrainedTokenizerBase, generation_eos: Sequence[int] = ()) -> ChatFormat:
    """The format of `tokenizer`, whose model declares `generation_eos` (generation_config.json)."""
    declared = list(dict.fromkeys(i for i in [*generation_eos, tokenizer.eos_token_id] if i is not None))
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    probe = ChatFormat(tokenizer, tuple(declared), 0, bos if adds_bos else None)
    if getattr(tokenizer, "chat_template", None):
        head = probe.prompt_ids(_PROBE[0])
        tail = probe.encode(probe.render(*_PROBE[:1], response=_PROBE[1]))[len(head):]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        # The template's end of turn: the first declared stop id in the assistant turn, else its first
        # special token (a template may close turns with a token generation_config does not list).
        end = next((t for t in tail if t in declared), None)
        end = next((t for t in tail if t in special), None) if end is None else end
        if end is None:
            raise UserError("the chat template ends the assistant turn with no special token and the model "
                            "declares no EOS (eos_token_id in generation_config.json or the tokenizer)")
        declared = [end] + [i for i in declared if i != end]
    if not declared:
        raise UserError("the tokenizer has no eos_token and generation_config.json declares no eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else declared[0]
    return ChatFormat(tokenizer, tuple(declared), pad, probe.bos_id)
