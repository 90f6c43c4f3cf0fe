"""K-quant GGUF files (q4_k_m, q5_k_m, q6_k), made by llama.cpp's own quantizer.

K-quants pack 256 values per block and mix types per tensor ("_m": some tensors get more bits),
rules that only llama.cpp implements; gguf-py has no K-quant writer. So the export writes the
F16 file itself and hands it to `llama_model_quantize` from llama-cpp-python (built portable, as
the trainer image and `scripts/bootstrap.sh --llama` build it).

A tensor whose rows are not a multiple of 256 values cannot be K-quantized: llama.cpp then uses
its fallback type for that tensor (q4_k → q5_0, q5_k → q5_1, q6_k → q8_0) and goes on. SmolLM2's
hidden size of 576 is such a case; the export reports how many tensors fell back, per type.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from chatbot_trainer.errors import StepError
from chatbot_trainer.export.gguf_writer import apply_default_mode

# Quantization name → llama.cpp's llama_ftype (LLAMA_FTYPE_MOSTLY_*).
K_QUANTS: dict[str, int] = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
# The type llama.cpp asks for in most 2-D tensors of each file type (the rest is its own mix).
MAIN_TYPE = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
INSTALL_HINT = ("K-quants need llama-cpp-python (in the trainer image; locally: scripts/bootstrap.sh --llama); "
                "or export f16, q8_0 or q4_0, which need nothing more")


def available() -> str | None:
    """None when K-quants can be made here, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama_cpp cannot be imported ({exc}): {INSTALL_HINT}"
    return None


def quantize(f16_path: Path, out_path: Path, quantization: str, threads: int | None = None) -> None:
    """Write `out_path` (atomically) as `quantization` from the F16 GGUF at `f16_path`."""
    import ctypes

    problem = available()
    if problem:
        raise StepError(problem, reason="InvalidConfig", exit_code=2)
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs every tensor at INFO; errors still show
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[quantization]
    params.nthread = threads or os.cpu_count() or 1
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        status = llama_cpp.llama_model_quantize(
            str(f16_path).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0:
            raise StepError(f"llama.cpp could not quantize {f16_path.name} to {quantization} (status {status})")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        apply_default_mode(tmp)  # mkstemp made it 0600; readable like the F16 and Q8_0 files
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fallback_note(quantization: str, tensor_types: dict[str, int]) -> str | None:
    """A sentence on the 2-D tensors that did not get a K-quant type, or None."""
    k_types = {name: count for name, count in tensor_types.items() if name.endswith("_K")}
    others = {name: count for name, count in tensor_types.items()
              if not name.endswith("_K") and name not in ("F32",)}
    if not others:
        return None
    listed = ", ".join(f"{count} {name}" for name, count in sorted(others.items()))
    return (f"{quantization}: {sum(k_types.values())} tensors K-quantized, {listed} by llama.cpp's fallback "
            "for rows that are not a multiple of 256 values (or its choice for the output/embedding layers)")
