"""`dfloat generate`'s fast path (the default on CUDA) prints what transformers' generate prints, with the
model's own settings (the demo's repetition penalty); run here on the CPU, where it works without capture."""

from click.testing import CliRunner

from dfloat.cli.generate import _fast, _Run, load_for_generation
from dfloat.cli.main import main
from dfloat.demo import demo_model_path

PROMPT = "It is a truth universally acknowledged"


def test_fast_path_prints_the_eager_greedy_text(capsys):
    eager = CliRunner().invoke(
        main, ["generate", "--prompt", PROMPT, "-n", "12", "--temperature", "0", "--device", "cpu"]
    )
    assert eager.exit_code == 0, eager.output
    lm, tok, compressed = load_for_generation(demo_model_path(), "cpu")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    run = _Run(lm, tok, False, 12, 0.0, None, None, True, 0.0, "cpu", compressed)
    _fast(run, ids)
    out = capsys.readouterr()
    assert PROMPT + out.out == eager.output
    assert "static" in out.err and "tok/s" in out.err


def test_no_graphs_flag_is_accepted():
    r = CliRunner().invoke(main, ["generate", "--prompt", "Hi", "-n", "2", "--no-graphs", "--device", "cpu"])
    assert r.exit_code == 0, r.output
