"""lm-evaluation-harness's `local-completions` against the server equals the same harness in-process on
our model (accuracy, every loglikelihood to 1e-3, every generation), for the base and an adapter."""

import numpy as np
import pytest
from _serving_tiny import alone, random_vera, tiny, word_tokenizer

pytest.importorskip("lm_eval")
from experiments import lm_eval_server  # noqa: E402 (needs lm_eval)


def test_lm_eval_through_the_server_equals_lm_eval_in_process(tmp_path):
    model, params, _ = tiny("llama")
    tok = word_tokenizer()
    rng = np.random.RandomState(0)
    words = lambda ids: " ".join(tok.convert_ids_to_tokens([int(i) for i in ids]))  # noqa: E731
    mc = [(words(rng.randint(3, 100, 4)), [words(rng.randint(3, 100, 1 + j % 2)) for j in range(4)], i % 4)
          for i in range(10)]
    gen = []
    for i in range(10):
        ids = rng.randint(3, 100, 5)
        out = alone(model, params, ids.tolist(), lm_eval_server.MAX_GEN_TOKS)
        gen.append((words(ids), tok.decode(out, skip_special_tokens=True) if i % 2 else words(out[:1])))
    record = lm_eval_server.evaluate(model, params, tok, {"a": random_vera(params, ("query", "value"), 0, 8, key=5)},
                                     tmp_path, mc, gen, max_length=64, slots=4, num_concurrent=4)
    for name in ("base", "a"):
        r = record["models"][name]
        assert r["server"]["acc"] == r["in_process"]["acc"], name
        assert r["server"]["exact_match"] == r["in_process"]["exact_match"], name
        assert r["max_abs_loglikelihood_diff"] <= 1e-3 and r["generations_equal"], name
        assert len(r["server_loglikelihoods"]) == 10 and all(len(x) == 4 for x in r["server_loglikelihoods"])
    assert record["models"]["base"]["server"]["exact_match"] >= 0.5          # the odd docs' targets are its output
    assert record["models"]["base"]["server_loglikelihoods"] != record["models"]["a"]["server_loglikelihoods"]
