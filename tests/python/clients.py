"""The official `ollama` and `openai` Python clients, pointed at maitre.

Run by the Rust e2e test `clients::official_python_clients_work_through_maitre`
(tests/e2e/clients.rs), which starts the fake Ollama and maitre and sets
MAITRE_URL. Exits non-zero on any failure.
"""

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

print("python clients ok:", len(parts), "chat chunks,", len(chunks), "openai chunks")
sys.exit(0)
