"""The official `ollama` Python client against maitre in front of a fleet.

Run by the Rust e2e test `fleet::merged_tags_and_ps_through_the_official_client`
(tests/e2e/fleet.rs), which starts three upstream models and maitre and sets
MAITRE_URL, ON_DISK and LOADED (comma-separated model names). Exits non-zero
on any failure.
"""

import os

import ollama

url = os.environ["MAITRE_URL"]
on_disk = sorted(os.environ["ON_DISK"].split(","))
loaded = sorted(os.environ["LOADED"].split(","))
client = ollama.Client(host=url)

# list: every backend's models, each once
names = sorted(m.model for m in client.list().models)
assert names == on_disk, (names, on_disk)

# ps: every backend's loaded models
running = sorted(m.model for m in client.ps().models)
assert running == loaded, (running, loaded)

# show: answered by the backend that has the model
for name in on_disk:
    s = client.show(name)
    assert name in s.modelfile, (name, s.modelfile)
try:
    client.show("fake-nowhere")
    raise SystemExit("expected a 404 for a model no backend has")
except ollama.ResponseError as err:
    assert err.status_code == 404, err

# pull: every backend pulls; the merged stream ends in one success
progress = list(client.pull("fake-shared", stream=True))
assert progress[-1].status == "success", progress[-1]
assert sum(1 for p in progress if p.status == "success") == 1, progress

# a pull that fails on every backend raises, naming them
try:
    list(client.pull("nope", stream=True))
    raise SystemExit("expected a failed pull to raise")
except ollama.ResponseError as err:
    assert "failed on backend" in str(err), err

# generation still works, on the backend that has the model loaded
r = client.generate(model=loaded[0], prompt="hi", options={"num_predict": 2})
assert r.done, r

print("python fleet ok")
