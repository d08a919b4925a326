"""Dense vs routed forward latency on random-weight PixArt-, DiT-, SD3- and Flux-shaped transformers.

Every (family, tokens, batch) runs dense and kept ratios 0.8 / 0.5 / 0.3 interleaved in one process, median
of >= 7 runs after warm-up, and prints the measured speedup next to the FLOP-ideal one.

    python benchmarks/routing_speed.py                 # the full table (about 10 minutes on 2 CPU cores)
    python benchmarks/routing_speed.py --quick         # tiny shapes, seconds
    python benchmarks/routing_speed.py --json out.json
    python benchmarks/routing_speed.py --families sd3,flux --grid 1024x1,1024x4,4096x1   # the MMDiT rows

Each (family, tokens, batch) runs in a fresh Python process (`--no-isolate`: all in this one). Small shapes are
sensitive to the process's memory state: in one process that had run the PixArt rows first, the DiT row at 256
tokens x 4, kept 0.3, read 0.68 of its FLOP-ideal speedup, against 0.88 in a fresh process (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from diffcr.benchmark import SpeedRow, machine_description, routing_speed, rows_as_dicts, speed_table_markdown


def rows_in_fresh_process(args, family: str, num_tokens: int, batch: int) -> list[SpeedRow]:
    """One grid cell measured by this script in a new Python process (`--no-isolate`), its rows read back."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        command = [sys.executable, __file__, "--no-isolate", "--families", family, "--grid", f"{num_tokens}x{batch}"]
        command += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--json", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["rows"]
        return [SpeedRow(**{key: value for key, value in row.items() if key != "efficiency"}) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows and the machine description to this file")
    parser.add_argument("--families", default="pixart,dit", help="comma-separated: pixart, dit, sd3, flux")
    parser.add_argument("--grid", help="TOKENSxBATCH,... (default 256x1,256x4,1024x1,1024x4)")
    parser.add_argument(
        "--no-isolate", dest="isolate", action="store_false", help="run every grid cell in this process"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        shape = {"width": 64, "num_layers": 2, "heads": 2, "text_tokens": 8}
        grid = [(16, 1)]
        repeats, warmup = 3, 1
    else:
        shape = {"width": 384, "num_layers": 12, "heads": 6, "text_tokens": 120}
        grid = [(256, 1), (256, 4), (1024, 1), (1024, 4)]
        if args.grid:
            grid = [tuple(int(n) for n in item.split("x")) for item in args.grid.split(",")]
        repeats, warmup = args.repeats, 2
    rows = []
    for family in args.families.split(","):
        for num_tokens, batch in grid:
            if args.isolate and not args.quick:
                new = rows_in_fresh_process(args, family, num_tokens, batch)
            else:
                new = routing_speed(family, num_tokens, batch, repeats=repeats, warmup=warmup, **shape)
            print("\n".join(speed_table_markdown(new).splitlines()[2:]), flush=True)
            rows.extend(new)
    machine = machine_description()
    print()
    where = "each (family, tokens, batch) in a fresh process" if args.isolate and not args.quick else "one process"
    print(f"machine: {machine}; model shape: {shape}; fp32, median of {repeats} after {warmup} warm-up runs; {where}")
    print(speed_table_markdown(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "shape": shape, "rows": rows_as_dicts(rows)}, handle, indent=2)


if __name__ == "__main__":
    main()
