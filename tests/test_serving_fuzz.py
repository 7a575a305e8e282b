"""schemathesis against the live server's own OpenAPI schema: a bounded number of generated
requests per operation, valid and invalid, each answered without a 5xx, with a documented status,
content type and body; then a valid request still returns the tokens it returned before."""

import httpx
import pytest
from _serving_tiny import live_server, random_vera, tiny, word_tokenizer

import vera_jax
from vera_jax.serving import AdapterBank, Engine
from vera_jax.serving.server import create_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (hypothesis comes with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

KEY = "fuzz-key"
ADAPTER = "fuzz-target-adapter"       # a name the fuzzer will not guess, so DELETE never hits it
VALID = {"model": ADAPTER, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
EXAMPLES = 8                          # per operation and mode (valid, invalid): ~150 requests in all


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(url, token ids of VALID before any fuzzing); the adapter root is empty, so fuzzed loads all fail."""
    root = tmp_path_factory.mktemp("fuzz")
    model, params, hf_config = tiny("llama")
    vera_jax.save_adapter(root / "adapter", random_vera(params, ("query", "value"), 0, 8, key=7))
    (root / "empty-root").mkdir()
    bank = AdapterBank(params, hf_config)
    bank.load(ADAPTER, root / "adapter")
    engine = Engine(model, bank, slots=4, max_length=32, tokenizer=word_tokenizer())
    app = create_app(engine, bank, default_max_tokens=3, api_key=KEY, adapter_root=root / "empty-root")
    with live_server(app) as url:
        before = post_valid(url)
        yield url, before


def post_valid(url: str) -> list[int]:
    answer = httpx.post(f"{url}/v1/completions", json=VALID, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["token_ids"]


def test_fuzzed_requests_get_no_5xx_and_answers_that_follow_the_schema(live):
    url = live[0]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schemathesis.openapi.from_url(f"{url}/openapi.json").get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def call(case):
                case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                       checks=checks)

            try:
                call()
            except Unsatisfiable:                   # no invalid request exists (a route without inputs)
                assert mode is GenerationMode.NEGATIVE and not operation.body, operation.label


def test_after_the_fuzzing_a_valid_request_returns_the_same_tokens(live):
    url, before = live
    assert post_valid(url) == before
    assert httpx.get(f"{url}/health", timeout=30).json()["engine"]["active"] == 0
