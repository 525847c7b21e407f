"""What prediction trust's uploaded top-k logits reveal, unprotected and protected (issue 33 item 4).

For each seed, one run of the setting config (default bench/configs/evidence-audit-tiny.yaml: a tiny
random model, 2 BBC clients that overfit 16 training windows each, prediction trust keeping each client's
own adapter; bench/configs/evidence-audit-smollm2.yaml: the same on SmolLM2, whose LoRA memorises them).
Then, for each client, the attacks `cotune audit` makes on the uploaded logits
(`runtime.audit.evidence_attack`: its training windows and as many held-out ones planted in the public
set, sent as the client sends its evidence; scored by the loss the upload gives their true tokens, and by
the true tokens' reciprocal rank among the sent values, which clipping's rescaling does not blunt), sent
unprotected and protected with `privacy.evidence_clip` C_e (default 1) at each
`privacy.evidence_noise_multiplier` sigma_e (default 0, i.e. clipping alone, 0.1, 0.3, 1, 3), next to the
adapter's own loss attack. For each sigma_e, the evidence's epsilon after the run's rounds
(`algorithms.privacy.epsilon_spent`, q = 1, delta 1e-5).

Collected per sigma_e: AUC and TPR at 1% FPR averaged over a seed's clients, then over seeds (mean, t
interval: `reporting.stats`). Run directories go to runs/bench/evidence/s<seed> (gitignored; a finished
run is not rerun). Written to bench/results/evidence_audit.{json,md}.

    .venv/bin/python bench/evidence_audit.py [--seeds 0 1 2] [--sigmas 0 0.1 0.3 1 3] [--clip 1]
    .venv/bin/python bench/evidence_audit.py --config bench/configs/evidence-audit-smollm2.yaml --seeds 0 \
        --runs runs/bench/evidence-smollm2 --name evidence_audit_smollm2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from fedcollm_quality import provenance, save_results  # noqa: E402
from privacy_audit import call, cotune, finished  # noqa: E402  (one way to run a sweep's command)

from cotune.reporting.stats import summarize  # noqa: E402

NAME = "evidence_audit"
CONFIG = HERE / "configs" / "evidence-audit-tiny.yaml"
UNPROTECTED = "unprotected"
FIGURES = ("auc", "tpr_at_1pct_fpr")
ATTACKS = ("loss", "rank")  # runtime.audit.EvidenceAttacks; the adapter's row has the loss attack only
DELTA = 1e-5


def level_name(sigma: float | None) -> str:
    return UNPROTECTED if sigma is None else f"sigma_e={sigma:g}"


def audit_run(run_dir: Path, sigmas: list[float], clip: float, max_examples: int) -> dict[str, dict]:
    """Client-mean figures of one run: the adapter's loss attack, the evidence attacks at each level."""
    from cotune.algorithms.privacy import EvidenceProtection
    from cotune.data.client_examples import client_data
    from cotune.runtime.audit import audit_client, evidence_attack
    from cotune.runtime.results import open_tuned

    rows: dict[str, list[dict]] = {}
    tuned = open_tuned(run_dir, client=0)
    cfg = tuned.cfg
    data = client_data(cfg.data, cfg.federation.clients, tuned.tokenizer, cfg.run.seed)
    for k in range(cfg.federation.clients):
        tuned = open_tuned(run_dir, client=k)
        own = data.clients[k]
        assert own.test is not None
        n = min(len(own.train), len(own.test), max_examples)
        adapter = audit_client(tuned, k, own, max_examples)
        rows.setdefault("adapter", []).append({"loss": adapter.loss.as_dict(), "rank": None})
        for sigma in [None, *sigmas]:
            protection = None if sigma is None else EvidenceProtection(clip, sigma, seed=k)
            result = evidence_attack(tuned, k, own.train, own.test, n, protection)
            rows.setdefault(level_name(sigma), []).append(result.as_dict())
    return {
        level: {
            attack: None
            if got[0][attack] is None
            else {f: statistics.fmean(r[attack][f] for r in got) for f in FIGURES}
            for attack in ATTACKS
        }
        for level, got in rows.items()
    }


def summarise(per_seed: dict[str, list[dict]], rounds: int) -> dict[str, dict]:
    """Per level: each attack's figures over seeds (`reporting.stats.summarize`), the evidence's epsilon
    after `rounds` (a protected level), and the per-seed rows."""
    from cotune.algorithms.privacy import epsilon_spent

    levels: dict[str, dict] = {}
    for level, got in per_seed.items():
        levels[level] = {
            a: None if got[0][a] is None else {f: vars(summarize([r[a][f] for r in got])) for f in FIGURES}
            for a in ATTACKS
        }
        if level.startswith("sigma_e="):
            sigma = float(level.split("=", 1)[1])
            levels[level]["epsilon"] = epsilon_spent(sigma, 1.0, rounds, DELTA)
        levels[level]["per_seed"] = got
    return levels


def cells(attack: dict | None) -> str:
    """An attack's AUC (mean and interval over seeds) and TPR cells; '—' for an attack not made."""
    if attack is None:
        return "— | —"
    auc, tpr = attack["auc"], attack["tpr_at_1pct_fpr"]
    interval = "" if auc["low"] is None else f" [{auc['low']:.3f}, {auc['high']:.3f}]"
    return f"{auc['mean']:.3f}{interval} | {tpr['mean']:.3f}"


def markdown(result: dict) -> str:
    lines = [
        "## Evidence audit (bench/evidence_audit.py)",
        "",
        f"Config `{result['config']}`, seeds {result['seeds']}, C_e = {result['clip']:g}, "
        f"{result['rounds']} round(s), δ = {DELTA:g}; members per client: up to {result['max_examples']}; "
        "TPR at 1% FPR. "
        f"Machine: {result['machine']}; commit {result['commit']}; `{result['command']}`.",
        "",
        "| released | ε of the evidence | loss AUC (mean [95% CI]) | loss TPR | rank AUC | rank TPR |",
        "|---|---|---|---|---|---|",
    ]
    for level, row in result["levels"].items():
        eps = row.get("epsilon")
        shown = "—" if eps is None else ("∞" if eps == float("inf") else f"{eps:.3g}")
        lines.append(f"| {level} | {shown} | " + " | ".join(cells(row[a]) for a in ATTACKS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--clip", type=float, default=1.0, help="privacy.evidence_clip C_e")
    ap.add_argument("--max-examples", type=int, default=64, help="members (and non-members) per client")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench" / "evidence")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default=NAME, help="the results' file name (one per setting config)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = ap.parse_intermixed_args()

    from cotune.runtime.results import run_config

    t0 = time.perf_counter()
    per_seed: dict[str, list[dict]] = {}
    rounds = 0
    for seed in args.seeds:
        d = args.runs / f"s{seed}"
        if not finished(d):
            cmd = cotune("run", str(args.config), *args.overrides, f"run.seed={seed}", "--out", str(d))
            call(cmd, f"the run of seed {seed}")
        rounds = run_config(d).federation.rounds
        for level, row in audit_run(d, args.sigmas, args.clip, args.max_examples).items():
            per_seed.setdefault(level, []).append(row)
    result = {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "seeds": args.seeds,
        "clip": args.clip,
        "rounds": rounds,
        "max_examples": args.max_examples,
        "levels": summarise(per_seed, rounds),
        **provenance("evidence_audit.py"),
        "invocation_seconds": time.perf_counter() - t0,
    }
    save_results(args.results, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
