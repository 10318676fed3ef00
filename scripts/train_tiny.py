"""Train the tiny DSv4 model (main + one MTP layer) on CPU and ship it as the package's embedded model.

Everything is seeded: the BPE tokenizer, the weights, the hash layer's token->expert table and the batch
order. Stages:

1. tokenizer: byte-level BPE trained on ``data/tiny_corpus/train.jsonl`` (``scripts/tiny_corpus.py``), saved
   in HF format (``tokenizer.json`` + ``tokenizer_config.json``; BOS is prepended by its post-processor);
2. model: the real architecture at toy size (:data:`ARCH`): sliding-only, CSA (ratio 4 + indexer) and HCA
   (ratio 128) layers, one hash layer, routed + shared experts, one MTP block;
3. training: fp32, AdamW, warmup + cosine LR, grad clip; loss = main next-token CE + ``mtp_weight`` x MTP CE
   (the draft at ``p`` sees the main model's final 4-stream state at ``p`` and the embedding of token
   ``p + 1`` and predicts ``p + 2``). Router biases of top-k layers follow DeepSeek's auxiliary-loss-free
   balancing (nudged towards equal expert load after every step); the hash table stays fixed.
   The indexer gets no gradient (its top-k selection is discrete and DeepSeek trains it with a separate
   distillation loss we do not reproduce), so it keeps its seeded random weights;
4. export: bf16 weights (hc mixers, sinks, router biases, ``ape`` stay fp32 as in the official checkpoint)
   in upstream names, ``config.json`` in the HF dialect vLLM reads, the tokenizer; then the artifact is
   reloaded through our plan and must reproduce the exported model's logits bit for bit;
5. report: train / held-out loss for main and MTP and the draft's held-out agreement with the main model
   (greedy acceptance at k = 1) in ``benchmarks/results/train_tiny.{json,md}``.

    python scripts/train_tiny.py                      # full run (~15-20 min on 2 quiet cores)
    python scripts/train_tiny.py --steps 20 --out /tmp/tiny --results /tmp/train_tiny   # smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vllm_deepseek_v4.config import DSV4Config
from vllm_deepseek_v4.devtools.corpus import load_split, token_stream, token_windows
from vllm_deepseek_v4.devtools.records import meta, portable
from vllm_deepseek_v4.model import DSV4Model, init_random_
from vllm_deepseek_v4.model.moe import MoE
from vllm_deepseek_v4.model.mtp_eval import mtp_scores, teacher_forced_losses

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUT = ROOT / "src" / "vllm_deepseek_v4" / "assets" / "tiny"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "train_tiny"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"          # ids 0, 1, 2 (trained first)

# HF-style config.json fields (vocab_size is the tokenizer's). Sizes keep every linear's input a multiple
# of 32 so the quantised layouts of the zoo (MXFP4 / NVFP4 / W4A16 groups) apply; head_dim 64 is a size
# vLLM's CPU attention accepts; ratios: sliding, CSA, HCA, CSA, sliding (+ the sliding MTP layer).
ARCH: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "hidden_size": 128, "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 64, "qk_rope_head_dim": 16, "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 64,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "num_hash_layers": 1, "num_nextn_predict_layers": 1, "compress_ratios": [0, 4, 128, 4, 0, 0],
    "index_n_heads": 2, "index_head_dim": 32, "index_topk": 16, "sliding_window": 32,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1024, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


# ---- tokenizer ----
def train_tokenizer(docs: list[dict[str, str]], vocab_size: int) -> Any:
    """Byte-level BPE (lossless round trip) with the special tokens first; prepends BOS when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d["text"] for d in docs], trainer)
    if [tok.token_to_id(t) for t in (BOS, EOS, PAD)] != [0, 1, 2]:
        raise RuntimeError("tokenizer: special tokens did not get ids 0, 1, 2")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0)])
    return tok


