"""``otbr-bench diagnose``: the paper's own analyses on a checkpoint (see :mod:`otbr_plugin.analysis.diagnose`)."""

from __future__ import annotations

import argparse

from . import add_run_arguments, formatter, run_settings

EPILOG = """examples:
  otbr-bench diagnose runs/badnets --out runs/badnets-diagnose
  otbr-bench diagnose runs/badnets --out runs/badnets-diag-ref --setting reference
  otbr-bench diagnose runs/badnets --out runs/d --gammas 0.01,0.05,0.1 --lams 0.5,1.0 --set nwc_norm=fan_in
  otbr-bench diagnose BackdoorBench/record/badnet_0_1 --data-root BackdoorBench/data/cifar10 --out runs/bb-diag

What it writes into --out (atomically: a temporary folder beside it, renamed at the end):
  nwc.csv, nwc_correlation.csv, nwc_top_auc.csv, nwc_scatter.png, nwc_scatter_layers.png
      NWC of random unlearning (the defense's own, on noise) vs NWC of poison unlearning (the same ascent loop
      on the checkpoint's poisoned training samples with their poisoned labels) and of clean unlearning (clean
      training samples): Pearson/Spearman per layer and overall, ROC AUC of random NWC for the top 5% neurons
      by poison NWC (paper Fig. 1). A BackdoorBench record uses its bd_train set; without one that part is
      skipped with a note.
  oracle_diagnostic_test_set_grid.csv, oracle_diagnostic_test_set_heatmaps.png
      ORACLE DIAGNOSTIC (test set): ACC/ASR/RA of the pruned-only and the fused model over gamma x lambda
      (paper Fig. 5). Scored on the test set, so never a way to choose a reported result.
  pruned_per_layer.csv/.png, weight_norms.csv/.png
      pruned neurons per layer; neuron weight L2 norms of the backdoored, pruned and fused models (Fig. 4).
  summary.md, summary.json
The OTBR config is resolved as for `defend` (--config, else configs/defense/otbr/<dataset>.yaml, then
--setting, then --set key=value).
"""


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="NWC correlation, oracle gamma x lambda grid, weight norms of one checkpoint",
                       formatter_class=formatter(), epilog=EPILOG)
    p.add_argument("checkpoint", help="a bundle folder (or a BackdoorBench record folder)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--config", default=None, help="OTBR config YAML (flat key: value)")
    p.add_argument("--setting", choices=("fixed", "reference"), default=None,
                   help="OTBR setting (default: as the config says, i.e. fixed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one OTBR config field (repeatable)")
    p.add_argument("--gammas", type=_floats, default=None, metavar="G1,G2,...",
                   help="gamma values of the oracle grid (default 0.01,0.05,0.1,0.2,0.3)")
    p.add_argument("--lams", type=_floats, default=None, metavar="L1,L2,...",
                   help="lambda values of the oracle grid (default 0.25,0.5,0.75,1.0)")
    p.add_argument("--unlearn-samples", type=int, default=None, metavar="N",
                   help="poisoned / clean training samples used for data unlearning (default: unlearn_steps x "
                        "unlearn_batch_size of the config, i.e. each sample seen once)")
    p.add_argument("--eval-samples", type=int, default=2000, metavar="N",
                   help="ACC/ASR/RA on a seeded subset of N clean and N poisoned test samples (0: the whole test "
                        "sets; evaluation is most of the run time: 26 evaluations for the default grid)")
    p.add_argument("--top", type=float, default=0.05, help="share of neurons (by poison NWC) that are the AUC's positives")
    p.add_argument("--data-root", default=None, help="data root of the training/test split (default $OTBR_DATA or ./data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in foreign checkpoints (only for files you trust)")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmark_adapters.checkpoints import load_checkpoint

    from ..analysis.diagnose import (DEFAULT_GAMMAS, DEFAULT_LAMS, ORACLE_TITLE, check_out_dir, diagnose,
                                  summary_data, write_diagnosis)
    from ..data import DatasetNotFoundError, get_dataset_spec, load_dataset
    from ..defenses.otbr import OTBRDefense
    from ..config import resolve_config

    gammas = list(args.gammas or DEFAULT_GAMMAS)
    lams = list(args.lams or DEFAULT_LAMS)
    bad = [g for g in gammas if not 0.0 <= g < 1.0] + [l for l in lams if not 0.0 <= l <= 1.0]
    if bad:
        raise ValueError(f"--gammas must lie in [0, 1) and --lams in [0, 1]; got {bad}")
    if args.unlearn_samples is not None and args.unlearn_samples < 1:
        raise ValueError(f"--unlearn-samples must be >= 1, got {args.unlearn_samples}")
    if args.eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0 (0: the whole test sets), got {args.eval_samples}")
    if not 0.0 < args.top < 1.0:
        raise ValueError(f"--top must be a share in (0, 1), got {args.top}")
    check_out_dir(args.out, args.overwrite)  # fail before any work
    settings = run_settings(args)
    device = settings.device

    bundle = load_checkpoint(args.checkpoint, data_root=args.data_root, trust=args.trust_checkpoint)
    data_root = args.data_root or bundle.extra.get("data_root")
    overrides = list(args.overrides)
    if args.setting:
        overrides.insert(0, f"setting={args.setting}")
    resolved = resolve_config("defense", "otbr", bundle.dataset, args.config, overrides)
    cfg, source = resolved.values, resolved.source
    defense = OTBRDefense(cfg)
    print(f"otbr config ({source}{', ' + ' '.join(overrides) if overrides else ''}): {defense.config.to_dict()}")

    spec = get_dataset_spec(bundle.dataset)
    clean_test = load_dataset(spec.name, "test", data_root)
    try:
        train = load_dataset(spec.name, "train", data_root)
    except DatasetNotFoundError as err:
        print(f"training split not found ({err}); data unlearning is skipped")
        train = None
    d = diagnose(bundle, defense, clean_test=clean_test, train=train, gammas=gammas, lams=lams,
                 unlearn_samples=args.unlearn_samples, device=device, seed=settings.seed,
                 progress=settings.progress, trust=args.trust_checkpoint, top=args.top,
                 eval_samples=args.eval_samples or None)
    out = write_diagnosis(d, args.out, overwrite=args.overwrite)
    s = summary_data(d)
    for comp, v in s["correlation_overall"].items():
        print(f"NWC {comp}: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f} over {v['neurons']} neurons")
    for a in d.auc:
        print(f"ROC AUC of {a['ranking']} for the top {a['top'] * 100:g}% neurons by {a['reference']}: {a['auc']:.3f}")
    for note in d.notes:
        print(f"note: {note}")
    fused = d.grid[d.grid.model == "fused"].sort_values(["asr", "acc"], ascending=[True, False])
    if len(fused):
        best = fused.iloc[0]
        print(f"{ORACLE_TITLE}: lowest fused ASR {best.asr * 100:.2f}% at gamma {best.gamma:g}, lambda {best.lam:g} "
              f"(ACC {best.acc * 100:.2f}%)")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in d.seconds.items()))
    print(f"wrote {out}")
    return 0
