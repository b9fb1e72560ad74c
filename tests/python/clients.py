"""The official `ollama` and `openai` Python clients, pointed at maitre.

Run by the Rust e2e test `clients::official_python_clients_work_through_maitre`
(tests/e2e/clients.rs), which starts the fake Ollama and maitre and sets
MAITRE_URL. Exits non-zero on any failure.
"""

import json
import os
import sys

import ollama
import openai

url = os.environ["MAITRE_URL"]
client = ollama.Client(host=url)

# list
models = client.list()
names = [m.model for m in models.models]
assert any(n.startswith("fake") for n in names), names

# chat, streamed token by token
person = ollama.Client(host=url, headers={"X-Priority": "realtime"})
parts = list(person.chat(model="fake", messages=[{"role": "user", "content": "hi"}], stream=True,
                         options={"num_predict": 4}))
assert len(parts) == 5, parts
assert parts[-1].done, parts[-1]
text = "".join(p.message.content for p in parts)
assert text.strip(), parts

# generate, not streamed
g = client.generate(model="fake", prompt="hi", options={"num_predict": 3})
assert g.done and g.response.strip(), g

# generate, streamed
gs = list(client.generate(model="fake", prompt="hi", stream=True, options={"num_predict": 3}))
assert len(gs) == 4 and gs[-1].done, gs

# chat, not streamed, with thinking and tool calls: maitre asks the upstream
# for a stream and folds it into the answer the client expects
tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                            "parameters": {"type": "object", "properties": {}}}}]
tc = client.chat(model="fake", messages=[{"role": "user", "content": "weather?"}], tools=tools,
                 think=True, options={"num_predict": 6})
assert tc.done and tc.eval_count == 6, tc
assert tc.message.thinking == "think0 think1 think2 ", tc
assert [t.function.name for t in tc.message.tool_calls] == ["get_weather"], tc
assert tc.message.tool_calls[0].function.arguments == {"alpha": "tok", "zeta": 0}, tc

# generate, not streamed, in format json
gj = client.generate(model="fake", prompt="hi", format="json", options={"num_predict": 3})
assert json.loads(gj.response) == {"t0": 0, "t1": 1, "t2": 2}, gj

# embed
e = client.embed(model="fake", input=["a", "b"])
assert len(e.embeddings) == 2, e

# an error keeps Ollama's shape: the client raises ResponseError with the status
try:
    client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("expected an error for an unknown model")
except ollama.ResponseError as err:
    assert err.status_code == 404, err

# OpenAI-compatible streamed chat on /v1
oa = openai.OpenAI(base_url=url + "/v1", api_key="ollama", max_retries=0)
stream = oa.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                    stream=True, max_tokens=4)
chunks = list(stream)
content = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
assert content.strip(), chunks
assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks), chunks

full = oa.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
assert full.choices[0].message.content.strip(), full
assert full.usage.completion_tokens == 3, full.usage

# not streamed, with reasoning and a tool call
oa_tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
called = oa.chat.completions.create(model="fake", messages=[{"role": "user", "content": "weather?"}],
                                    tools=oa_tools, reasoning_effort="low",
                                    extra_headers={"X-Fake-Tokens": "3"})
choice = called.choices[0]
assert choice.finish_reason == "tool_calls", called
assert choice.message.tool_calls[0].function.name == "get_weather", called
assert json.loads(choice.message.tool_calls[0].function.arguments) == {"alpha": "tok", "zeta": 0}, called
assert choice.message.content == "tok2 ", called
assert getattr(choice.message, "reasoning", None) == "think0 ", called
assert called.usage.completion_tokens == 3, called.usage

# completions, not streamed
comp = oa.completions.create(model="fake", prompt="hi", max_tokens=3)
assert comp.choices[0].text == "tok0 tok1 tok2 ", comp
assert comp.choices[0].finish_reason == "length", comp
assert comp.usage.completion_tokens == 3, comp.usage

print("python clients ok:", len(parts), "chat chunks,", len(chunks), "openai chunks")
sys.exit(0)
