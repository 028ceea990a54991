import subprocess
import sys


def test_import_dfloat_stays_light():
    code = (
        "import sys, dfloat, dfloat.kernels\n"
        "heavy = [m for m in ('numba', 'triton', 'cupy', 'transformers', 'accelerate', 'vllm') if m in sys.modules]\n"
        "import torch\nassert not torch.cuda.is_initialized()\nprint(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
