"""The real `openai` client against a SmolLM2-135M-Instruct engine: models, chat (plain and streamed), completions."""

from __future__ import annotations

import openai
import pytest

from lmconvert.runtime import LLMEngine
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.server import create_app

# fp32 compute: what these tests check exactly (logprobs vs the forward pass, batched == solo tokens) holds in
# fp32; CPUs with native bf16 now run a bf16 engine in bf16 by default
FP32 = "fp32"

pytestmark = pytest.mark.slow
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_engine):
    # overlapped stepping (a GPU's default) on CPU too: streaming, stop strings and limits go through lookaheads
    engine = LLMEngine(str(smollm2_engine), device="cpu", dtype=FP32, session_len=1024, overlap=True)
    with BackgroundServer(create_app(engine, "smollm2", api_keys=("sk-local",))) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-local", max_retries=0, timeout=300)


def test_model_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]


def test_chat_answers_paris(client):
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, seed=1)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert reply.id.startswith("chatcmpl-") and reply.created > 0 and reply.object == "chat.completion"
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_matches_plain_answer(client):
    plain = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_completion_tokens=24)
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0,
                                                 max_completion_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_with_stop_and_length(client):
    stopped = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                        max_tokens=16, stop=["."])
    assert "Paris" in stopped.choices[0].text and "." not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    cut = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2


def test_client_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="session length"):
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    anonymous = client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


# ---- logprobs (issue #25, part 3) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(smollm2_engine):
    """The engine's own cache-free forward pass: log-softmax of the logits of prompt + answer."""
    import torch

    engine = LLMEngine(str(smollm2_engine), device="cpu", dtype=FP32, session_len=1024)

    def logprobs(messages, answer_ids):
        prompt = engine.apply_chat_template(messages) if messages else []
        return torch.log_softmax(engine.logits(prompt + answer_ids), -1)[len(prompt) - 1:-1]

    return engine, logprobs


def test_chat_logprobs_match_the_models_distribution(client, reference):
    engine, logprobs = reference
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16,
                                           logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    ids = engine.tokenizer(reply.choices[0].message.content, add_special_tokens=False)["input_ids"]
    ref = logprobs(QUESTION, ids)
    assert len(ids) == len(content)
    for i, (token_id, entry) in enumerate(zip(ids, content)):
        assert abs(entry.logprob - ref[i, token_id].item()) <= 1e-4
        assert len(entry.top_logprobs) == 5 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert abs(values[1] - ref[i].topk(2).values[1].item()) <= 1e-4
        assert bytes(entry.bytes) == entry.token.encode()


def test_streamed_logprobs_equal_the_plain_ones(client):
    kwargs = dict(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed] == \
           [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in plain]


def test_completion_logprobs_shape(client):
    reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                                      temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = [t for chunk in client.completions.create(model="smollm2", prompt="The capital of France is",
                                                           max_tokens=6, temperature=0, logprobs=3, stream=True)
                for t in (chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else [])]
    assert streamed == lp.tokens
    plain = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None  # not asked, not computed
