"""Structured outputs (issue #25, part 2): response_format through a token-level grammar mask in the batched
sampler, so even a 135M model returns schema-valid JSON; free requests in the same batch are unaffected."""

from __future__ import annotations

import concurrent.futures
import enum
import json
from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field

from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.grammar import Guided
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.server import create_app

# fp32 compute: what these tests check exactly (logprobs vs the forward pass, batched == solo tokens) holds in
# fp32; CPUs with native bf16 now run a bf16 engine in bf16 by default
FP32 = "fp32"

pytestmark = pytest.mark.slow


class Kind(str, enum.Enum):
    capital = "capital"
    town = "town"


class Place(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


class City(BaseModel):  # nested object, enum, array, integer; bounded, as a 135M model repeats itself greedily
    place: Place
    kind: Kind
    population_millions: int = Field(ge=0, le=100_000)
    landmarks: list[Annotated[str, Field(max_length=24)]] = Field(max_length=3)


CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Vienna", "Prague", "Warsaw", "Oslo", "Dublin", "Athens",
          "Cairo", "Tokyo", "Lima", "Quito", "Ottawa", "Canberra", "Nairobi", "Hanoi", "Seoul"]


@pytest.fixture(scope="module")
def client(smollm2_engine):
    engine = LLMEngine(str(smollm2_engine), device="cpu", dtype=FP32, session_len=1024)
    with BackgroundServer(create_app(engine, "smollm2")) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)


def test_parse_returns_a_valid_instance_for_20_prompts(client):
    """The client's parse() with a Pydantic model: 20 requests at once, every one a valid City."""
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse

    def ask(city: str):
        return parse(model="smollm2", messages=[{"role": "user", "content": f"Describe {city} as JSON."}],
                     response_format=City, temperature=0, max_tokens=200)

    with concurrent.futures.ThreadPoolExecutor(len(CITIES)) as pool:
        replies = list(pool.map(ask, CITIES))
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(reply.choices[0].message.parsed, City)


def test_json_object_and_bad_schemas(client):
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi."}],
                                           response_format={"type": "json_object"}, temperature=0, max_tokens=64)
    json.loads(reply.choices[0].message.content)  # whatever the model meant, it is JSON
    for schema, words in (({"type": "strnig"}, 'Unsupported type "strnig"'),
                          ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum greater than maximum")):
        with pytest.raises(openai.BadRequestError, match=words) as failed:
            client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert failed.value.body["param"] == "response_format"


def test_constrained_and_free_requests_share_a_batch(smollm2_engine):
    """8 constrained + 8 free requests in one batch: each free answer is its solo answer, token for token."""
    smol = LLMEngine(str(smollm2_engine), device="cpu", dtype=FP32, session_len=1024)
    prompts = [smol.apply_chat_template([{"role": "user", "content": f"Tell me about {c}."}]) for c in CITIES[:8]]
    free = SamplingParams(max_tokens=12, temperature=0)
    constrained = SamplingParams(max_tokens=40, temperature=0, guided=Guided.json(City.model_json_schema()))
    solo = [smol.generate([p], free)[0].token_ids for p in prompts]
    mixed = smol.generate(prompts + prompts, [constrained] * 8 + [free] * 8)
    assert [o.token_ids for o in mixed[8:]] == solo
    for out in mixed[:8]:  # cut at 40 tokens or complete: what was generated is a prefix the grammar allowed
        assert out.text.lstrip().startswith("{")
        if out.finish_reason == "stop":
            City.model_validate_json(out.text)
