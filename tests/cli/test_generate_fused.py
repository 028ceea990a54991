"""`dfloat generate --fused`: refused with a one-line reason where it cannot run (no GPU, an uncompressed model)."""

from click.testing import CliRunner

from dfloat.cli.main import main
from dfloat.testing import save_random_model


def test_fused_on_the_cpu_says_it_needs_cuda():
    r = CliRunner().invoke(
        main, ["generate", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu", "--fused"]
    )
    assert r.exit_code == 1 and "matmul='fused' runs a CUDA kernel" in r.output


def test_fused_needs_a_compressed_model(tmp_path):
    folder = save_random_model(tmp_path / "plain")
    r = CliRunner().invoke(main, ["generate", str(folder), "--prompt", "hi", "--device", "cpu", "--fused"])
    assert r.exit_code == 1 and "--fused needs a compressed model" in r.output
