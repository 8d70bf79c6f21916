"""OUT/gpu_check.json from the parts `scripts/gpu_check.sh` ran: the card, each part's exit status and its results
(JUnit counts and failed tests, a benchmark's --json file, else the end of its log).

    python benchmarks/gpu_check_report.py OUT      # exit status 1 when a part failed
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def collect(out: Path, device: str) -> dict:
    """Every OUT/<part>.rc with what that part left: tests.xml, <part>.json or <part>.log."""
    result = {"device": device, "parts": {}}
    for rc in sorted(out.glob("*.rc")):
        name = rc.stem
        entry: dict = {"exit_code": int(rc.read_text().strip() or 1)}
        if name == "tests" and (out / "tests.xml").is_file():
            root = ET.parse(out / "tests.xml").getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            entry.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
            entry["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
        elif (out / f"{name}.json").is_file():
            entry["results"] = json.loads((out / f"{name}.json").read_text())
        elif (out / f"{name}.log").is_file():
            entry["output_tail"] = (out / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
        result["parts"][name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    result = {**collect(out, device), "torch": torch.__version__}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    failed = [n for n, e in result["parts"].items() if e["exit_code"] != 0]
    print(f"[gpu_check] {device}: written {out / 'gpu_check.json'}; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
