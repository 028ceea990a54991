"""NextLat self-speculative decoding on the demo model: acceptance rate and tokens per verifying forward.

The backbone is the demo model that ships in dfloat (dfloat/demo/model: 4 x 256 PolyCom, trained on Austen,
docs/demo_model.md), decompressed to BF16 and run in float32 as a NextLat model whose MLP is PolyCom's (a
composition local to this script: NextLat's head and drafting over the same backbone). The backbone is checked to
give logits bit-identical to PolyComForCausalLM's. Its weights are frozen and only the latent head is trained
(smooth-L1 latent loss + KL, the authors' loss) for --head-steps steps on the corpus's training part; then greedy
``generate_speculative`` runs on prompts from the held-out tail with fixed-length and variable-length drafting.
Every speculative output is compared with plain greedy ``generate`` (they must be the same tokens).

python benchmarks/nextlat_speculative.py --deb r-cran-janeaustenr_1.0.0-1_all.deb
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from common import print_table, write_result  # noqa: E402

import dfloat  # noqa: E402
from dfloat.models import NextLatConfig, NextLatForCausalLM, PolyComForCausalLM  # noqa: E402
from dfloat.models.nextlat import NextLatModel  # noqa: E402
from dfloat.models.polycom import PolyComMLP  # noqa: E402

DEMO = Path(dfloat.__file__).parent / "demo" / "model"


class PolyComNextLatModel(NextLatModel):
    def build_mlp(self, config, layer_idx):
        return PolyComMLP(config)


class PolyComNextLatForCausalLM(NextLatForCausalLM):
    base_model_class = PolyComNextLatModel


def load_backbone(folder: Path, kl_weight: float) -> tuple[NextLatForCausalLM, bool]:
    """NextLat over the BF16 demo checkpoint in ``folder`` (head fresh); and whether its logits are PolyCom's."""
    from safetensors.torch import load_file

    demo_cfg = json.loads((folder / "config.json").read_text())
    keep = {k: v for k, v in demo_cfg.items() if k not in ("architectures", "model_type", "dtype", "dfloat")}
    keep.pop("transformers_version", None)
    cfg = NextLatConfig(**keep, kl_loss_weight=kl_weight)
    torch.manual_seed(0)
    model = PolyComNextLatForCausalLM(cfg)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update({k: v.float() for k, v in load_file(f).items()})
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not m.startswith("latent_head.") for m in missing):
        raise SystemExit(f"{folder}: not the demo checkpoint (missing {missing}, unexpected {unexpected})")
    model = model.float().eval()
    reference = PolyComForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    probe = torch.arange(3, 40)[None]
    with torch.no_grad():
        same = torch.equal(model(probe).logits, reference(probe).logits)
    model.generation_config.eos_token_id = None  # measure full-length continuations
    return model, same


def token_stream(folder: Path, deb: Path) -> torch.Tensor:
    """The corpus tokenised with the checkpoint's tokenizer, novels joined by EOS (as the demo training does)."""
    from tokenizers import Tokenizer
    from train_demo_model import load_corpus

    novels, _ = load_corpus(deb)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids = []
    for n in novels:
        ids.extend(tok.encode(n).ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def train_head(
    model: NextLatForCausalLM, train: torch.Tensor, steps: int, batch: int, ctx: int
) -> list[dict]:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.latent_head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.latent_head.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    log = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train) - ctx - 1, (batch,), generator=gen)
        ids = torch.stack([train[s : s + ctx] for s in starts.tolist()])
        with torch.no_grad():
            hidden = model.model(ids, use_cache=False).last_hidden_state
        latent, kl = model.latent_losses(hidden, ids, ids)
        loss = latent + model.config.kl_loss_weight * kl if kl is not None else latent
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            entry = {"step": step + 1, "latent_loss": round(latent.item(), 5)}
            if kl is not None:
                entry["kl_loss"] = round(kl.item(), 4)
            log.append(entry)
            print(f"  head step {step + 1}: {entry}", flush=True)
    model.eval()
    return log


def measure(model, prompts, max_new: int, k: int, confidence: float) -> dict:
    drafted = accepted = verifies = new = same = 0
    t0 = time.thread_time()
    for p in prompts:
        seq, st = model.generate_speculative(
            p, max_new, draft_tokens=k, draft_confidence=confidence, return_stats=True
        )
        greedy = model.generate(p, max_new_tokens=max_new, do_sample=False)
        same += int(torch.equal(seq, greedy))
        drafted, accepted, verifies, new = (
            drafted + st.drafted, accepted + st.accepted, verifies + st.verify_steps, new + st.new_tokens,
        )  # fmt: skip
    return {
        "draft_tokens": k,
        "draft_confidence": confidence,
        "prompts": len(prompts),
        "new_tokens": new,
        "drafted": drafted,
        "accepted": accepted,
        "verify_steps": verifies,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "tokens_per_verify": round((new - len(prompts)) / verifies, 3) if verifies else 0.0,
        "equal_to_greedy": f"{same}/{len(prompts)}",
        "cpu_s_incl_greedy": round(time.thread_time() - t0, 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path, required=True, help="r-cran-janeaustenr .deb (the demo corpus)")
    ap.add_argument("--head-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tmp = tempfile.TemporaryDirectory(prefix="dfloat_nextlat_bench_")
    folder = Path(tmp.name) / "demo_bf16"
    dfloat.decompress_model(DEMO, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "training_info.json"):
        if not (folder / name).exists() and (DEMO / name).exists():
            (folder / name).write_bytes((DEMO / name).read_bytes())
    model, same = load_backbone(folder, args.kl_weight)
    if not same:
        raise SystemExit("the NextLat composition does not reproduce the demo model's logits")
    data = token_stream(folder, args.deb)
    n_val = int(len(data) * 0.02)  # the demo training's validation tail, never trained on
    train, val = data[:-n_val], data[-n_val:]
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(val) - args.prompt_len, (args.prompts,), generator=g).tolist()
    prompts = [val[s : s + args.prompt_len][None] for s in starts]

    rows = []
    for k in args.draft_tokens:  # the untrained head (zero last layer: "the latent stays put")
        rows.append({"head": "untrained", **measure(model, prompts, args.max_new_tokens, k, 0.0)})
    log = train_head(model, train, args.head_steps, args.batch, args.ctx)
    for k in args.draft_tokens:
        for c in args.confidence:
            rows.append(
                {
                    "head": f"trained {args.head_steps} steps",
                    **measure(model, prompts, args.max_new_tokens, k, c),
                }
            )
    print()
    print_table(
        rows,
        ["head", "draft_tokens", "draft_confidence", "acceptance_rate", "tokens_per_verify", "drafted",
         "verify_steps", "equal_to_greedy"],
    )  # fmt: skip
    info_path = folder / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    settings = {k: v for k, v in vars(args).items() if k != "deb"}
    backbone = {"model": "dfloat/demo/model (decompressed, run in float32)", "logits_equal_polycom": same}
    backbone.update({k: info.get(k) for k in ("arch", "params", "steps", "val_loss_fp32")})
    write_result("nextlat_speculative", rows, settings=settings, backbone=backbone, head_training=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