def save_tokenizer(tok: Any, out: Path, max_len: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` through transformers' own writer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 model_max_length=max_len)
    hf.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"     # the name both transformers 4.x and 5.x resolve
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ---- model ----
def config_dict(vocab_size: int) -> dict[str, Any]:
    return {**ARCH, "vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def make_trainable(model: DSV4Model) -> list[dict[str, Any]]:
    """Turn on gradients (the model builds frozen parameters) and return AdamW parameter groups:
    weight decay on linear and embedding matrices only. Router biases stay frozen (balancing updates them)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("gate.bias"):
            continue
        p.requires_grad_(True)
        matrix = p.dim() == 2 and not name.rsplit(".", 1)[-1].startswith("hc_")
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


class LoadBalancer:
    """Auxiliary-loss-free balancing: count each top-k router's expert picks during the forward pass, then
    move ``gate.bias`` by ``rate * sign(mean load - load)`` (selection only; the weights ignore the bias)."""

    def __init__(self, model: DSV4Model, rate: float) -> None:
        self.rate = rate
        self.moes = [m for m in model.modules() if isinstance(m, MoE) and not m.gate.hash]
        self.loads: dict[int, torch.Tensor] = {}
        for moe in self.moes:
            self._wrap(moe)

    def _wrap(self, moe: MoE) -> None:
        route, E = moe.route, moe.cfg.n_routed_experts

        def counted(x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w, idx = route(x, ids)
            self.loads[id(moe)] = self.loads.get(id(moe), 0) + torch.bincount(idx.flatten(), minlength=E)
            return w, idx

        moe.route = counted  # type: ignore[method-assign]

    @torch.no_grad()
    def step(self) -> float:
        """Apply the bias update; returns the worst max/mean load ratio seen since the last step."""
        worst = 0.0
        for moe in self.moes:
            load = self.loads.pop(id(moe)).float()
            moe.gate.bias += self.rate * torch.sign(load.mean() - load)
            worst = max(worst, (load.max() / load.mean()).item())
        return worst


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# ---- export ----
def to_bf16(model: DSV4Model) -> DSV4Model:
    """The same weights in a bf16 model: bf16 where the checkpoint is bf16, fp32 where it is fp32."""
    out = DSV4Model(model.cfg, dtype=torch.bfloat16)
    out.load_state_dict(model.state_dict())            # copy_ casts per destination dtype
    return out.eval()


def save_artifact(model: DSV4Model, cfg: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n")


def check_reload(out: Path, exported: DSV4Model, sample: torch.Tensor) -> None:
    """The artifact must pass ``dsv4 verify`` and load through our plan into the exported model, exactly."""
    import subprocess

    from vllm_deepseek_v4.loader.load import load_model

    dsv4 = Path(sys.executable).with_name("dsv4")
    cmd = [str(dsv4)] if dsv4.exists() else [sys.executable, "-m", "vllm_deepseek_v4.cli.main"]
    res = subprocess.run([*cmd, "verify", str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"dsv4 verify {out} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    loaded, _ = load_model(str(out), progress=False)
    with torch.no_grad():
        for a, b in zip(_logits(exported, sample), _logits(loaded.eval(), sample)):
            if not torch.equal(a, b):
                raise RuntimeError(f"reloaded {out} does not reproduce the exported logits "
                                   f"(max |diff| {(a - b).abs().max().item():.3g})")


def _logits(model: DSV4Model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    main, hidden = model(ids)
    draft, _ = model.forward_mtp(hidden[:, :-2], ids[:, 1:-1], model.new_mtp_state())
    return main, draft


# ---- report ----
def write_report(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(portable(rec), indent=1) + "\n")   # repo-relative paths
    m, a, e = rec["meta"], rec["args"], rec["eval"]
    rows = [("train (fp32 weights)", e["train_fp32"]), ("held-out (fp32 weights)", e["heldout_fp32"]),
            ("held-out (bf16 weights, fp32 compute)", e["heldout_bf16w_fp32"]),
            ("held-out (bf16 weights, bf16 compute)", e["heldout_bf16"])]
    lines = [
        "# Tiny DSv4 (main + MTP) trained on CPU", "",
        f"Machine: {m['machine']}; threads {a['threads']}; git {m['git_sha']}; python {m['python']}; "
        f"torch {rec['torch']}", "",
        f"Wall time: {rec['train_wall_s']:.0f} s training ({rec['steps_per_s']:.3f} steps/s, "
        f"{a['steps']} steps x {a['batch']} x {a['seq_len']} tokens), {rec['total_wall_s']:.0f} s in all "
        f"(the machine was shared with other jobs; load average at start {rec['load_at_start']:.2f}).", "",
        f"Model: {rec['n_params'] / 1e6:.2f} M parameters ({rec['artifact_bytes'] / 2**20:.1f} MiB bf16 "
        f"safetensors); tokenizer: byte-level BPE, {rec['vocab_size']} tokens; corpus: "
        f"{rec['corpus']['train_tokens']} train / {rec['corpus']['heldout_tokens']} held-out tokens "
        f"(Python 3.11 docs + stdlib source, PSF licence).", "",
        "Agreement = argmax of the MTP draft at p == argmax of the main model at p + 1 (teacher-forced): "
        "the greedy acceptance rate at k = 1.", "",
        "| text / weights | main loss | MTP loss | main top-1 | draft top-1 | agreement (k=1) | positions |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in rows:
        lines.append(f"| {label} | {s['main_loss']:.3f} | {s['mtp_loss']:.3f} | {s['main_accuracy']:.3f} | "
                     f"{s['draft_accuracy']:.3f} | {s['agreement']:.3f} | {s['positions']} |")
    lines += ["", "Training curve (running means over the logging interval):", "",
              "| step | lr | main loss | MTP loss | max/mean expert load | elapsed s |", "|---|---|---|---|---|---|"]
    for r in rec["curve"]:
        lines.append(f"| {r['step']} | {r['lr']:.2e} | {r['main_loss']:.3f} | {r['mtp_loss']:.3f} | "
                     f"{r['max_load_ratio']:.2f} | {r['elapsed_s']:.0f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ---- main ----
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--bias-rate", type=float, default=1e-2, help="router bias step of the load balancing")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 keeps the run deterministic across machines and fast on a shared CPU")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out / train windows scored at the end")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = ap.parse_args()

    t_all = time.time()
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    train_docs, held_docs = load_split("train"), load_split("heldout")
    tok = train_tokenizer(train_docs, args.vocab)
    vocab = tok.get_vocab_size()
    save_tokenizer(tok, args.out, ARCH["max_position_embeddings"])
    train_ids, held_ids = token_stream(train_docs, tok, 0, 1), token_stream(held_docs, tok, 0, 1)
    train_w, held_w = token_windows(train_ids, args.seq_len), token_windows(held_ids, args.seq_len)
    print(f"tokenizer: {vocab} tokens; train {len(train_ids)} tokens ({len(train_w)} windows), "
          f"held-out {len(held_ids)} ({len(held_w)} windows)", flush=True)

    cfg_dict = config_dict(vocab)
    cfg = DSV4Config.from_dict(cfg_dict)
    model = init_random_(DSV4Model(cfg, dtype=torch.float32), seed=args.seed).train()
    with torch.no_grad():
        for name, p in model.named_parameters():      # start balanced and with a quiet sink
            if name.endswith("gate.bias"):
                p.zero_()
    groups = make_trainable(model)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    balancer = LoadBalancer(model, args.bias_rate)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_w), generator=gen)
    cursor, curve, acc = 0, [], {"main": 0.0, "mtp": 0.0, "load": 0.0, "n": 0}
    t_train = time.time()
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(train_w), generator=gen), 0
        ids = train_w[order[cursor:cursor + args.batch]]
        cursor += args.batch
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        main_ce, mtp_ce = teacher_forced_losses(model, ids)
        loss = main_ce + args.mtp_weight * mtp_ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.clip)
        opt.step()
        acc["load"] = max(acc["load"], balancer.step())
        acc["main"] += main_ce.item()
        acc["mtp"] += mtp_ce.item()
        acc["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "lr": lr, "main_loss": acc["main"] / acc["n"], "mtp_loss": acc["mtp"] / acc["n"],
                   "max_load_ratio": acc["load"], "elapsed_s": time.time() - t_train}
            curve.append(row)
            print(json.dumps(row), flush=True)
            acc = {"main": 0.0, "mtp": 0.0, "load": 0.0, "n": 0}
    train_wall = time.time() - t_train

    model.eval()
    exported = to_bf16(model)
    save_artifact(exported, cfg_dict, args.out)
    check_reload(args.out, exported, held_w[:2])
    print(f"exported {args.out} (verify ok, reload bit-identical)", flush=True)

    n_eval = min(args.eval_windows, len(held_w))
    sel = torch.randperm(len(train_w), generator=torch.Generator().manual_seed(1))[:n_eval]
    fp32_of_bf16 = DSV4Model(cfg, dtype=torch.float32)
    fp32_of_bf16.load_state_dict(exported.state_dict())
    evals = {
        "train_fp32": mtp_scores(model, train_w[sel]).as_dict(),
        "heldout_fp32": mtp_scores(model, held_w[:n_eval]).as_dict(),
        "heldout_bf16w_fp32": mtp_scores(fp32_of_bf16.eval(), held_w[:n_eval]).as_dict(),
        "heldout_bf16": mtp_scores(exported, held_w[:n_eval]).as_dict(),
    }
    rec = {
        "meta": meta(), "torch": torch.__version__, "args": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()},
        "load_at_start": load_at_start, "train_wall_s": train_wall, "steps_per_s": args.steps / train_wall,
        "total_wall_s": time.time() - t_all, "n_params": n_params, "vocab_size": vocab,
        "artifact_bytes": (args.out / "model.safetensors").stat().st_size,
        "corpus": {"train_tokens": len(train_ids), "heldout_tokens": len(held_ids)},
        "eval": evals, "eval_windows": n_eval, "curve": curve,
    }
    write_report(args.results, rec)
    print(json.dumps(evals, indent=1), flush=True)


if __name__ == "__main__":
    main()
