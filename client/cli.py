"""clinicfl-client: site-side commands.

    clinicfl-client check-data SITE_DIR [--layout auto] [--image-size 64 --seq-len 8] [--json] [--policy FILE]
    clinicfl-client start --superlink HOST:PORT --data-path SITE_DIR --ca-cert ca.crt --key site.key
                          [--policy FILE] [--state-dir DIR] [--site-name NAME] [--port 9094] [--node-config k=v ...]
    clinicfl-client policy [--state-dir DIR | --policy FILE]   the site policy in force
    clinicfl-client predict MODEL INPUT [--out DIR] [--state-dir DIR | --stats-from SITE_DIR] [--dicom-out]
    clinicfl-client approve [BUNDLE.fab | --app DIR] --state-dir DIR   approve an app bundle (by its hash)
    clinicfl-client approvals --state-dir DIR | revoke SHA256 --state-dir DIR
    clinicfl-client stop --state-dir DIR

check-data reads the site exactly as training would and prints what it found, on this screen
only. start checks the data the same way, refuses to join when nothing is usable, and then runs
the site's SuperNode (reconnecting and restarting as needed) until stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client.daemon import SupernodeDaemon, SupernodeSettings, check_key_files
from client.datacheck import check_site
from common.processes import console_logging, parse_assignments
from common.config import SITE_LAYOUTS, ConfigError, DataConfig, FederationConfig, SharedConfig, SiteConfig
from common.data.errors import DataError
from common.policy import SitePolicy
from sitegate.approvals import approvals_file, approve, approved_hashes, bundle_hash, project_bundle, \
    read_approvals, revoke


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # this install's app folder (pyproject.toml)


def _data_config(args: argparse.Namespace) -> DataConfig:
    shared = SharedConfig(image_size=args.image_size, seq_len=args.seq_len, biomech_features=args.biomech_features)
    return DataConfig(shared, series_description=args.series_description, test_fraction=args.test_fraction,
                      val_fraction=args.val_fraction, mrnet_plane=args.mrnet_plane, mrnet_labels=args.mrnet_labels)


def cmd_check_data(args: argparse.Namespace) -> int:
    config = _data_config(args)
    site_dir = Path(args.site_dir)
    cache_dir = Path(args.state_dir) / "cache" / "preprocessed" if args.state_dir else None
    policy, source = policy_in_force(Path(args.state_dir) if args.state_dir else None, args.policy)
    summary = check_site(site_dir, config, args.num_labels, args.layout, cache_dir, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({**summary, "policy": {"source": source, **policy.to_mapping()}}, indent=2))
    elif summary["usable"]:
        print_summary(summary, Console())
        print_policy(policy, source, Console(), training_studies=summary["train_studies"])
    if not summary["usable"]:
        # One line a site admin can act on, not a traceback.
        print(f"error: {summary['error']['message']}", file=sys.stderr)
        return 2
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    extra = parse_assignments(args.node_config, "--node-config")
    node_config = {"data-path": str(Path(args.data_path).expanduser().resolve()), "layout": args.layout, **extra}
    if args.site_name:
        node_config["site-name"] = args.site_name
    if args.state_dir:
        node_config["state-dir"] = str(Path(args.state_dir).expanduser().resolve())
    if args.policy:
        node_config["site-policy"] = str(Path(args.policy).expanduser().resolve())
    site = SiteConfig.from_node_config(node_config, FederationConfig())  # the same parsing as the ClientApp
    policy = SitePolicy.load(site.policy_path)  # a bad file stops the start here, not every message later
    if args.insecure:
        print("WARNING: --insecure: the connection is not encrypted and the server is not verified.", file=sys.stderr)
    elif not args.ca_cert or not args.key:
        print("error: --ca-cert and --key are required (or --insecure on a closed test network)", file=sys.stderr)
        return 2
    settings = SupernodeSettings(
        superlink=args.superlink, data_path=site.data_path, state_dir=site.state_dir, site_name=site.site_name,
        ca_cert=None if args.insecure else Path(args.ca_cert).expanduser().resolve(),
        private_key=Path(args.key).expanduser().resolve() if args.key else None, port=args.port, layout=site.layout,
        node_config=extra, approval=not args.no_approval)
    if args.no_approval:
        print("WARNING: --no-approval: this site will run any app bundle the centre sends, with read access to its "
              "data. Use only for tests and simulations.", file=sys.stderr)
    elif not approved_hashes(approvals_file(site.state_dir)):
        print(f"note: no app bundle is approved yet in {approvals_file(site.state_dir)}: every run will be refused "
              "until the site admin runs clinicfl-client approve", file=sys.stderr)
    problems = check_key_files(settings)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    # The same check as check-data: a site with nothing usable does not join, and says why.
    summary = check_site(site.data_path, _data_config(args), None, site.layout,
                         site.state_dir / "cache" / "preprocessed", progress=sys.stderr.isatty())
    if not summary["usable"]:
        print(f"error: not joining the federation: {summary['error']['message']} "
              f"(run clinicfl-client check-data {site.data_path})", file=sys.stderr)
        return 2
    quarantined = sum(q["count"] for q in summary["quarantine"])
    print(f"data ok: {summary['studies']} studies ({summary['train_studies']} train / {summary['val_studies']} val / "
          f"{summary['test_studies']} test), "
          f"{quarantined} quarantine entries", flush=True)
    print(f"site policy: {site.policy_path or 'the defaults (no --policy)'}"
          + ("" if summary["train_studies"] >= policy.min_training_studies else
             f"; WARNING: {summary['train_studies']} training studies are fewer than its min-training-studies "
             f"{policy.min_training_studies}: every message will be refused"), flush=True)
    return SupernodeDaemon(settings, restart=not args.no_restart).run()


def cmd_approve(args: argparse.Namespace) -> int:
    path = approvals_file(Path(args.state_dir).expanduser())
    if args.bundle:
        bundle = Path(args.bundle)
        digest, label = bundle_hash(bundle.read_bytes()), args.label or bundle.name
    else:  # the app as this site has it installed: the bundle flwr run would build from it
        project = Path(args.app).expanduser() if args.app else PROJECT_ROOT
        if not (project / "pyproject.toml").is_file():
            print(f"error: {project} is not a Flower app folder (no pyproject.toml); give the bundle file the "
                  "centre published, or --app DIR of the reviewed source", file=sys.stderr)
            return 2
        digest, label = bundle_hash(project_bundle(project)), args.label or f"{project.name} (built here)"
    added = approve(path, digest, label)
    print(f"{'approved' if added else 'already approved'}: {digest}  {label}")
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    path = approvals_file(Path(args.state_dir).expanduser())
    try:
        entries, problem = read_approvals(path), None
    except ValueError as exc:  # ApprovalsError: listed anyway, for the admin to review before fixing it
        entries, problem = read_approvals(path, trusted_only=False), exc
    table = Table(title=f"approved app bundles ({len(entries)})")
    for column in ("sha256", "label", "approved"):
        table.add_column(column, no_wrap=column == "sha256")
    for entry in entries:
        table.add_row(entry["sha256"], entry.get("label", ""), entry.get("approved-at", ""))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if problem is not None:
        print(f"error: the site gate refuses every app bundle until this is fixed: {problem}", file=sys.stderr)
        return 2
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    removed = revoke(approvals_file(Path(args.state_dir).expanduser()), args.sha256)
    print(f"revoked {args.sha256}" if removed else f"{args.sha256} was not approved")
    return 0 if removed else 2


def cmd_stop(args: argparse.Namespace) -> int:
    pid_file = Path(args.state_dir).expanduser() / "supernode.pid"
    if not pid_file.is_file():
        print(f"no running site daemon ({pid_file} not found)")
        return 0
    pid = int(pid_file.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        print(f"the daemon (pid {pid}) was not running; removed its stale pid file")
        return 0
    print(f"stopping the site daemon (pid {pid})")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    policy, source = policy_in_force(Path(args.state_dir) if args.state_dir else None, args.policy)
    if args.json:
        print(json.dumps({"source": source, **policy.to_mapping()}, indent=2))
    else:
        print_policy(policy, source, Console(width=None if sys.stdout.isatty() else 160))
    return 0


def policy_in_force(state_dir: Path | None, policy_file: str | None) -> tuple[SitePolicy, str]:
    """The site policy and where it comes from: ``--policy``, else the file the site daemon last
    started with (its node config in the state dir), else the defaults."""
    if policy_file:
        path = Path(policy_file).expanduser().resolve()
        return SitePolicy.load(path), str(path)
    path = state_dir.expanduser() / "node-config.toml" if state_dir else None
    if path is None or not path.is_file():
        return SitePolicy(), "the defaults (no policy file given)"
    with path.open("rb") as handle:
        node_config = tomllib.load(handle)
    node_config.setdefault("data-path", str(state_dir))  # only its policy keys are read here
    site = SiteConfig.from_node_config(node_config, FederationConfig())
    source = f"{site.policy_path} (as the site daemon started with it)" if site.policy_path else \
        "the defaults (the site daemon started without --policy)"
    if site.dp_target_epsilon is not None:
        source += "; require-dp because the node config sets dp-target-epsilon"
    return SitePolicy.of_site(site), source


POLICY_MEANING = {
    "require-dp": "refuse any run without DP-SGD here",
    "max-epsilon": "largest dp-target-epsilon accepted (whole run)",
    "max-delta": "largest dp-target-delta accepted; caps the automatic delta",
    "dp-unit": "weakest privacy unit accepted (study < patient)",
    "require-secure-aggregation": "every update through SecAgg+",
    "min-training-studies": "fewer training studies: the site takes part in nothing",
    "max-eval-bins": "finest score histogram a run may ask for",
    "min-studies-per-bin": "k: at most one histogram bin per k test studies (0: no cap)",
    "min-image-metrics-sample": "PSNR/SSIM/FID over at least this many test images",
    "max-fid-dim": "largest FID feature width",
    "max-image-size": "largest image-size and fid-image-size",
    "max-seq-len": "largest seq-len",
    "max-batch-size": "largest batch-size",
    "max-local-epochs": "largest local-epochs",
    "max-trainable-parameters": "largest model the run may train here",
}


def print_policy(policy: SitePolicy, source: str, console: Console, training_studies: int | None = None) -> None:
    defaults = SitePolicy().to_mapping()
    table = Table(title=f"site policy in force: {source}")
    for column in ("key", "value", "default", "meaning"):
        table.add_column(column, justify="right" if column in ("value", "default") else "left")
    for key, value in policy.to_mapping().items():
        table.add_row(key, _policy_value(value), _policy_value(defaults[key]), POLICY_MEANING.get(key, ""))
    console.print(table)
    if training_studies is not None and training_studies < policy.min_training_studies:
        console.print(f"[red]this site has {training_studies} training studies, fewer than min-training-studies "
                      f"{policy.min_training_studies}: it will refuse every message[/]")


def _policy_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def cmd_predict(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from client.outputs import write_outputs
    from client.predict import ModelRefused, PredictionRequest, compute_predictions
    from client.text import printable_ascii

    input_path = Path(args.input)
    out = Path(args.out) if args.out else Path("predictions") / f"{input_path.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    request = PredictionRequest(Path(args.model), input_path, Path(args.state_dir) if args.state_dir else None,
                                Path(args.stats_from) if args.stats_from else None, args.layout, args.device)
    progress = sys.stderr.isatty()
    try:
        run = compute_predictions(request, progress=progress)
    except ModelRefused as exc:
        print(f"error: model refused: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(run, out, dicom_out=args.dicom_out, progress=progress)
    console = Console()
    table = Table(title=f"{len(run.studies)} studies scored ({run.studies_per_second:.2f} studies/s on {run.device})")
    # label names come from the centre: plain text, never terminal control codes or rich markup
    for column in ("study", *[f"{escape(printable_ascii(label, 64))} p" for label in run.labels], "decision",
                   "top image"):
        table.add_column(column)
    for s in run.studies[:50]:
        table.add_row(escape(s.study), *[f"{p:.3f}" for p in s.calibrated],
                      ", ".join("positive" if d else "negative" for d in s.decision), f"#{s.attention.index(max(s.attention)) + 1}")
    console.print(table)
    if len(run.studies) > 50:
        console.print(f"... {len(run.studies) - 50} more in predictions.csv")
    if run.quarantine:
        console.print(f"{len(run.quarantine)} quarantine entries (quarantine.csv): "
                      + ", ".join(sorted({reason for _, reason in run.quarantine})))
    console.print(f"{run.studies_per_second:.2f} studies/s; results in {out.resolve()} (index.html, predictions.csv"
                  + (", dicom/" if args.dicom_out else "") + ")")
    return 0


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"site {summary['site']} ({summary['layout']} layout)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("usable studies", str(summary["studies"]))
    table.add_row("train / val / test studies",
                  f"{summary['train_studies']} / {summary['val_studies']} / {summary['test_studies']}")
    table.add_row("patients", str(summary["patients"]))
    table.add_row("series found", str(summary["series"]))
    table.add_row("image files read / images used", f"{summary['image_files']} / {summary['images_used']}")
    for name, splits in summary["labels"].items():
        for split, counts in splits.items():
            table.add_row(f"{name} ({split}): positive / negative", f"{counts['positive']} / {counts['negative']}")
    if summary["severity_targets"]:
        table.add_row("studies with a severity target", str(summary["severity_targets"]))
    if summary["biomech_features"]:
        table.add_row("biomechanical features per step", str(summary["biomech_features"]))
    table.add_row("modality (studies)", _distribution(summary["modalities"]))
    table.add_row("source image size (images)", _distribution(summary["image_sizes"]))
    for name, counts in summary["metadata"].items():
        table.add_row(f"{name} (studies)", _distribution(counts))
    table.add_row("skipped studies", str(summary["skipped_studies"]))
    console.print(table)
    if summary["quarantine"]:
        # Relative paths on this screen only: they never go to the server.
        quarantine = Table(title="quarantine (left out, with the reason)")
        for column in ("reason", "count", "examples"):
            quarantine.add_column(column)
        for entry in summary["quarantine"]:
            more = " ..." if entry["count"] > len(entry["examples"]) else ""
            quarantine.add_row(entry["reason"], str(entry["count"]), ", ".join(entry["examples"]) + more)
        console.print(quarantine)


def _distribution(counts: dict[str, int], top: int = 4) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:top])
    return text + (f", +{len(items) - top} more" if len(items) > top else "") if items else "-"


def main(argv: list[str] | None = None) -> int:
    console_logging("%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="clinicfl-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-data", help="read a site folder and summarise what training would use")
    check.add_argument("site_dir")
    add_data_arguments(check)
    check.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    check.add_argument("--state-dir", default="", help="the site's state dir: reuse and fill its preprocess cache")
    check.add_argument("--policy", help="the site policy file to show (default: the one the daemon started with)")
    check.set_defaults(func=cmd_check_data)
    start = sub.add_parser("start", help="check the data, then run this site's SuperNode until stopped")
    start.add_argument("--superlink", required=True, help="the centre's address, host:port")
    start.add_argument("--data-path", required=True, help="the site folder")
    start.add_argument("--ca-cert", help="the centre's CA certificate (ca.crt)")
    start.add_argument("--key", help="this site's private key (from clinicfl-server certs --site NAME)")
    start.add_argument("--insecure", action="store_true", help="no TLS (closed test networks only)")
    start.add_argument("--state-dir", default="", help="caches, privacy ledger, logs (default: beside the data)")
    start.add_argument("--site-name", default="", help="the name the centre sees (default: the folder name)")
    start.add_argument("--port", type=int, default=9094, help="local SuperNode port (one per SuperNode on a host)")
    start.add_argument("--node-config", action="append", default=[], metavar="KEY=VALUE",
                       help="more node config, e.g. dp-target-epsilon=4 audit-outgoing=true")
    start.add_argument("--policy", help="the site policy (TOML) that every run must meet (default: the built-in "
                                        "defaults, docs/privacy.md)")
    start.add_argument("--no-restart", action="store_true", help="exit when the SuperNode exits")
    start.add_argument("--no-approval", action="store_true",
                       help="run any app bundle the centre sends (tests and simulations only)")
    add_data_arguments(start)
    start.set_defaults(func=cmd_start)
    pred = sub.add_parser("predict", help="score new studies with an exported model (nothing is sent anywhere)")
    pred.add_argument("model", help="a file written by clinicfl-server export")
    pred.add_argument("input", help="a site folder (any layout), a studies/ folder, or one study's DICOM folder")
    pred.add_argument("--out", help="output folder (default ./predictions/<input>-<time>)")
    pred.add_argument("--state-dir", help="this site's state dir: its feature standardisation statistics")
    pred.add_argument("--stats-from", help="fit the standardisation statistics on this labelled site folder instead")
    pred.add_argument("--layout", choices=SITE_LAYOUTS, default="auto")
    pred.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    pred.add_argument("--dicom-out", action="store_true", help="also write a DICOM Secondary Capture per study")
    pred.set_defaults(func=cmd_predict)
    approve_p = sub.add_parser("approve", help="approve an app bundle (a .fab file, or this site's own build)")
    approve_p.add_argument("bundle", nargs="?", help="the bundle file the centre published (clinicfl-server bundle)")
    approve_p.add_argument("--app", help="without a bundle file: the reviewed source folder (default: this install)")
    approve_p.add_argument("--label", help="a note for the list, e.g. the release")
    approve_p.add_argument("--state-dir", required=True)
    approve_p.set_defaults(func=cmd_approve)
    approvals_p = sub.add_parser("approvals", help="list the approved app bundles")
    approvals_p.add_argument("--state-dir", required=True)
    approvals_p.set_defaults(func=cmd_approvals)
    revoke_p = sub.add_parser("revoke", help="remove an app bundle from the approved list")
    revoke_p.add_argument("sha256")
    revoke_p.add_argument("--state-dir", required=True)
    revoke_p.set_defaults(func=cmd_revoke)
    policy_p = sub.add_parser("policy", help="show the site policy in force")
    policy_p.add_argument("--state-dir", help="the site's state dir (the policy its daemon started with)")
    policy_p.add_argument("--policy", help="a policy file to check and show")
    policy_p.add_argument("--json", action="store_true")
    policy_p.set_defaults(func=cmd_policy)
    stop = sub.add_parser("stop", help="stop the site daemon started with this state dir")
    stop.add_argument("--state-dir", required=True)
    stop.set_defaults(func=cmd_stop)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DataConfig()
    parser.add_argument("--layout", choices=SITE_LAYOUTS, default="auto")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--num-labels", type=int, default=None, help="expected label count (default: the site's)")
    parser.add_argument("--series-description", default=defaults.series_description)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--biomech-features", type=int, default=defaults.biomech_features)
    parser.add_argument("--mrnet-plane", default=defaults.mrnet_plane)
    parser.add_argument("--mrnet-labels", default=defaults.mrnet_labels)


if __name__ == "__main__":
    sys.exit(main())
