"""`behaviorc show`, `behaviorc merge`, `behaviorc taskvector`: task vectors by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from behaviorc.core.diagnostics import BehaviorError

SHOW_EXAMPLES = """\
examples:
  behaviorc show merged/                       what a composed model folder is made of
  behaviorc show --mergekit merged/ > persona.yaml
  behaviorc show listen.safetensors            where a task-vector file came from

A build's composed models are listed with their folders in OUT/report.json.
"""

MERGE_EXAMPLES = """\
examples:
  behaviorc merge base/ persona/ --add listen.safetensors=1.0 --add sycophancy.safetensors=-0.8
  behaviorc merge base/ merged/ --add ft_a/=1 --add ft_b/=1 --method ties --density 0.2
  behaviorc merge base/ merged/ --add ft_a/=1 --add ft_b/=1 --method della --density 0.3 --epsilon 0.1
  behaviorc merge base/ merged/ --add ft_a/=1 --add ft_b/=1 --add ft_c/=1 --method model_stock
  behaviorc merge base/ gdn_only/ --add ft_a/=1 --groups gdn.gates,gdn.proj --max-shard-size 2GB
"""

TASKVECTOR_EXAMPLES = """\
examples:
  behaviorc taskvector base/ finetuned/ listen.safetensors
"""


def register(subparsers: Any) -> None:
    show = subparsers.add_parser(
        "show", help="what a model folder or task-vector file is made of",
        description="Print the provenance of a model folder (the composition, its terms, "
                    "weights, merge options and vector hashes) or of a task-vector file.",
        epilog=SHOW_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("path", type=Path, help="a model folder or a .safetensors task vector")
    show.add_argument("--mergekit", action="store_true",
                      help="print a composed folder's recipe as mergekit YAML instead")
    show.add_argument("--json", action="store_true", help="print the raw record as JSON")
    show.set_defaults(run=run_show)

    merge = subparsers.add_parser(
        "merge", help="add task vectors (or fine-tuned folders) to a base model",
        description="Write BASE + merge(weight_i * tau_i) as a new model folder, streaming "
                    "one tensor at a time. A term is a task-vector file or a fine-tuned "
                    "model folder (its vector is taken against BASE).",
        epilog=MERGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("base", type=Path, help="the base model folder")
    merge.add_argument("out", type=Path, help="the model folder to write")
    merge.add_argument("--add", metavar="PATH=WEIGHT", action="append", required=True,
                       help="a term: a task-vector file or model folder and its weight "
                            "(repeat; a negative weight subtracts)")
    merge.add_argument("--method", default="task_arithmetic", metavar="METHOD",
                       help="task_arithmetic (default), ties, dare_linear (or dare), dare_ties, "
                            "della, della_linear, breadcrumbs, breadcrumbs_ties, model_stock: "
                            "mergekit's methods of those names")
    merge.add_argument("--density", type=float,
                       help="ties, dare, della, breadcrumbs: the share of each vector's "
                            "entries kept (default 1)")
    merge.add_argument("--lambda", dest="lambda_", type=float,
                       help="scale of the merged delta (default 1)")
    merge.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                       help="divide by the summed weights (of the agreeing terms, for the "
                            "sign-electing methods); default as in mergekit: on for ties and "
                            "della, off otherwise")
    merge.add_argument("--rescale", action=argparse.BooleanOptionalAction,
                       help="dare, della: scale what survives the drop back to the L1 norm "
                            "the vector had (default on)")
    merge.add_argument("--epsilon", type=float,
                       help="della: keep probabilities run from density - epsilon for the "
                            "smallest entry of a row to density + epsilon for the largest "
                            "(default 0.15)")
    merge.add_argument("--gamma", type=float,
                       help="breadcrumbs: the share of largest entries dropped (default 0.01)")
    merge.add_argument("--seed", type=int, help="dare, della: seed of the random drop (default 0)")
    merge.add_argument("--groups", default="",
                       help="comma-separated parameter groups to merge (others stay base)")
    merge.add_argument("--max-shard-size", default="",
                       help="split the weights into shards of at most this size, e.g. 2GB")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.set_defaults(run=run_merge)

    taskvector = subparsers.add_parser(
        "taskvector", help="write tau = W_finetuned - W_base as a task-vector file",
        description="Extract the task vector of a fine-tuned model folder against its base: "
                    "the parameters that differ, as float32 safetensors with provenance.",
        epilog=TASKVECTOR_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    taskvector.add_argument("base", type=Path)
    taskvector.add_argument("finetuned", type=Path)
    taskvector.add_argument("out", type=Path, help="the .safetensors file to write")
    taskvector.add_argument("--overwrite", action="store_true")
    taskvector.set_defaults(run=run_taskvector)


def run_show(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_file():
        if args.mergekit:
            raise BehaviorError(f"{path} is a task-vector file; --mergekit needs a composed "
                                "model folder")
        from behaviorc.compose.taskvector import describe_task_vector
        record = describe_task_vector(path)
        print(json.dumps(record, indent=2) if args.json else _task_vector_text(record))
        return 0
    if not path.is_dir():
        raise BehaviorError(f"no such model folder or task-vector file: {path}")
    record = _folder_record(path)
    if args.mergekit:
        if record.get("kind") != "composed":
            raise BehaviorError(f"{path} is not a composed model; only compositions export "
                                "to mergekit")
        from behaviorc.compose.mergekit_yaml import mergekit_yaml
        print(mergekit_yaml(record), end="")
    elif args.json:
        print(json.dumps(record, indent=2))
    else:
        print(_folder_text(path, record))
    return 0


def _folder_record(path: Path) -> dict[str, Any]:
    from behaviorc.core.files import PROVENANCE_FILE

    provenance = path / PROVENANCE_FILE
    if not provenance.is_file():
        return {}
    try:
        record = json.loads(provenance.read_text())
    except (OSError, ValueError) as err:
        raise BehaviorError(f"{provenance}: unreadable provenance ({err})") from None
    if not isinstance(record, dict):
        raise BehaviorError(f"{provenance}: provenance is not a JSON object")
    return record


def _folder_text(path: Path, record: dict[str, Any]) -> str:
    from behaviorc.core.files import BUILT_PROVENANCE

    lines = [f"{path}"]
    if record.get("kind") == "composed":
        lines.append(f"  composed: {record.get('name') or '(unnamed)'} = "
                     f"{record.get('expression', '')}")
        spec = record.get("spec") or {}
        if spec.get("path"):
            lines.append(f"  spec:     {spec['path']} (sha256 {spec.get('sha256', '')[:16]})")
        base = record.get("base", {})
        lines.append(f"  base:     {base.get('path')} (fingerprint {base.get('fingerprint', '')[:24]})")
        merge = record.get("merge", {})
        lines.append("  merge:    " + ", ".join(
            f"{k} {', '.join(v) if isinstance(v, list) else v}" for k, v in merge.items()))
        lines.append("  terms:")
        for term in record.get("terms", []):
            lines.append(f"    {term['weight']:>+6g} x {term['behavior']:<16} {term['kind']:<11} "
                         f"sha256 {term['sha256'][:16]}  {term['path']}")
        lines.append(f"  parameters merged: {record.get('parameters_merged')}, "
                     f"shards: {record.get('shards')}, dtype: {record.get('dtype')}")
    elif record.get("kind") == BUILT_PROVENANCE:
        lines.append(f"  made by:  {record.get('task')} ({record.get('task_kind')}, key {record.get('key', '')[:16]})")
        spec = record.get("spec") or {}
        if spec.get("path"):
            lines.append(f"  spec:     {spec['path']} (sha256 {spec.get('sha256', '')[:16]})")
        for source in record.get("inputs", []):
            where = source.get("path") or ", ".join(source.get("artifacts", {}).values()) or "-"
            lines.append(f"  from:     {source.get('task')} ({source.get('as')}): {where}")
        metrics = record.get("metrics") or {}
        if metrics:
            lines.append("  metrics:  " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    elif record:
        lines.append("  " + json.dumps(record))
    else:
        lines.append("  no behaviorc provenance: a model made elsewhere")
    return "\n".join(lines)


def _task_vector_text(record: dict[str, Any]) -> str:
    meta = record["metadata"]
    lines = [f"{record['path']}: task vector, {record['tensors']} tensors"]
    for key in ("source", "method", "base", "base_sha256", "finetuned", "finetuned_sha256"):
        if key in meta:
            lines.append(f"  {key + ':':<18}{meta[key]}")
    lines.append("  entries by parameter group:")
    for group, count in record["entries_by_group"].items():
        lines.append(f"    {group:<12}{count}")
    return "\n".join(lines)


def run_merge(args: argparse.Namespace) -> int:
    from behaviorc.compose.composition import Composition, compose
    from behaviorc.compose.merge import MergeOptions

    terms = tuple(_parse_term(text) for text in args.add)
    given = {"density": args.density, "lambda": args.lambda_, "normalize": args.normalize,
             "rescale": args.rescale, "epsilon": args.epsilon, "gamma": args.gamma,
             "seed": args.seed}
    options = MergeOptions(method=args.method, groups=tuple(g for g in args.groups.split(",") if g))
    for name, value in given.items():
        if value is not None and name not in options.traits.settings:
            raise BehaviorError(f"--{name} has no effect on `{options.method}`",
                                hint=f"`{options.method}` takes "
                                     + (", ".join(f"--{n}" for n in options.traits.settings)
                                        or "no settings"))
    options = MergeOptions(
        method=options.method, groups=options.groups,
        **{("lambda_" if name == "lambda" else name): value
           for name, value in given.items() if value is not None})
    expression = " ".join(f"{'-' if t.weight < 0 else '+'} {t.label} * {abs(t.weight):g}"
                          for t in terms).removeprefix("+ ")
    record = compose(Composition(args.base, terms, options, expression=expression), args.out,
                     max_shard_bytes=_parse_size(args.max_shard_size),
                     overwrite=args.overwrite)
    print(f"wrote {args.out}: {record['parameters_merged']} parameters merged, "
          f"{record['shards']} shard(s)")
    return 0


def run_taskvector(args: argparse.Namespace) -> int:
    from behaviorc.compose.taskvector import extract_task_vector

    meta = extract_task_vector(args.base, args.finetuned, args.out,
                               source=args.finetuned.name, overwrite=args.overwrite)
    print(f"wrote {args.out}: {meta['tensors']} tensors differ (sha256 {meta['sha256'][:16]})")
    return 0


def _parse_term(text: str):
    from behaviorc.compose.composition import Term

    path, sep, weight = text.rpartition("=")
    try:
        value = float(weight)
    except ValueError:
        value = None
    if not sep or not path or value is None:
        raise BehaviorError(f"--add {text}: expected PATH=WEIGHT, e.g. listen.safetensors=0.5")
    label = Path(path).name.removesuffix(".safetensors") or path
    return Term(label=label, path=Path(path), weight=value)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def _parse_size(text: str) -> int | None:
    if not text:
        return None
    number = text.rstrip("KMGIBkmgib")
    unit = text[len(number):].upper()
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        size = 0
    if size <= 0:
        raise BehaviorError(f"--max-shard-size {text}: expected a size such as 500MB or 2GB")
    return size
