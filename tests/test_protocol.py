"""The train / validation / test protocol. Every site splits its patients three ways; only the
validation statistics choose the round, stop the run early, calibrate and set the operating
threshold. The test statistics are reported for the chosen round and choose nothing: scrambling
every test statistic the sites send changes the reported test figures and nothing else."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord

from common.data.labels import read_labels
from common.data.site import assign_split, load_site
from common.rundir import RunDirectory
from server.export import export_model
from server.model_card import IntendedUse
from simulations.inprocess import run_inprocess
from simulations.synthetic import SyntheticSpec, generate_clinics


# ------------------------------------------------------------------ the split at every site
def _splits_of_each_patient(records, split) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for record, side in zip(records, split):
        sides.setdefault(record.patient or record.study, set()).add(str(side))
    return sides


def test_the_default_split_is_seeded_and_keeps_every_patient_in_one_split(tiny_clinics):
    records, _ = read_labels(tiny_clinics[0])
    assert max(Counter(r.patient for r in records).values()) > 1, "some patients have two studies"
    split = assign_split(records, 0.25, 0.15, seed=3)
    assert set(split) == {"train", "val", "test"}
    assert all(len(sides) == 1 for sides in _splits_of_each_patient(records, split).values())
    assert np.array_equal(split, assign_split(records, 0.25, 0.15, seed=3)), "the same split for the same seed"
    assert not np.array_equal(split, assign_split(records, 0.25, 0.15, seed=4)), "the seed draws the patients"
    wider = assign_split(records, 0.25, 0.3, seed=3)
    assert np.array_equal(wider == "test", split == "test"), "the test split does not depend on val-fraction"
    assert (wider == "val").sum() > (split == "val").sum()


def test_a_split_column_of_train_val_and_test_is_honoured(site, tiny_data_config):
    studies = sorted(p.name for p in (site / "studies").iterdir())
    wanted = {study: "test" if i < 3 else "val" if i < 7 else "train" for i, study in enumerate(studies)}
    lines = ["study,label,split"] + [f"{study},{i % 2},{wanted[study]}" for i, study in enumerate(studies)]
    (site / "labels.csv").write_text("\n".join(lines) + "\n")
    data = load_site(site, tiny_data_config, num_labels=1, progress=False)
    for side, index in (("train", data.train_index), ("val", data.val_index), ("test", data.test_index)):
        assert {data.studies[i] for i in index} == {s for s, w in wanted.items() if w == side}, side


def test_a_split_column_of_train_and_test_only_draws_validation_patients_from_its_training_side(tiny_clinics):
    """MURA's and MRNet's own splits, and older labels.csv files, name train and test only: the
    test side stays as given, and val-fraction of the patients come from those only in train."""
    records, _ = read_labels(tiny_clinics[0])
    patients = sorted({r.patient for r in records})
    test_patients = set(patients[:4])
    straddling = next(r.patient for r in records if r.patient not in test_patients
                      and sum(q.patient == r.patient for q in records) > 1)
    first_of_straddling = next(r for r in records if r.patient == straddling)
    # One patient is put on both sides by the column (a site's choice): it is never moved to val.
    column = [replace(r, split="test" if r.patient in test_patients or r is first_of_straddling else "train")
              for r in records]
    split = assign_split(column, 0.25, 0.3, seed=0)
    assert [s for s, r in zip(split, column) if r.split == "test"] == ["test"] * sum(r.split == "test" for r in column)
    moved = {r.patient for s, r in zip(split, column) if s == "val"}
    assert moved and not moved & test_patients and straddling not in moved
    assert all(len(sides) == 1 for p, sides in _splits_of_each_patient(column, split).items() if p != straddling)


# ------------------------------------------------------------------ only validation chooses
RUN = {"num-rounds": 3, "min-sites": 2, "image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8,
       "attn-dim": 8, "recon-head": False, "local-epochs": 2, "lr": 0.003, "val-fraction": 0.25,
       "patience": 1, "best-metric": "val-loss"}


class ScrambleTestStatistics:
    """A reply filter (``run_inprocess``'s fault-injection seam) that scrambles every test
    statistic a site sends, consistently enough that the centre's checks still accept it: each
    label's score histograms are reversed (scores p -> 1 - p, so the test AUC becomes 1 - AUC),
    the confusion counts are swapped to match (tp <-> fn, fp <-> tn), and the loss sum is
    multiplied by a factor that grows with each of the site's replies (later rounds look worse by
    test loss). The validation statistics pass untouched."""

    def __init__(self) -> None:
        self.replies: Counter[int] = Counter()

    def __call__(self, reply: Message) -> Message:
        if reply.has_error():
            return reply
        for key in ("metrics", "evaluation"):  # an evaluation reply's record; evaluate-first's
            record = reply.content.metric_records.get(key)
            if record is None or "hist-pos" not in record:
                continue
            self.replies[reply.metadata.src_node_id] += 1
            values = dict(record)
            for name in ("hist-pos", "hist-neg"):
                values[name] = np.asarray(values[name]).reshape(-1, int(values["bins"]))[:, ::-1].ravel().tolist()
            values["tp"], values["fn"], values["fp"], values["tn"] = values["fn"], values["tp"], values["tn"], values["fp"]
            values["loss-sum"] = float(values["loss-sum"]) * (1 + self.replies[reply.metadata.src_node_id])
            reply.content[key] = MetricRecord(values)
        return reply


@pytest.fixture(scope="module")
def federations(tmp_path_factory) -> tuple[RunDirectory, RunDirectory]:
    """The same federation twice (non-DP runs are bit-reproducible), the second with every test
    statistic scrambled on its way to the centre."""
    root = tmp_path_factory.mktemp("protocol")
    spec = SyntheticSpec(sites=2, studies_per_site=24, image_size=32, slices_per_study=4, seed=21)
    generate_clinics(root / "data", spec, progress=False)
    honest = run_inprocess(root / "data", root / "runs", 2, RUN)
    scrambled = run_inprocess(root / "data", root / "runs", 2, RUN, reply_filter=ScrambleTestStatistics())
    return RunDirectory(honest), RunDirectory(scrambled)


def test_scrambled_test_statistics_change_neither_the_round_nor_the_calibration_nor_the_threshold(federations):
    honest, scrambled = federations
    records, scrambled_records = honest.read_metrics(), scrambled.read_metrics()
    assert [r["round"] for r in records] == [r["round"] for r in scrambled_records], "patience stopped alike"
    assert [r["validation"] for r in records] == [r["validation"] for r in scrambled_records]
    assert honest.state()["best"] == scrambled.state()["best"]
    best = honest.state()["best"]
    assert best["metric"] == "val-loss" and best["round"] > 0, "the model learned, by the validation loss"
    # Chosen by the scrambled test loss, the run would have kept round 0 (each later reply's loss is
    # multiplied more): the choice above is not the test statistics'.
    assert min(scrambled_records, key=lambda r: r["catalogue"]["loss"]["value"])["round"] == 0

    exported = [torch.load(export_model(run), weights_only=True) for run in (honest, scrambled)]
    assert exported[0]["round"] == exported[1]["round"] == best["round"]
    for name, fitted in exported[0]["calibration"].items():
        other = exported[1]["calibration"][name]
        assert fitted["calibration"]["method"] == "platt" and fitted["operating-point"] is not None
        for key in ("calibration", "operating-point", "ece-before", "ece-after", "fitted-on"):
            assert fitted[key] == other[key], key
        assert fitted["test-ece-before"] != other["test-ece-before"], "the test statistics did differ"
    chosen = [next(r for r in rs if r["round"] == best["round"]) for rs in (records, scrambled_records)]
    for metric in ("auc", "loss"):
        assert chosen[0]["catalogue"][metric]["value"] != chosen[1]["catalogue"][metric]["value"], \
            f"the reported test {metric} is the scrambled one"
    assert chosen[1]["catalogue"]["auc"]["value"] == pytest.approx(1 - chosen[0]["catalogue"]["auc"]["value"])
    weights = [torch.load(run.checkpoint_path(best["round"]), weights_only=True)["trainable"]
               for run in (honest, scrambled)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the same model was trained"


def test_every_round_records_the_pooled_validation_figures_and_the_checkpoint_their_histograms(federations):
    honest, _ = federations
    for record in honest.read_metrics():
        validation = record["validation"]
        assert {"loss", "auc", "accuracy", "ece"} <= set(validation) and validation["loss"]["value"] > 0
        checkpoint = honest.load_checkpoint(record["round"])
        pooled = checkpoint["pooled-validation-histograms"]
        studies = sum(int(pos.sum() + neg.sum()) for pos, neg in pooled.values())
        test_studies = sum(int(pos.sum() + neg.sum()) for pos, neg in checkpoint["pooled-histograms"].values())
        assert studies > 0 and test_studies == record["global_eval"]["n"]
        assert f"of {studies} validation studies" in validation["loss"]["note"]
    rows = (honest.path / "metrics.csv").read_text().splitlines()
    assert any(",validation,loss," in row for row in rows), "metrics.csv has the validation scope"


# ------------------------------------------------------------------ the model card of an export
USE = """intended-use = "Flag knee MR studies with a likely ligament injury for a radiologist's priority list."
intended-users = "Sports-medicine radiologists at the federation's clinics."
out-of-scope = "Children; any decision without a radiologist's read."
contact = "The coordinating centre's ML team."
"""


def test_an_export_writes_a_model_card_that_states_the_evidence(federations, tmp_path):
    honest, _ = federations
    use = tmp_path / "use.toml"
    use.write_text(USE)
    model = export_model(honest, out=tmp_path / "model.pt", use=IntendedUse.load(use))
    markdown = (tmp_path / "model.model-card.md").read_text()
    card = json.loads((tmp_path / "model.model-card.json").read_text())
    assert card["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    best = honest.state()["best"]
    record = next(r for r in honest.read_metrics() if r["round"] == best["round"])
    assert card["model"]["round"] == best["round"] and card["training"]["selection"]["metric"] == "val-loss"
    auc = record["catalogue"]["auc"]
    assert card["performance"]["pooled"]["auc"] == {"value": auc["value"], "ci95": auc["ci95"],
                                                    "ci-method": auc["ci_method"], "reason": None}
    # Sites under min-site-cases (10 test studies) show no figures of their own, in the record or the card.
    assert {site: m["auc"]["value"] for site, m in card["performance"]["per-site"].items()} == auc.get("per_site", {})
    # Every site's split sizes, small counts suppressed by the sites' min-reported-count (10).
    assert card["suppression"]["min-reported-count"] == 10
    for row in card["data"]["sites"]:
        evaluation = record["evaluation"][row["site"]]
        assert row["test"] == (evaluation["n"] if evaluation["n"] >= 10 else "<10") if "n" in evaluation \
            else row["test"] is None and "fewer than" in row["note"]
        assert row["train"] == record["train"][row["site"]]["num-examples"]
        for key in ("test", "validation", "test-positives", "validation-positives"):
            assert not isinstance(row[key], int) or row[key] == 0 or row[key] >= 10, (key, row)
    assert card["calibration"] == torch.load(model, weights_only=True)["calibration"]
    assert card["privacy"]["per-site"] == {} and card["privacy"]["summary"].startswith("none")
    assert card["architecture"]["parameters-trainable"] < card["architecture"]["parameters-total"]
    assert card["code"]["versions"]["flwr"].startswith("1.42") and card["code"]["commit"]
    assert any("synthetic data" in item for item in card["limitations"])
    assert any("randomly initialised" in item for item in card["limitations"])
    # As a document: the sections a reader looks for, the centre's own words, the figures with intervals.
    for heading in ("## Intended use", "## Model", "## Code", "## Data", "## Training and selection",
                    "## Performance on the test splits", "## Calibration", "## Privacy", "## Limitations and caveats"):
        assert f"\n{heading}\n" in markdown, heading
    assert "radiologist's priority list" in markdown and "NOT PROVIDED" not in markdown
    assert f"| AUC | {auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}] |" in markdown
    assert f"round {best['round']} of" in markdown and "never used to choose" in markdown
    # predict's index.html shows this summary at the site
    summary = torch.load(model, weights_only=True)["model-card"]
    assert summary["intended-use"].startswith("Flag knee MR") and summary["auc"].startswith(f"{auc['value']:.3f} [")


def test_without_a_statement_of_use_the_card_says_so(federations, tmp_path):
    honest, _ = federations
    export_model(honest, out=tmp_path / "model.pt")
    card = json.loads((tmp_path / "model.model-card.json").read_text())
    assert card["intended-use"]["provided"] is False and card["intended-use"]["intended_use"].startswith("NOT PROVIDED")
    assert any("intended use has not been written" in item for item in card["limitations"])
    bad = tmp_path / "bad.toml"
    bad.write_text('intended-use = "x"\n')
    with pytest.raises(ValueError, match="out-of-scope"):
        IntendedUse.load(bad)
    bad.write_text('intended-use = "x"\nout-of-scope = "y"\nwarranty = "z"\n')
    with pytest.raises(ValueError, match="unknown keys warranty"):
        IntendedUse.load(bad)


def test_sites_report_their_minimum_count_and_no_subgroup_below_it(federations):
    honest, _ = federations
    for record in honest.read_metrics():
        for site, evaluation in record["evaluation"].items():
            assert evaluation["min-reported-count"] == 10, site
        # 6-study test splits: every subgroup is smaller than 10, so none is computed or sent.
        assert record["subgroups"] == {}
