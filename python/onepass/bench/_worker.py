"""Subprocess entry: ``python -m onepass.bench._worker '<json spec>'`` measures the cases of one spec (the
passes of one case) for one provider on the CPU in a fresh process, and prints one line
``ONEPASS_BENCH_RESULT <json list>`` (see ``measure.measure_cpu``)."""
from __future__ import annotations

import json
import sys
import traceback

RESULT_TAG = "ONEPASS_BENCH_RESULT "


def error_result(exc: BaseException) -> dict:
    return {"error": (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:300],
            "traceback": traceback.format_exc()[-2000:]}


def main(argv) -> int:
    spec = json.loads(argv[0])
    from .measure import measure_cpu
    from .registry import Case, set_onepass_backend

    set_onepass_backend(spec.get("backend", "auto"))
    results = []
    for c in spec["cases"]:
        try:
            results.append(measure_cpu(Case.from_json(c), spec["provider"], repeat=spec["repeat"],
                                       max_time=spec["max_time"]))
        except Exception as exc:  # reported as the row's error
            results.append(error_result(exc))
    print(RESULT_TAG + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
