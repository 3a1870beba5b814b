"""Training data: chat rendering, tokenization, the seeded general-data mix."""

from __future__ import annotations

import pytest

from behaviorc import ir
from behaviorc.diagnostics import BehaviorError, Location
from behaviorc.train.data import BatchSchedule, TrainSequence, encode_examples, encode_texts, render_chat

LOC = Location(file="b.behavior", line=3, column=5, end_line=3, end_column=12)


@pytest.fixture(scope="module")
def tokenizer(tiny_dense):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dense)


def test_chat_renders_with_the_template_and_the_reply_is_the_response(tokenizer):
    messages = (ir.ChatMessage(role="user", content="Keep it short."),
                ir.ChatMessage(role="assistant", content="Sure."))
    context, response = render_chat(tokenizer, messages)
    assert context == "<|im_start|>user\nKeep it short.<|im_end|>\n<|im_start|>assistant\n"
    assert response == "Sure.<|im_end|>\n"
    [sequence] = encode_examples(tokenizer, [ir.Example(messages=messages)])
    assert tokenizer.decode(sequence.response) == response
    assert tokenizer.decode(sequence.context) == context


@pytest.fixture()
def plain_tokenizer(tiny_dense):
    """The same tokenizer without a chat template: a base model, not a chat model."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_dense)
    tokenizer.chat_template = None
    return tokenizer


def test_plain_examples_and_general_texts(plain_tokenizer):
    tokenizer = plain_tokenizer
    [example] = encode_examples(tokenizer, [ir.Example(context="Which parser?", response=" The existing one.")])
    assert tokenizer.decode(example.context + example.response) == "Which parser? The existing one."
    assert tokenizer.decode(example.response) == " The existing one."
    [text] = encode_texts(tokenizer, ["Rain fell all night."])
    assert text.context == (tokenizer.eos_token_id,)  # every token of a general text is trained
    assert tokenizer.decode(text.response) == "Rain fell all night."


def test_a_chat_model_reads_an_examples_context_as_the_users_turn(tokenizer):
    [example] = encode_examples(tokenizer, [ir.Example(context="Which parser?", response="The existing one.")])
    assert tokenizer.decode(example.context) == "<|im_start|>user\nWhich parser?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(example.response) == "The existing one."
    # general texts and already formatted transcripts are read as written
    [text] = encode_texts(tokenizer, ["Rain fell all night."])
    assert tokenizer.decode(text.context + text.response) == "<|endoftext|>Rain fell all night."
    formatted = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    [example] = encode_examples(tokenizer, [ir.Example(context=formatted, response="Hello.")])
    assert tokenizer.decode(example.context) == formatted


def test_bad_examples_are_located_errors(tokenizer):
    with pytest.raises(BehaviorError, match="must end with an assistant") as caught:
        encode_examples(tokenizer, [ir.Example(messages=(ir.ChatMessage(role="user", content="Hi"),))], LOC)
    assert caught.value.diagnostics[0].loc == LOC
    with pytest.raises(BehaviorError, match="example 2 has an empty response"):
        encode_examples(tokenizer, [ir.Example(context="a", response="b"), ir.Example(context="a")], LOC)


def _pool(tag: int, n: int) -> list[TrainSequence]:
    return [TrainSequence((tag,), (i,)) for i in range(n)]


def test_mix_takes_the_ratio_exactly_and_is_a_function_of_seed_and_step():
    behavior, general = _pool(1, 10), _pool(2, 7)
    quarter = BatchSchedule(behavior, general, batch=8, ratio=0.25, seed=0)
    assert all(sum(s.context == (2,) for s in quarter.at(step)) == 2 for step in range(20))

    uneven = BatchSchedule(behavior, general, batch=4, ratio=0.3, seed=0)
    assert sum(uneven.general_count(step) for step in range(10)) == 12  # 0.3 * 4 * 10
    assert all(len(uneven.at(step)) == 4 for step in range(10))

    again = BatchSchedule(behavior, general, batch=4, ratio=0.3, seed=0)
    assert [again.at(s) for s in (7, 3, 0)] == [uneven.at(s) for s in (7, 3, 0)]
    other = BatchSchedule(behavior, general, batch=4, ratio=0.3, seed=1)
    assert [other.at(s) for s in range(5)] != [uneven.at(s) for s in range(5)]

    # every behavior example is seen once per epoch
    epoch = [s for step in range(5) for s in BatchSchedule(behavior, [], 2, 0.0, 3).at(step)]
    assert sorted(s.response for s in epoch) == [(i,) for i in range(10)]
