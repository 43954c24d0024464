"""Version trained LoRAs for production: a file-based registry with release gates, promotion and rollback.

    python tools/registry.py add out/sarah_high_noise.safetensors out/sarah_low_noise.safetensors \\
        --type character --subject sarah --changes "more side views" --dataset "300 photos, studio light"
    python tools/registry.py test --subject sarah --gate technical --passed --score consistency=9.1 --by anna
    python tools/registry.py promote --subject sarah --by admin
    python tools/registry.py rollback --subject sarah --reason "faces drift at strength 1.0"
    python tools/registry.py list | show --subject sarah | verify | path --subject sarah

The registry root (`--root`, default ./lora_registry) holds registry.json and one folder per model with its
files and a generated training_notes.md; see library/registry/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repo's packages first

DEFAULT_ROOT = "./lora_registry"


def _score(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"score {text!r} is not NAME=NUMBER (e.g. consistency=9.1)") from None


def build_parser() -> argparse.ArgumentParser:
    from library.registry import GATES, TYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"registry folder (default {DEFAULT_ROOT})")
    common = argparse.ArgumentParser(add_help=False)  # --root also after the subcommand
    common.add_argument("--root", default=argparse.SUPPRESS, help="registry folder")
    model = argparse.ArgumentParser(add_help=False, parents=[common])
    model.add_argument("--subject", required=True, help="subject name, e.g. sarah")
    model.add_argument("--type", dest="kind", help=f"model type: {', '.join(TYPES)} (needed when ambiguous)")
    model.add_argument("--client", help="client name (folder client_NAME under the type)")
    by = argparse.ArgumentParser(add_help=False)
    by.add_argument("--by", help="who does it (roles: training, production, admin)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("add", parents=[model, by], help="copy a LoRA file or expert pair in as the next version")
    p.add_argument("files", nargs="*", help="the LoRA file, or the high- and low-noise expert files")
    p.add_argument("--high_noise", help="WAN 2.2 A14B high-noise expert file (with --low_noise)")
    p.add_argument("--low_noise", help="WAN 2.2 A14B low-noise expert file")
    p.add_argument("--changes", default="", help="what changed from the previous version")
    p.add_argument("--dataset", default="", help="dataset description (content)")
    p.add_argument("--dataset_count", type=int, help="number of training items (default: from the metadata)")
    p.add_argument("--batch", type=int, help="batch size (the dataset TOML's; not in the LoRA metadata)")
    p.add_argument("--base_model", help="base model when the metadata has none, e.g. wan2.2-t2v-a14b")
    p.add_argument("--date", help="version date YYYY-MM-DD (default today)")
    p.add_argument("--force", action="store_true", help="add despite a base model / layout conflict or duplicate")

    p = sub.add_parser("test", parents=[model, by], help="record test results, scores and release gates")
    p.add_argument("--version", type=int, help="version number (default the newest)")
    p.add_argument("--score", type=_score, action="append", default=[], help="NAME=NUMBER, repeatable")
    p.add_argument("--issue", action="append", default=[], help="known issue, repeatable")
    p.add_argument("--gate", choices=tuple(GATES), help="release gate this test decides")
    outcome = p.add_mutually_exclusive_group()
    outcome.add_argument("--passed", dest="passed", action="store_const", const=True, help="the gate passed")
    outcome.add_argument("--failed", dest="passed", action="store_const", const=False, help="the gate failed")
    p.add_argument("--notes", default="", help="free text")

    p = sub.add_parser("promote", parents=[model, by], help="make a version Current (all gates passed)")
    p.add_argument("--version", type=int, help="version number (default the newest)")
    p.add_argument("--force", action="store_true", help="promote without passed gates (recorded in the notes)")
    p.add_argument("--reason", default="", help="why (recorded in the notes)")

    p = sub.add_parser("rollback", parents=[model, by], help="revert to the previous released version at once")
    p.add_argument("--reason", required=True, help="what is wrong with the Current version")
    p.add_argument("--to", type=int, help="version to revert to (default the previous released one)")

    p = sub.add_parser("list", parents=[common], help="table of the models")
    p.add_argument("--type", dest="kind", help="only this type")
    sub.add_parser("show", parents=[model], help="one model's history (its training notes)")
    sub.add_parser("verify", parents=[common], help="check every file's SHA-256; exit 1 on a problem")
    p = sub.add_parser("path", parents=[model], help="print the Current version's file path(s)")
    p.add_argument("--version", type=int, help="a specific version instead of the Current one")
    return parser


def run(args: argparse.Namespace) -> int:
    from library.registry import ModelRef, Registry, RegistryError, format_table, render_notes

    reg = Registry(args.root)
    ref = ModelRef(args.subject, args.kind, args.client) if hasattr(args, "subject") else None
    if args.command == "add":
        experts = {k: v for k, v in (("high_noise", args.high_noise), ("low_noise", args.low_noise)) if v}
        if experts and args.files:
            raise RegistryError("give the files either as arguments or with --high_noise / --low_noise")
        v = reg.add(experts or args.files, ref, changes=args.changes, dataset=args.dataset,
                    dataset_count=args.dataset_count, base_model=args.base_model, batch=args.batch, by=args.by,
                    day=args.date, force=args.force)
        print(f"added v{v['version']} (Testing):")
        print("\n".join(str(reg.root / f["path"]) for f in v["files"].values()))
    elif args.command == "test":
        reg.record_test(ref, version=args.version, scores=dict(args.score), issues=args.issue, gate=args.gate,
                        passed=args.passed, by=args.by, notes=args.notes)
        print(f"recorded for {reg.find(ref)['key']}")
    elif args.command == "promote":
        v = reg.promote(ref, version=args.version, by=args.by, force=args.force, reason=args.reason)
        print(f"v{v['version']} of {reg.find(ref)['key']} is Current")
    elif args.command == "rollback":
        v = reg.rollback(ref, reason=args.reason, to=args.to, by=args.by)
        print(f"rolled back: v{v['version']} of {reg.find(ref)['key']} is Current")
    elif args.command == "list":
        rows = reg.rows(args.kind)
        print(format_table(rows, ("subject", "type", "client", "versions", "current", "status", "folder"))
              if rows else f"no models in {reg.root}")
    elif args.command == "show":
        print(render_notes(reg.find(ref)), end="")
    elif args.command == "path":
        print("\n".join(str(p) for p in reg.current_paths(ref, args.version)))
    elif args.command == "verify":
        report = reg.verify()
        for line in report["problems"] + [f"untracked (not in the index): {p}" for p in report["untracked"]]:
            print(line)
        print(f"{report['checked']} files checked, {len(report['problems'])} problems")
        return 1 if report["problems"] else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a registry command; a RegistryError or a folder that cannot be written is exit 2 (run_cli)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    from library.errors import run_cli

    sys.exit(run_cli(main))
