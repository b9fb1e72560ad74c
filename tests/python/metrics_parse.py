"""Fetches maitre's /metrics in both text formats and parses each with the
official Prometheus parser for it (prometheus_client): OpenMetrics 1.0 when
asked for with Accept (what Prometheus does), Prometheus text 0.0.4 otherwise.
Prints the parsed families as JSON for the e2e test
`live::admin::metrics_parse_with_the_prometheus_parsers` to check; exits
non-zero if a parser rejects the text.

Usage: python metrics_parse.py http://127.0.0.1:PORT/metrics
"""

import json
import math
import sys
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

# What Prometheus 2.x/3.x sends when scraping.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,"
    "application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def fetch(url, accept):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with opener.open(req, timeout=10) as r:
        return r.headers.get("Content-Type", ""), r.read().decode("utf-8")


def families(parse, text):
    out = {}
    for f in parse(text):
        samples = []
        for s in f.samples:
            v = s.value
            samples.append([s.name, dict(s.labels), v if math.isfinite(v) else str(v)])
        out[f.name] = {"type": f.type, "samples": samples}
    return out


def main():
    url = sys.argv[1]
    result = {}
    for name, accept, parse in [
        ("openmetrics", PROMETHEUS_ACCEPT, parse_openmetrics),
        ("prometheus", None, parse_prometheus),
    ]:
        content_type, text = fetch(url, accept)
        result[name] = {"content_type": content_type, "families": families(parse, text)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
