#!/usr/bin/python3
"""Parses an OpenMetrics exposition (stdin) with prometheus_client's parser, a parser this
project did not write, and prints its samples as JSON: {"name{label=value,...}": value}.
Exits 1 with the parser's complaint when the text is not valid OpenMetrics."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    out = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    except Exception as e:  # the parser's own error, reported as is
        print(f"not valid OpenMetrics: {e}")
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
