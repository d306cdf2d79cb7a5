"""The OpenAI request layer: valid bodies become engine parameters; every bad one is a 4xx whose
OpenAI-style body names the parameter."""
import json

import pytest

from draftpick.deploy.openai_protocol import ProtocolError, error_body, parse

DRAFTERS = ["ngram", "chat", "none"]


def ok(body, kind="completion"):
    return parse(json.dumps(body), kind, "m", DRAFTERS, max_k=16, max_tokens_limit=512, policies=["contextual", "ucb1"])


def test_a_completion_and_a_chat_request_become_engine_parameters():
    r = ok({"model": "m", "prompt": "def f(x):", "max_tokens": 40, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
            "seed": 2**64 - 1, "stop": "\n\n", "stream": True, "stream_options": {"include_usage": True},
            "draftpick": {"drafter": "ngram", "num_speculative_tokens": 4, "context": "code"}})
    assert r.input == {"prompt": "def f(x):"} and r.stream and r.include_usage
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (40, 0.7, 0.9, 5, 2**64 - 1, ("\n\n",))
    assert r.options.drafter == "ngram" and r.options.num_speculative_tokens == 4 and r.options.context == "code"
    c = ok({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8,
            "temperature": 0, "n": 1, "presence_penalty": 0, "logprobs": False}, "chat")
    assert c.input == {"messages": [{"role": "user", "content": "hi"}]} and c.params.greedy and c.params.max_tokens == 8
    assert ok({"model": "m", "prompt": [1, 2, 3]}).input == {"prompt_token_ids": [1, 2, 3]}
    assert ok({"model": "m", "prompt": "x"}).params.max_tokens == 16  # OpenAI's default for completions


BAD = [
    (b"{not json", None, 400),
    (b"[1, 2]", None, 400),
    ({"prompt": "x"}, "model", 400),
    ({"model": "other", "prompt": "x"}, "model", 404),
    ({"model": "m"}, "prompt", 400),
    ({"model": "m", "prompt": ""}, "prompt", 400),
    ({"model": "m", "prompt": []}, "prompt", 400),
    ({"model": "m", "prompt": 5}, "prompt", 400),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", 400),
    ({"model": "m", "prompt": "x", "max_tokens": 100000}, "max_tokens", 400),
    ({"model": "m", "prompt": "x", "max_tokens": "ten"}, "max_tokens", 400),
    ({"model": "m", "prompt": "x", "temperature": -0.5}, "temperature", 400),
    ({"model": "m", "prompt": "x", "temperature": 1e-9}, "temperature", 400),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "temperature", 400),
    (b'{"model": "m", "prompt": "x", "temperature": Infinity}', "temperature", 400),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p", 400),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed", 400),
    ({"model": "m", "prompt": "x", "seed": 2**64}, "seed", 400),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop", 400),
    ({"model": "m", "prompt": "x", "n": 2}, "n", 400),
    ({"model": "m", "prompt": "x", "logprobs": 5}, "logprobs", 400),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty", 400),
    ({"model": "m", "prompt": "x", "frequency_penalty": 1}, "frequency_penalty", 400),
    ({"model": "m", "prompt": "x", "logit_bias": {"5": 10}}, "logit_bias", 400),
    ({"model": "m", "prompt": "x", "best_of": 3}, "best_of", 400),
    ({"model": "m", "prompt": "x", "draftpick": {"drafter": "eagle"}}, "draftpick.drafter", 400),
    ({"model": "m", "prompt": "x", "draftpick": {"num_speculative_tokens": 99}}, "draftpick.num_speculative_tokens", 400),
    ({"model": "m", "prompt": "x", "draftpick": {"policy": "nope"}}, "draftpick.policy", 400),
    ({"model": "m", "prompt": "x", "draftpick": {"context": "has spaces"}}, "draftpick.context", 400),
    ({"model": "m", "prompt": "x", "draftpick": {"unknown": 1}}, "draftpick.unknown", 400),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage", 400),
]


@pytest.mark.parametrize("body,param,status", BAD)
def test_a_bad_request_is_a_4xx_naming_the_parameter(body, param, status):
    raw = body if isinstance(body, bytes) else json.dumps(body)
    with pytest.raises(ProtocolError) as e:
        parse(raw, "completion", "m", DRAFTERS, max_k=16, max_tokens_limit=512, policies=["contextual"])
    code, out = error_body(e.value)
    assert code == status and 400 <= code < 500
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"]
    assert out["error"]["param"] == param


@pytest.mark.parametrize("messages,param", [([], "messages"), ([{"role": "robot", "content": "x"}], "messages.0.role"),
                                            ([{"role": "user"}], "messages.0.content"), ("hi", "messages")])
def test_bad_chat_messages_are_named(messages, param):
    with pytest.raises(ProtocolError) as e:
        parse(json.dumps({"model": "m", "messages": messages}), "chat", "m", DRAFTERS, 16, 512)
    assert e.value.param == param and e.value.status == 400
