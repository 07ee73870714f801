"""Every benchmark scenario (``make bench``): the same as ``torch-dataflow bench``.

python -m benchmarks.run [--quick] [--scenarios a,b] [--json F] [--plot F] [--write-docs]
"""

from __future__ import annotations

from torch_dataflow.bench import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m benchmarks.run"))
