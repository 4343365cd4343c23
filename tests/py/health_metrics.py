#!/usr/bin/env python3
"""Scrapes a Prometheus text endpoint and checks it with a real parser (prometheus-client).

    health_metrics.py --url http://127.0.0.1:PORT/metrics

Prints one JSON document on stdout:
    {"status": 200, "content_type": "...", "text": "<the body>",
     "families": [{"name", "type", "help", "samples": [{"name", "labels", "value"}]}],
     "problems": ["..."]}
`value` is a string (Python's repr of the float: "inf" and "nan" are not JSON numbers).

`problems` lists every way the exposition falls short of the 0.0.4 text format as the scenarios
require it: the body does not parse with `prometheus_client.parser.text_string_to_metric_families`;
the Content-Type is not `text/plain; version=0.0.4`; a family has no `# HELP` (or an empty one),
no `# TYPE`, is untyped, or is declared twice; a sample line precedes its family's `# TYPE` or
belongs to no declared family; a counter's samples do not end in `_total`.
Exit code 0 when the document was written (problems or not), 2 when the endpoint could not be read.
"""
import argparse
import json
import re
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SAMPLE_NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)")
SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def raw_problems(text: str) -> list:
    """Line-level checks the parser is lenient about (it accepts untyped, undocumented series)."""
    problems = []
    helps, types = {}, {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            parts = line[len("# HELP "):].split(" ", 1)
            name = parts[0]
            if name in helps:
                problems.append(f"line {n}: second HELP for {name}")
            helps[name] = parts[1].strip() if len(parts) > 1 else ""
            continue
        if line.startswith("# TYPE "):
            parts = line[len("# TYPE "):].split()
            if len(parts) != 2:
                problems.append(f"line {n}: malformed TYPE line {line!r}")
                continue
            name, typ = parts
            if name in types:
                problems.append(f"line {n}: second TYPE for {name}")
            types[name] = typ
            if typ not in SUFFIXES:
                problems.append(f"line {n}: family {name} has type {typ!r}")
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE_NAME.match(line)
        if not m:
            problems.append(f"line {n}: not a sample: {line!r}")
            continue
        sample = m.group(1)
        owner = None
        for fam, typ in types.items():
            for suffix in SUFFIXES.get(typ, ("",)):
                if sample == fam + suffix:
                    owner = fam
        if owner is None:
            problems.append(f"line {n}: sample {sample} precedes its TYPE or has none")
            continue
        if types[owner] == "counter" and not sample.endswith("_total"):
            problems.append(f"line {n}: counter sample {sample} does not end in _total")
    for name in types:
        if not helps.get(name):
            problems.append(f"family {name} has no HELP text")
    for name in helps:
        if name not in types:
            problems.append(f"family {name} has HELP but no TYPE")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as r:
            status = r.status
            content_type = r.headers.get("Content-Type", "")
            text = r.read().decode("utf-8")
    except Exception as e:  # noqa: BLE001 - reported, the caller retries or fails
        print(f"cannot read {args.url}: {e}", file=sys.stderr)
        return 2

    problems = []
    if status != 200:
        problems.append(f"status {status}")
    if not content_type.replace(" ", "").startswith("text/plain;version=0.0.4"):
        problems.append(f"Content-Type {content_type!r} is not text/plain; version=0.0.4")
    problems.extend(raw_problems(text))

    families = []
    try:
        seen = set()
        for fam in text_string_to_metric_families(text):
            if fam.name in seen:
                problems.append(f"parser: family {fam.name} appears twice")
            seen.add(fam.name)
            if fam.type == "unknown":
                problems.append(f"parser: family {fam.name} is untyped")
            if not fam.documentation:
                problems.append(f"parser: family {fam.name} has no documentation")
            families.append({
                "name": fam.name,
                "type": fam.type,
                "help": fam.documentation,
                "samples": [
                    {"name": s.name, "labels": dict(s.labels), "value": repr(float(s.value))}
                    for s in fam.samples
                ],
            })
    except Exception as e:  # noqa: BLE001 - a parse error is the finding
        problems.append(f"parser: the exposition does not parse: {e!r}")

    json.dump({"status": status, "content_type": content_type, "text": text,
               "families": families, "problems": problems}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
