"""The model card written beside every export: what the model is for, on what data (in aggregate)
it was trained, how well it did at each site and pooled, under what privacy guarantee, with what code.

Sections follow Model Cards for Model Reporting (Mitchell et al., 2019): model details, intended
use, factors (sites and subgroups), metrics, evaluation data, training data, quantitative analyses,
ethical considerations, caveats. The TRIPOD+AI items a federated model can answer are covered too:
data sources and their dates are the sites' (not known to the centre), so the card gives each
site's split sizes and prevalence, the selection rule, performance with 95% intervals, calibration,
and the limitations. Everything comes from the run directory: no site sends anything for the card.

Counts from 1 to k-1 are printed as ``<k``, with k the largest of the sites' ``min-reported-count``
(their site policy), so a count small enough to point at a patient never appears in the document.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.policy import SitePolicy
from common.rundir import RunDirectory, json_safe

CARD_FORMAT = "clinicfl-model-card/1"
# The metrics the card reports per site and pooled, in this order.
CARD_METRICS = (("auc", "AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
                ("accuracy", "Accuracy"), ("precision", "Precision"), ("f1", "F1"), ("mae", "Severity MAE"))
PLACEHOLDER = ("NOT PROVIDED: the coordinating centre has not described this. Write it in a TOML file and "
               "export again with clinicfl-server export RUN --use FILE (docs/predict.md, 'Model card').")


@dataclass(frozen=True)
class IntendedUse:
    """The centre's own statement of use, from a TOML file with the keys below (all text)."""

    intended_use: str = PLACEHOLDER
    intended_users: str = PLACEHOLDER
    out_of_scope: str = PLACEHOLDER
    contact: str = PLACEHOLDER
    provided: bool = False

    @classmethod
    def load(cls, path: Path | None) -> "IntendedUse":
        if path is None:
            return cls()
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the intended-use file {path}: {exc}") from None
        keys = {"intended-use", "intended-users", "out-of-scope", "contact"}
        unknown = set(values) - keys
        if unknown:
            raise ValueError(f"{path}: unknown keys {', '.join(sorted(unknown))}; the file may hold "
                             f"{', '.join(sorted(keys))}")
        if "intended-use" not in values or "out-of-scope" not in values:
            raise ValueError(f"{path} must say at least intended-use and out-of-scope")
        text = {key.replace("-", "_"): str(value).strip() for key, value in values.items()}
        return cls(**text, provided=True)


