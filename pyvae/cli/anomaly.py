"""``python -m pyvae anomaly RUN --ood SET``: log p(x) as an anomaly score, the ROC AUC of the
run's test images against another set's."""

from __future__ import annotations

from pyvae.cli.trained import explore_setup, held_out_images, unlabelled
from pyvae.errors import PyvaeError
from pyvae.infer.explore import anomaly_auc
from pyvae.infer.importance import log_likelihood
from pyvae.runs import write_json
from pyvae.viz import plots

BINARIZED = {
    "none": "scored as stored (no binarization)",
    "static": "binarized by one fixed Bernoulli draw of its grey levels",
    "dynamic": "binarized by one fixed Bernoulli draw of its grey levels (training drew afresh)",
}
CAVEAT = (
    "  caveat: the out-of-distribution images got *higher* likelihood on average. This is a "
    "known failure of likelihood-based detection (Nalisnick et al. 2019): simple images score "
    "high under any density model, whatever it was trained on."
)


def main(args) -> None:
    vae, config, out = explore_setup(args, "num_samples", "num_points")
    data, x_in, mode_in = held_out_images(vae, config, args, args.num_points)
    ood, x_ood, mode_ood = held_out_images(vae, config, args, args.num_points, dataset=args.ood)
    if x_ood.shape[1] != vae.x_dim:
        raise PyvaeError(
            f"{args.ood} images have {x_ood.shape[1]} pixels; the model expects {vae.x_dim}"
        )
    ll_in = log_likelihood(vae, unlabelled(vae, x_in), args.num_samples).log_px
    ll_ood = log_likelihood(vae, unlabelled(vae, x_ood), args.num_samples).log_px
    auc = anomaly_auc(ll_in, ll_ood)
    result = {
        "in_distribution": data.name,
        "out_of_distribution": ood.name,
        "num_points": len(x_in),
        "num_samples": args.num_samples,
        # only the run's own set was drawn afresh in training; another set is one fixed draw
        "binarization": {
            data.name: BINARIZED[mode_in],
            ood.name: BINARIZED["static" if mode_ood == "dynamic" else mode_ood],
        },
        "roc_auc": auc,
        "log_px_in": float(ll_in.mean()),
        "log_px_ood": float(ll_ood.mean()),
    }
    names = (data.name, ood.name)
    plots.anomaly_histogram(ll_in, ll_ood, names, auc, args.num_samples, out / "anomaly_hist.png")
    write_json(out / "anomaly.json", result)
    report(result)
    print(f"wrote {out}/anomaly_hist.png, anomaly.json")


def report(result: dict) -> None:
    """The lines anomaly prints about its ``result``."""
    auc, ins, outs = result["roc_auc"], result["in_distribution"], result["out_of_distribution"]
    print(f"ROC AUC of -log p(x), {ins} (in) vs {outs} (out): {auc:.3f}")
    print(
        f"  {result['num_points']} test images of each, evenly spread; log p(x) by importance "
        f"sampling, K = {result['num_samples']}"
    )
    for name, how in result["binarization"].items():
        print(f"  {name}: {how}")
    print(f"  mean log p(x): in {result['log_px_in']:.2f}, out {result['log_px_ood']:.2f} nats")
    if auc < 0.5:
        print(CAVEAT)
