"""The official `openai` Python client through maitre to an OpenAI-compatible
upstream (`kind = "openai"`, the upstream model in its llama-server-like
`openai_only` mode).

Run by the Rust e2e test `openai_upstream::the_official_openai_client_works`
(tests/e2e/openai_upstream.rs), which sets MAITRE_URL. Exits non-zero on
any failure.
"""

import os

import openai

url = os.environ["MAITRE_URL"]
client = openai.OpenAI(base_url=url + "/v1", api_key="unused")

# chat, not streamed: maitre streams from the upstream and folds the answer
c = client.chat.completions.create(
    model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=3
)
assert c.choices[0].message.content.strip(), c
assert c.choices[0].finish_reason in ("stop", "length"), c
assert c.usage.completion_tokens == 3, c.usage

# chat, streamed
chunks = list(
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
    )
)
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert text.strip(), chunks

# completions, not streamed
p = client.completions.create(model="fake", prompt="hi", max_tokens=2)
assert p.choices[0].text.strip(), p

# models
ids = [m.id for m in client.models.list().data]
assert "fake:latest" in ids, ids

print("python openai upstream ok")