def build_model_card(run: RunDirectory, server_round: int, export: dict[str, Any], use: IntendedUse,
                     trainable: int, total: int) -> dict[str, Any]:
    """The card of round ``server_round``'s export (the dict ``export`` is about to be saved), as
    JSON-able data; ``write_model_card`` adds the saved file's name and sha256."""
    config = RunConfig.from_mapping(run.config())
    records = {r["round"]: r for r in run.read_metrics()}
    record = records.get(server_round, {})
    trained = [r for n, r in sorted(records.items()) if n <= server_round]
    meta = run.meta()
    min_count = _min_reported_count(record)
    card = {
        "format": CARD_FORMAT,
        "model": {"file": None, "sha256": None, "run": run.name, "round": server_round,
                  "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "labels": config.model.names(), "task": _task(config)},
        "intended-use": asdict(use),
        "architecture": _architecture(config, meta, trainable, total),
        "code": _code(meta, trained),
        "data": _data(record, trained, min_count, run),
        "training": _training(config, export, list(records.values())),
        "performance": _performance(record),
        "calibration": export.get("calibration", {}),
        "privacy": _privacy(config, trained),
        "limitations": [],
        "suppression": {"min-reported-count": min_count,
                        "rule": f"counts from 1 to {min_count - 1} are shown as <{min_count}"},
    }
    card["limitations"] = _limitations(card, config)
    return json_safe(card)


def write_model_card(card: dict[str, Any], model_file: Path) -> tuple[Path, Path]:
    """``<model>.model-card.md`` and ``.json`` beside the saved model file, with its name and sha256
    (one card per export, so exporting several rounds into one folder never leaves a card
    describing another model)."""
    card["model"].update(file=model_file.name, sha256=_sha256(model_file))
    md, js = card_paths(model_file)
    md.write_text(render_markdown(card))
    js.write_text(json.dumps(card, indent=2))
    return md, js


def card_paths(model_file: Path) -> tuple[Path, Path]:
    """Where the model card of ``model_file`` is: ``<model>.model-card.md`` and ``.json``."""
    stem = model_file.with_suffix("")
    return Path(f"{stem}.model-card.md"), Path(f"{stem}.model-card.json")


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """What ``clinicfl-client predict`` shows in its index.html: the few lines a reader needs."""
    pooled = card["performance"].get("pooled", {})
    return {"title": f"{card['model']['task']} (run {card['model']['run']}, round {card['model']['round']})",
            "intended-use": card["intended-use"]["intended_use"],
            "out-of-scope": card["intended-use"]["out_of_scope"],
            "auc": _fmt_metric(pooled.get("auc")),
            "sensitivity": _fmt_metric(pooled.get("sensitivity")),
            "specificity": _fmt_metric(pooled.get("specificity")),
            "privacy": card["privacy"]["summary"],
            "selection": card["training"]["selection"]["rule"],
            "limitations": card["limitations"]}


# ---------------------------------------------------------------------- sections
def _task(config: RunConfig) -> str:
    return "Sports-injury prediction from imaging studies: " + ", ".join(config.model.names())


def _architecture(config: RunConfig, meta: dict[str, Any], trainable: int, total: int) -> dict[str, Any]:
    m = config.model
    heads = [f"injury logits ({', '.join(m.names())})"]
    heads += ["severity regression"] if m.severity_head else []
    heads += [f"image reconstruction ({m.recon_size}x{m.recon_size})"] if m.recon_head else []
    weights = {"none": "none: seeded random initialisation", "imagenet": "ImageNet (torchvision IMAGENET1K_V2)"}
    return {"summary": (f"ResNet50 (torchvision) encodes each image of a study ({m.image_size}x{m.image_size}, "
                        f"up to {m.seq_len} per study); a projection to {m.proj_dim}, "
                        + (f"{m.biomech_features} biomechanical features per step, " if m.biomech_features else "")
                        + f"a BiGRU ({m.gru_hidden} per direction) and scaled dot-product attention pooling "
                          f"({m.attn_dim}) feed the heads."),
            "backbone-weights": weights.get(m.backbone_weights, f"file {Path(m.backbone_weights).name}"),
            "backbone-sha256": meta.get("backbone-hash"),
            "fine-tuning": str(m.freeze), "feature-standardisation": str(m.feature_norm), "heads": heads,
            "parameters-total": total, "parameters-trainable": trainable}


def _code(meta: dict[str, Any], trained: list[dict[str, Any]]) -> dict[str, Any]:
    source = meta.get("provenance") or {}
    approved = sorted({site for r in trained for site, t in (r.get("train") or {}).items()
                       if t.get("gate-approved")})
    sites = sorted({site for r in trained for site in (r.get("train") or {})})
    return {"app-bundle-sha256": meta.get("app-bundle-sha256") or None,
            "sites-whose-gate-approved-it": approved,
            "sites-without-a-gate": [s for s in sites if s not in approved],
            "commit": source.get("commit"), "modified": source.get("modified"),
            "versions": source.get("versions", {})}


def _data(record: dict[str, Any], trained: list[dict[str, Any]], k: int, run: RunDirectory) -> dict[str, Any]:
    train_counts: dict[str, int] = {}
    for r in trained:  # each site's latest training size (a site may miss a round)
        for site, t in (r.get("train") or {}).items():
            train_counts[site] = int(t["num-examples"])
    test = record.get("evaluation") or {}
    sites = sorted(set(train_counts) | set(test))
    rows = []
    for site in sites:
        t = test.get(site) or {}
        rows.append({"site": site, "train": _suppress(train_counts.get(site), k),
                     "validation": _suppress(t.get("val-n"), k), "validation-positives": _suppress(t.get("val-positives"), k),
                     "test": _suppress(t.get("n"), k), "test-positives": _suppress(t.get("positives"), k),
                     "test-prevalence": _prevalence(t, k),
                     **({"note": t["suppressed"]} if "suppressed" in t else {})})
    data_root = run.config().get("data-root") or ""
    generated = bool(data_root) and (Path(data_root) / "dataset.json").is_file()
    return {"sites": rows, "synthetic": generated,
            "source": ("synthetic clinics written by clinicfl-sim generate (fake patients)" if generated else
                       "each site's own studies; the centre never sees them, only the aggregates below"),
            "training-prevalence": "not disclosed: sites send no label counts of their training data "
                                   "(it would sit outside the DP guarantee)"}


def _training(config: RunConfig, export: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    best = export.get("best-round") or {}
    metric = best.get("metric", config.federation.best_metric)
    rule = (f"round {export.get('round')} of {export.get('last-round')}, chosen by {metric} "
            f"({_selection_source(str(metric))}); test statistics are reported for it and never used to choose")
    t = config.train
    return {"rounds-run": len([r for r in records if r.get("round", 0) > 0]), "aggregation": str(config.federation.aggregation),
            "local-epochs": t.local_epochs, "batch-size": t.batch_size, "learning-rate": t.lr,
            "weight-decay": t.weight_decay,
            "selection": {"metric": metric, "value": best.get("value"), "round": export.get("round"), "rule": rule}}


def _selection_source(metric: str) -> str:
    if metric.startswith("server-val"):
        return "the centre's own validation clinic"
    if metric.startswith("val"):
        return "the sites' pooled validation splits"
    return "not a validation statistic"


def _performance(record: dict[str, Any]) -> dict[str, Any]:
    catalogue = record.get("catalogue") or {}
    pooled, per_site = {}, {}
    for name, _ in CARD_METRICS:
        entry = catalogue.get(name)
        if not entry:
            continue
        pooled[name] = {"value": entry.get("value"), "ci95": entry.get("ci95"), "ci-method": entry.get("ci_method"),
                        "reason": entry.get("reason") or entry.get("ci_reason")}
        intervals = entry.get("per_site_ci95") or {}
        for site, value in (entry.get("per_site") or {}).items():
            per_site.setdefault(site, {})[name] = {"value": value, "ci95": intervals.get(site)}
    validation = record.get("validation") or {}
    return {"split": "test", "pooled": pooled, "per-site": per_site,
            "validation": {name: {"value": entry.get("value"), "reason": entry.get("reason"),
                                  **({"ci95": entry["ci95"]} if "ci95" in entry else {})}
                           for name, entry in validation.items() if name in ("loss", "auc")},
            "subgroups": record.get("subgroups") or {}}


def _privacy(config: RunConfig, trained: list[dict[str, Any]]) -> dict[str, Any]:
    per_site: dict[str, dict[str, float]] = {}
    for r in trained:
        per_site.update(r.get("privacy") or {})
    secure = config.federation.secure_aggregation
    if not per_site:
        summary = "none: trained without differential privacy"
    else:
        eps = max(p["epsilon"] for p in per_site.values())
        delta = max(p["delta"] for p in per_site.values())
        summary = (f"DP-SGD at every site, ({eps:.3g}, {delta:.2g})-DP at worst per site over the whole run "
                   f"({config.privacy.dp_accountant} accountant)")
    return {"summary": summary, "per-site": per_site, "accountant": str(config.privacy.dp_accountant),
            "unit": str(config.privacy.dp_unit), "secure-aggregation": secure,
            "not-covered": "the sites' feature standardisation statistics stay at the site and are not released"}


def _limitations(card: dict[str, Any], config: RunConfig) -> list[str]:
    out = []
    if config.model.backbone_weights == "none":
        out.append("The ResNet50 backbone is randomly initialised (no pretrained weights), so its features are "
                   "generic; a backbone trained on images would likely do better.")
    if card["data"]["synthetic"]:
        out.append("Trained and tested on synthetic data: these figures say nothing about performance on patients.")
    auc = card["performance"]["pooled"].get("auc") or {}
    if auc.get("ci95") and auc["ci95"][1] - auc["ci95"][0] > 0.2:
        out.append(f"The test sets are small: the pooled AUC's 95% interval is {auc['ci95'][1] - auc['ci95'][0]:.2f} "
                   "wide.")
    if card["privacy"]["per-site"] == {}:
        out.append("No differential privacy: the model's parameters may reveal information about training studies.")
    if not card["code"]["sites-whose-gate-approved-it"]:
        out.append("No site reports that its approval gate checked the app bundle (a simulation, or sites run "
                   "without sitegate).")
    if not card["intended-use"]["provided"]:
        out.append("The intended use has not been written by the coordinating centre.")
    return out


# ---------------------------------------------------------------------- helpers
def _min_reported_count(record: dict[str, Any]) -> int:
    """The strictest of the sites' ``min-reported-count``; the policy default for sites that sent none."""
    sent = [int(v["min-reported-count"]) for v in (record.get("evaluation") or {}).values()
            if isinstance(v, dict) and v.get("min-reported-count")]
    return max(sent + [SitePolicy().min_reported_count])


def _suppress(count: Any, k: int) -> int | str | None:
    if count is None:
        return None
    count = int(count)
    return f"<{k}" if 0 < count < k else count


def _prevalence(site: dict[str, Any], k: int) -> float | str | None:
    n, positives = site.get("n"), site.get("positives")
    if not n or positives is None:
        return None
    return "suppressed" if 0 < positives < k or 0 < n - positives < k else positives / n


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fmt_metric(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "not available" + (f" ({entry['reason']})" if entry and entry.get("reason") else "")
    text = f"{entry['value']:.3f}"
    if entry.get("ci95"):
        text += f" [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"
    elif "ci95" in entry:  # a figure with no interval: too few studies of a class, or a variance of 0
        text += " (no interval)"
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render_markdown(card: dict[str, Any]) -> str:
    """The card as a document a clinician or an ethics board reads."""
    m, use, arch, code = card["model"], card["intended-use"], card["architecture"], card["code"]
    data, training, perf, privacy = card["data"], card["training"], card["performance"], card["privacy"]
    lines = [f"# Model card: {m['task']}", "",
             f"Run `{m['run']}`, round {m['round']}, exported {m['exported']}. Model file `{m['file']}` "
             f"(sha256 `{m['sha256']}`).", "",
             "## Intended use", "", f"**Intended use.** {use['intended_use']}", "",
             f"**Intended users.** {use['intended_users']}", "", f"**Out of scope.** {use['out_of_scope']}", "",
             f"**Contact.** {use['contact']}", "",
             "## Model", "", arch["summary"], "",
             "| | |", "|---|---|",
             f"| Backbone weights | {arch['backbone-weights']} |",
             f"| Backbone sha256 | `{arch['backbone-sha256']}` |",
             f"| Fine-tuning of the backbone | {arch['fine-tuning']} |",
             f"| Feature standardisation | {arch['feature-standardisation']} |",
             f"| Heads | {'; '.join(arch['heads'])} |",
             f"| Parameters | {arch['parameters-total']:,} in all, {arch['parameters-trainable']:,} trained |", "",
             "## Code", "",
             f"App bundle sha256: `{code['app-bundle-sha256'] or 'not recorded'}`. "
             + (f"Sites whose approval gate checked this bundle: {', '.join(code['sites-whose-gate-approved-it'])}. "
                if code["sites-whose-gate-approved-it"] else "No site reports an approval gate. ")
             + (f"Source commit `{code['commit']}`" + (" with local changes" if code["modified"] else "") + "."
                if code["commit"] else "Source commit not recorded (not a git checkout)."), "",
             "| Library | Version |", "|---|---|",
             *[f"| {name} | {version} |" for name, version in code["versions"].items()], "",
             "## Data", "", f"{data['source'][0].upper()}{data['source'][1:]}. Training-set prevalence: {data['training-prevalence']}. "
             f"{card['suppression']['rule'].capitalize()}.", "",
             "| Site | Train | Validation (positives) | Test (positives) | Test prevalence |", "|---|---|---|---|---|",
             *[f"| {r['site']} | {_fmt(r['train'])} | {_fmt(r['validation'])} ({_fmt(r['validation-positives'])}) | "
               f"{_fmt(r['test'])} ({_fmt(r['test-positives'])}) | {_fmt(r['test-prevalence'])} |"
               for r in data["sites"]], "",
             "## Training and selection", "",
             f"{training['rounds-run']} rounds of {training['aggregation']}, {training['local-epochs']} local epochs, "
             f"batch {training['batch-size']}, learning rate {training['learning-rate']}, weight decay "
             f"{training['weight-decay']}. Selection: {training['selection']['rule']}.", "",
             "## Performance on the test splits", "",
             "95% intervals in brackets (AUC: DeLong on the binned scores; proportions: Wilson; MAE: normal "
             "approximation). Pooled over the sites:", "",
             "| Metric | Pooled |", "|---|---|",
             *[f"| {label} | {_fmt_metric(perf['pooled'].get(name))} |" for name, label in CARD_METRICS
               if name in perf["pooled"]], ""]
    sites = sorted(perf["per-site"])
    if sites:
        shown = [(n, l) for n, l in CARD_METRICS[:3] if any(n in perf["per-site"][s] for s in sites)]
        lines += ["Per site:", "", "| Site | " + " | ".join(l for _, l in shown) + " |",
                  "|---" * (len(shown) + 1) + "|",
                  *[f"| {s} | " + " | ".join(_fmt_metric(perf["per-site"][s].get(n)) for n, _ in shown) + " |"
                    for s in sites], ""]
    if perf["subgroups"]:
        lines += ["Subgroups (aggregated at each site; a subgroup under the site's minimum count is never sent):", "",
                  "| Subgroup | Studies | AUC |", "|---|---|---|",
                  *[f"| {name} | {_fmt(g.get('n'))} | {_fmt_metric(g.get('auc'))} |"
                    for name, g in sorted(perf["subgroups"].items())], ""]
    if perf["validation"]:
        lines += ["Validation (what the round was chosen on): " + ", ".join(
            f"{k} {_fmt_metric(v) if isinstance(v, dict) else _fmt(v)}" for k, v in perf["validation"].items()) + ".", ""]
    lines += ["## Calibration", "",
              "Platt scaling and the operating threshold are fitted on the chosen round's pooled validation "
              "statistics; the test columns show their effect on data they were not fitted on.", "",
              "| Label | Calibration | Threshold | ECE val before / after | ECE test before / after |",
              "|---|---|---|---|---|"]
    for label, c in card["calibration"].items():
        cal = c.get("calibration") or {}
        point = c.get("operating-point") or {}
        lines.append(f"| {label} | {cal.get('method', 'n/a')} | {_fmt(point.get('threshold'))} | "
                     f"{_fmt(c.get('ece-before'))} / {_fmt(c.get('ece-after'))} | "
                     f"{_fmt(c.get('test-ece-before'))} / {_fmt(c.get('test-ece-after'))} |")
    unit = f" Privacy unit: {privacy['unit']} (the run config's; a site policy may require patient)." \
        if privacy["per-site"] else ""
    lines += ["", "## Privacy", "", f"{privacy['summary'][0].upper()}{privacy['summary'][1:]}.{unit} Secure aggregation: "
              f"{'on' if privacy['secure-aggregation'] else 'off'}. Not covered: {privacy['not-covered']}.", ""]
    if privacy["per-site"]:
        lines += ["| Site | epsilon | delta | noise multiplier | clipping norm |", "|---|---|---|---|---|",
                  *[f"| {s} | {_fmt(p.get('epsilon'))} | {p.get('delta', 0):.2g} | {_fmt(p.get('noise-multiplier'))} | "
                    f"{_fmt(p.get('max-grad-norm'))} |" for s, p in sorted(privacy["per-site"].items())], ""]
    lines += ["## Limitations and caveats", "", *[f"- {item}" for item in card["limitations"]]]
    if not card["limitations"]:
        lines.append("- None recorded by clinicfl; the centre's own review still applies.")
    return "\n".join(lines) + "\n"
