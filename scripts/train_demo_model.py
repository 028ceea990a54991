#!/usr/bin/env python3
"""Train the small demo causal LM that ships (compressed) inside dfloat.

Corpus
    Jane Austen's six completed novels (public domain), as packaged by Debian in
    ``r-cran-janeaustenr`` 1.0.0-1 (CRAN ``janeaustenr`` by Julia Silge, the texts
    come from Project Gutenberg).  The script fetches the .deb with
    ``apt-get download`` (or takes ``--deb PATH``), reads the R lazy-load data base
    inside it with a small pure-Python reader (no R needed), re-flows the
    hard-wrapped lines into paragraphs and checks the SHA-256 of the cleaned text.

Tokenizer
    Byte-level BPE trained with the ``tokenizers`` library on that text.

Model
    A tiny Llama (``transformers.LlamaForCausalLM``), trained from scratch in
    float32 with AdamW on one CPU thread for a fixed CPU-time budget (or a fixed
    number of steps), then cast to bfloat16 and saved with ``save_pretrained``
    (safetensors) together with the tokenizer and a generation config.

See docs/demo_model.md for the numbers of the shipped run.

Usage::

    python scripts/train_demo_model.py --out /tmp/dfloat_demo_bf16            # 20 min budget
    python scripts/train_demo_model.py --out /tmp/x --steps 300 --budget-min 0  # fixed steps
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import platform
import random
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

# Keep every library on one thread before they are imported.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# --------------------------------------------------------------------------- corpus

CORPUS_DEB = "r-cran-janeaustenr"
CORPUS_DEB_VERSION = "1.0.0-1"
# sha256 of r-cran-janeaustenr_1.0.0-1_all.deb in Debian 12 (bookworm); informative only.
CORPUS_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
# sha256 of the cleaned UTF-8 text produced by load_corpus(); this one is checked.
CORPUS_TEXT_SHA256 = "7e0d25b85a5e74ce6fbe852645ad7ea52fc8c04a6a5282b1f038e604c7819610"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
# Publication order.
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]


class _RVec(list):
    """An R vector: a list with its attributes (names, class, ...)."""

    attrs: dict = {}

    def named(self) -> dict:
        return dict(zip(self.attrs.get("names", []), self, strict=True))


class _RUnserializer:
    """Minimal reader of R's XDR serialization format (enough for data vectors)."""

    def __init__(self, data: bytes):
        self.b, self.p, self.refs = data, 0, []

    def _i32(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def _raw(self, n: int) -> bytes:
        v = self.b[self.p : self.p + n]
        self.p += n
        return v

    def read(self):
        if self._raw(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self._i32()
        self._i32(), self._i32()
        if version == 3:
            self._raw(self._i32())  # native encoding name
        return self._item()

    def _item(self):
        flags = self._i32()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments, markers
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8 or self._i32()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if t in (2, 6, 17, 239, 240):  # pairlists
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car, cdr = self._item(), self._item()
            out = [(tag[1] if isinstance(tag, tuple) else tag, car)]
            return out + cdr if isinstance(cdr, list) else out
        if t == 9:  # CHARSXP
            n = self._i32()
            return None if n == -1 else self._raw(n).decode("utf-8")
        if t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            v = [self._item() for _ in range(self._i32())]
        elif t in (10, 13):  # LGLSXP, INTSXP
            n = self._i32()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self._i32()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t == 238:  # ALTREP: class info, state, attributes
            self._item()
            state = self._item()
            self._item()
            return state
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        v = _RVec(v)
        if has_attr:
            v.attrs = dict(self._item())
        return v


def read_r_lazyload_db(rdx: bytes, rdb: bytes) -> dict:
    """Objects of an R lazy-load data base (Rdata.rdx + Rdata.rdb)."""
    if rdx[:2] == b"\x1f\x8b":
        rdx = gzip.decompress(rdx)
    index = _RUnserializer(rdx).read().named()
    out = {}
    for name, (off, ln) in index["variables"].named().items():
        blob = rdb[int(off) : int(off) + int(ln)]
        size = struct.unpack(">I", blob[:4])[0]
        kind = blob[4:5]
        if kind == b"Z":
            body = lzma.decompress(blob[5:])
        elif kind == b"2":
            body = bz2.decompress(blob[5:])
        elif kind == b"0":
            body = blob[5:]
        else:
            body = zlib.decompress(blob[4:])
        if len(body) != size:
            raise ValueError(f"bad length for {name}")
        out[name] = _RUnserializer(body).read()
    return out


def _deb_members(deb: bytes) -> dict:
    """Files of a .deb's data.tar.* (ar archive, parsed in Python: no dpkg needed)."""
    if deb[:8] != b"!<arch>\n":
        raise ValueError("not a .deb (ar) archive")
    p = 8
    while p + 60 <= len(deb):
        name = deb[p : p + 16].decode().strip().rstrip("/")
        size = int(deb[p + 48 : p + 58].decode().strip())
        body = deb[p + 60 : p + 60 + size]
        p += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                return {
                    m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()
                }
    raise ValueError("no data.tar in .deb")


def fetch_deb(cache_dir: Path) -> Path:
    """apt-get download the pinned corpus package (needs Debian apt lists)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(f"{CORPUS_DEB}_{CORPUS_DEB_VERSION}_*.deb"))
    if found:
        return found[0]
    cmd = ["apt-get", "download", f"{CORPUS_DEB}={CORPUS_DEB_VERSION}"]
    print("fetching corpus:", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=cache_dir, capture_output=True, text=True)
    found = sorted(cache_dir.glob(f"{CORPUS_DEB}_{CORPUS_DEB_VERSION}_*.deb"))
    if r.returncode != 0 or not found:
        sys.exit(f"apt-get download failed (run 'apt-get update' first, or pass --deb):\n{r.stderr}")
    return found[0]


def clean_novel(lines: list[str]) -> list[str]:
    """Re-flow Gutenberg's hard-wrapped lines into one string per paragraph.

    Drops the front matter before the first chapter heading, chapter / volume
    headings, and paragraphs without any lower-case letter ("THE END", "FINIS",
    signatures); removes the _underscore_ italics markers; collapses whitespace.
    """
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    heading = re.compile(r"^(chapter|volume)\b", re.I)
    first = next(i for i, p in enumerate(paras) if heading.match(p))
    out = []
    for p in paras[first:]:
        p = re.sub(r"\s+", " ", p.replace("_", "")).strip()
        if heading.match(p) or not re.search(r"[a-z]", p):
            continue
        out.append(p)
    return out


def load_corpus(deb_path: Path) -> tuple[list[str], dict]:
    """Novel texts (paragraphs joined by "\\n") in publication order, and provenance."""
    deb = deb_path.read_bytes()
    files = _deb_members(deb)
    objs = read_r_lazyload_db(files[DATA_DIR + "Rdata.rdx"], files[DATA_DIR + "Rdata.rdb"])
    novels = ["\n".join(clean_novel(list(objs[name]))) for name in NOVELS]
    text_sha = hashlib.sha256("\n\n".join(novels).encode("utf-8")).hexdigest()
    info = {
        "package": f"{CORPUS_DEB} {CORPUS_DEB_VERSION} (Debian)",
        "deb_file": deb_path.name,
        "deb_sha256": hashlib.sha256(deb).hexdigest(),
        "text_sha256": text_sha,
        "text_chars": sum(len(n) for n in novels),
        "novels": NOVELS,
    }
    return novels, info


# ------------------------------------------------------------------------ tokenizer

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(novels: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = [p for n in novels for p in n.split("\n")]
    tok.train_from_iterator(paragraphs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
    )


# ---------------------------------------------------------------------------- model


def build_model(args, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=0.02,
    )
    if args.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**kw))
    # --arch polycom: PolyCom activations, provided by dfloat.models (when present).
    try:
        import dfloat.models as dm
    except ImportError as e:
        sys.exit(f"--arch polycom needs dfloat.models ({e})")
    config_cls = getattr(dm, "PolyComConfig", None)
    model_cls = getattr(dm, "PolyComForCausalLM", None)
    if config_cls is not None and model_cls is not None:
        return model_cls(config_cls(**kw))
    from transformers import AutoConfig, AutoModelForCausalLM  # registered by dfloat.models?

    try:
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("polycom", **kw))
    except Exception as e:  # noqa: BLE001
        sys.exit(f"--arch polycom: dfloat.models provides no PolyCom model ({e})")


# ------------------------------------------------------------------------- training


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * prog))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", default="/tmp/dfloat_demo_bf16", help="output folder (BF16 checkpoint + tokenizer)"
    )
    ap.add_argument(
        "--deb", type=Path, help=f"a local {CORPUS_DEB}_{CORPUS_DEB_VERSION}_all.deb (else apt-get download)"
    )
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "dfloat_demo_corpus")
    ap.add_argument(
        "--allow-corpus-mismatch", action="store_true", help="train even if the text sha256 differs"
    )
    ap.add_argument("--arch", choices=["llama", "polycom"], default="llama")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--max-positions", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=256, help="training context length")
    ap.add_argument("--batch", type=int, default=12, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument(
        "--budget-min",
        type=float,
        default=20.0,
        help="training budget in minutes of CPU time of this process (on 1 thread of an idle "
        "machine that is wall time; CPU time keeps it fair on a shared one); 0: use --steps",
    )
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (overrides the budget's estimate)")
    ap.add_argument(
        "--calib-steps",
        type=int,
        default=12,
        choices=range(1, 1000),
        metavar="N",
        help="steps timed before the budget is first turned into a step count",
    )
    ap.add_argument("--val-frac", type=float, default=0.02)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not args.steps and args.budget_min <= 0:
        ap.error("give --steps or a positive --budget-min")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # corpus
    deb_path = args.deb or fetch_deb(args.cache_dir)
    novels, corpus_info = load_corpus(deb_path)
    print(
        f"corpus: {corpus_info['package']}  {corpus_info['text_chars']:,} chars  sha256={corpus_info['text_sha256']}",
        flush=True,
    )
    if corpus_info["text_sha256"] != CORPUS_TEXT_SHA256:
        msg = f"corpus text sha256 {corpus_info['text_sha256']} != expected {CORPUS_TEXT_SHA256}"
        if not args.allow_corpus_mismatch:
            sys.exit(msg + " (pass --allow-corpus-mismatch to go on)")
        print("WARNING:", msg, flush=True)

    # tokenizer + token stream: paragraphs separated by "\n", novels by EOS
    tokenizer = train_tokenizer(novels, args.vocab)
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    ids = []
    for n in novels:
        ids.extend(tokenizer.backend_tokenizer.encode(n).ids)
        ids.append(eos_id)
    data = torch.tensor(ids, dtype=torch.long)
    n_val = int(len(data) * args.val_frac)
    train_data, val_data = data[:-n_val], data[-n_val:]
    print(
        f"tokenizer: byte-level BPE vocab={len(tokenizer)}  tokens={len(data):,} "
        f"({corpus_info['text_chars'] / len(data):.2f} chars/token)  train={len(train_data):,} val={len(val_data):,}",
        flush=True,
    )

    # model
    model = build_model(args, len(tokenizer), eos_id, eos_id, pad_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.arch} {n_params:,} params  hidden={args.hidden} layers={args.layers} "
        f"heads={args.heads}/{args.kv_heads} ffn={args.ffn}",
        flush=True,
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    T, B, V = args.ctx, args.batch, len(tokenizer)
    gen = torch.Generator().manual_seed(args.seed)

    def batches():
        """Epochs of shuffled non-overlapping windows of T+1 tokens (random phase per epoch)."""
        while True:
            off = int(torch.randint(0, T, (1,), generator=gen))
            n = (len(train_data) - off - 1) // (T + 1)
            chunks = train_data[off : off + n * (T + 1)].view(n, T + 1)
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - B + 1, B):
                yield chunks[perm[i : i + B]]

    val_chunks = val_data[: (len(val_data) // (T + 1)) * (T + 1)].view(-1, T + 1)

    @torch.no_grad()
    def evaluate(m) -> float:
        m.eval()
        tot, cnt = 0.0, 0
        for i in range(0, len(val_chunks), 16):
            x = val_chunks[i : i + 16]
            logits = m(input_ids=x[:, :-1]).logits.float()
            tot += torch.nn.functional.cross_entropy(
                logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            cnt += x[:, 1:].numel()
        m.train()
        return tot / cnt

    budget_s = args.budget_min * 60.0
    total = args.steps or 10**9
    it = batches()
    model.train()
    t0, c0 = time.time(), time.process_time()
    run_loss, run_n, step, log = 0.0, 0, 0, []
    while step < total:
        lr = lr_at(
            step,
            total if total < 10**9 else max(1000, args.warmup * 10),
            args.warmup,
            args.lr,
            args.lr * args.min_lr_ratio,
        )
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(it)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_loss += loss.item()
        run_n += 1
        elapsed = time.time() - t0
        cpu = time.process_time() - c0
        if step == 1:
            cpu_first = cpu
        if (
            not args.steps
            and step > args.calib_steps
            and (step == args.calib_steps + 1 or step % args.log_every == 0)
        ):
            # turn the CPU budget into a step count, re-estimated as the run goes (evals included)
            per_step = (cpu - cpu_first) / (step - 1)
            new_total = max(step, step + int((budget_s - cpu) / per_step))
            if total == 10**9:
                print(
                    f"budget {args.budget_min:g} CPU min -> ~{new_total} steps ({per_step:.2f} CPU s/step)",
                    flush=True,
                )
            total = new_total
        if step % args.log_every == 0 or step == total:
            print(
                f"step {step:5d}/{total if total < 10**9 else '?'}  loss {run_loss / run_n:.4f}  lr {lr:.2e}  "
                f"{step * B * T / cpu:.0f} tok/CPU-s  {cpu / 60:.1f} CPU min  {elapsed / 60:.1f} wall min",
                flush=True,
            )
            log.append(
                {
                    "step": step,
                    "loss": round(run_loss / run_n, 4),
                    "lr": lr,
                    "cpu_min": round(cpu / 60, 2),
                    "wall_min": round(elapsed / 60, 2),
                }
            )
            run_loss, run_n = 0.0, 0
        if step % args.eval_every == 0 and step < total:
            vl = evaluate(model)
            print(f"  val loss {vl:.4f}  (ppl {math.exp(vl):.1f})", flush=True)
            log.append({"step": step, "val_loss": round(vl, 4)})
        if not args.steps and cpu > budget_s * 1.05:
            print(f"stopping at step {step}: over the CPU budget", flush=True)
            break
    train_min = (time.time() - t0) / 60
    train_cpu_min = (time.process_time() - c0) / 60
    val_fp32 = evaluate(model)
    final_train = next((e["loss"] for e in reversed(log) if "loss" in e), float("nan"))
    print(
        f"done: {step} steps in {train_cpu_min:.1f} CPU min ({train_min:.1f} wall min)  train loss {final_train:.4f}  val loss fp32 {val_fp32:.4f}",
        flush=True,
    )

    # save in BF16
    model = model.to(torch.bfloat16)
    val_bf16 = evaluate(model)
    print(f"val loss bf16 {val_bf16:.4f} (ppl {math.exp(val_bf16):.1f})", flush=True)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.1,
        max_new_tokens=60,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    info = {
        "corpus": corpus_info,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": len(tokenizer),
            "tokens": len(data),
            "train_tokens": len(train_data),
            "val_tokens": len(val_data),
        },
        "arch": args.arch,
        "params": n_params,
        "bf16_weights_bytes": weights.stat().st_size if weights.exists() else None,
        "steps": step,
        "tokens_seen": step * B * T,
        "train_cpu_minutes": round(train_cpu_min, 2),
        "train_wall_minutes": round(train_min, 2),
        "final_train_loss": final_train,
        "val_loss_fp32": round(val_fp32, 4),
        "val_loss_bf16": round(val_bf16, 4),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fixed_step_retrain": f"python scripts/train_demo_model.py --out {args.out} --steps {step} --budget-min 0",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
        "log": log,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")

    # smoke test: sample from the saved BF16 model
    model.eval()
    enc = tokenizer("Once upon a time", return_tensors="pt")
    for do_sample in (True, False):
        torch.manual_seed(args.seed)
        ts = time.time()
        with torch.no_grad():
            gen_ids = model.generate(
                **enc,
                do_sample=do_sample,
                max_new_tokens=60,
                **({} if do_sample else {"temperature": None, "top_p": None, "top_k": None}),
            )
        dt = time.time() - ts
        n_new = gen_ids.shape[1] - enc["input_ids"].shape[1]
        print(
            f"--- {'sampled' if do_sample else 'greedy'} ({n_new} tokens, {dt:.2f} s):\n"
            f"{tokenizer.decode(gen_ids[0], skip_special_tokens=True)}\n",
            flush=True,
        )
    print(f"saved to {out}: {sorted(p.name for p in out.iterdir())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
