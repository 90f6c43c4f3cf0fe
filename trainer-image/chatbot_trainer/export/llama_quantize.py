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


# Bits per weight of a whole file of each type, as llama.cpp's K-quant mixes come out on models
# whose rows all take K-quants (block sizes: Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625 bits per weight;
# "_m" gives some tensors more).
BITS_PER_WEIGHT = {"q4_k_m": 4.9, "q5_k_m": 5.7, "q6_k": 6.6}
QK_K = 256  # values per K-quant block: a row must be a multiple of it


def small_model_warning(path: str | os.PathLike, quantization: str) -> str | None:
    """A warning when a K-quant file holds weight matrices whose rows could not take K-quants
    (a small model's hidden size that is not a multiple of 256): what llama.cpp's fallback gave
    them, counted per type as gguf's reader reads the file back, and the size against what
    the type promises. None when every such matrix was K-quantized."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    matrices = [t for t in reader.tensors if len(t.shape) >= 2]
    fell_back = [t for t in matrices if not t.tensor_type.name.endswith("_K") and int(t.shape[0]) % QK_K]
    if not fell_back:
        return None
    counts: dict[str, int] = {}
    for tensor in matrices:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    by_type = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    rows = sorted({int(t.shape[0]) for t in fell_back})
    size = Path(path).stat().st_size
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    vector_bytes = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) < 2)
    weights = sum(int(t.n_elements) for t in matrices)
    expected = weights * BITS_PER_WEIGHT[quantization] / 8 + vector_bytes + (size - tensor_bytes)
    mib = 1024 * 1024
    ratio = size / expected
    how_big = (f"so the file is {size / mib:.3g} MiB, {ratio:.2f}× the ~{expected / mib:.3g} MiB a {quantization} "
               f"file of these {weights / 1e6:.3g}M weights would be ({BITS_PER_WEIGHT[quantization]} bits "
               "per weight)" if ratio > 1.02 else f"the file is {size / mib:.3g} MiB")
    return (
        f"{quantization} of a model this small: {len(fell_back)} of {len(matrices)} weight matrices have rows of "
        f"{', '.join(map(str, rows))} values, not a multiple of {QK_K}, and cannot take K-quants; llama.cpp "
        f"gave them its fallback types (the matrices now: {by_type}), {how_big}. For such a model "
        "q8_0 (near-lossless) or q4_0 (smallest) are exported without fallbacks"
    )


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
