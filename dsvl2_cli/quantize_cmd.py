"""`dsvl2 quantize MODEL -o DIR --bits 8|4`: write a weight-only quantised checkpoint (layout in
dsvl2.model.quant_checkpoint) that `--model DIR` loads as stored, without quantising again. Prints the output
directory on stdout; errors are the CLI's one line on stderr and an exit code."""

from __future__ import annotations

import sys
from pathlib import Path

from dsvl2.errors import ExitCode
from dsvl2.pipelines.base import OptionError
from dsvl2.progress import Reporter

BITS = (8, 4)


def quantize(*, model: str, out: Path, bits: int, revision: str | None = None, shard_gb: float = 2.0) -> int:
    """Quantise `model` (a local float checkpoint or a Hugging Face repo id) to `bits` into `out` (new or empty)."""
    reporter = Reporter(total_pages=0, total_docs=0, quiet=False, verbose=0)  # stderr: the build, an error
    try:
        if bits not in BITS:
            raise OptionError("bits", "must be 8 or 4")
        if shard_gb <= 0:
            raise OptionError("shard_gb", "must be positive")
        from dsvl2.model import quant_kernels
        from dsvl2.model.hub import resolve_model
        from dsvl2.model.quant import Scheme
        from dsvl2.model.quant_checkpoint import write_quantized

        source = resolve_model(model, revision=revision)
        # The library quantises the weights where it runs (built here on a first run, as a load would build it).
        quant_kernels.available(on_build_start=lambda: reporter.info("building the CPU kernels (first run only) …", 0))
        written = write_quantized(source, out, Scheme.named(f"int{bits}"), shard_bytes=int(shard_gb * 2**30))
    except (Exception, KeyboardInterrupt) as exc:
        return reporter.fail(exc)
    sys.stdout.write(f"{written}\n")
    return int(ExitCode.OK)
