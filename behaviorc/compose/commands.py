"""`behaviorc show`, `behaviorc merge`, `behaviorc taskvector`: task vectors by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.merge_methods import ALIASES, METHODS

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
  behaviorc merge base/ merged/ --add ft_a/=1,density=0.5 --add ft_b/=1 --method ties --density 0.2
  behaviorc merge base/ merged/ --add ft_a/=1 --add ft_b/=1 --method slerp --t 0.3
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
                            "(repeat; a negative weight subtracts), optionally with its own "
                            "density, epsilon or gamma: PATH=WEIGHT,density=0.3")
    merge.add_argument("--method", default="task_arithmetic", metavar="METHOD",
                       help=f"{_method_names()}: mergekit's methods of those names "
                            "(default %(default)s)")
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
                       help="ties, dare, della, breadcrumbs: scale what survives the "
                            "sparsifying back to the L1 norm the vector had (default on for "
                            "dare and della, off for ties and breadcrumbs)")
    merge.add_argument("--epsilon", type=float,
                       help="della: keep probabilities run from density - epsilon for the "
                            "smallest entry of a row to density + epsilon for the largest "
                            "(default 0.15)")
    merge.add_argument("--gamma", type=float,
                       help="breadcrumbs: the share of largest entries dropped (default 0.01)")
    merge.add_argument("--seed", type=int, help="dare, della: seed of the random drop (default 0)")
    merge.add_argument("--t", type=float,
                       help="slerp (required): 0 the first model (the base, with one term), "
                            "1 the second")
    merge.add_argument("--flatten", action=argparse.BooleanOptionalAction,
                       help="nuslerp: one angle per tensor (default on), else per row")
    merge.add_argument("--row-wise", dest="row_wise", action=argparse.BooleanOptionalAction,
                       help="nuslerp with --no-flatten: one angle per column (mergekit's name)")
    merge.add_argument("--filter-wise", dest="filter_wise",
                       action=argparse.BooleanOptionalAction,
                       help="model_stock: one angle per row (default off)")
    merge.add_argument("--max-iter", dest="max_iter", type=int,
                       help="karcher: at most this many steps (default 10)")
    merge.add_argument("--tol", type=float, help="karcher: stop below this step (default 1e-5)")
    merge.add_argument("--eps", type=float,
                       help="multislerp: added to the norms it divides by (default 1e-8)")
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
    from behaviorc.core.merge_methods import PER_TERM

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
            own = "".join(f"  {name} {term[name]:g}" for name in PER_TERM if name in term)
            lines.append(f"    {term['weight']:>+6g} x {term['behavior']:<16} {term['kind']:<11} "
                         f"sha256 {term['sha256'][:16]}  {term['path']}{own}")
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
    for key in ("source", "method", "base", "base_fingerprint", "finetuned", "finetuned_sha256"):
        if key in meta:
            lines.append(f"  {key + ':':<18}{meta[key]}")
    lines.append("  entries by parameter group:")
    for group, count in record["entries_by_group"].items():
        lines.append(f"    {group:<12}{count}")
    return "\n".join(lines)


def _method_names() -> str:
    """The merge methods, each alias beside the method it stands for."""
    aliases = {method: alias for alias, method in ALIASES.items()}
    return ", ".join(f"{name} (or {aliases[name]})" if name in aliases else name
                     for name in METHODS)


def run_merge(args: argparse.Namespace) -> int:
    from behaviorc.compose.composition import Composition, compose
    from behaviorc.compose.merge import MergeOptions, TermSettings
    from behaviorc.core.merge_methods import ignores_weights

    parsed = [_parse_term(text) for text in args.add]
    terms = tuple(term for term, _ in parsed)
    given = {"density": args.density, "lambda": args.lambda_, "normalize": args.normalize,
             "rescale": args.rescale, "epsilon": args.epsilon, "gamma": args.gamma,
             "seed": args.seed, "t": args.t, "flatten": args.flatten, "row_wise": args.row_wise,
             "filter_wise": args.filter_wise, "max_iter": args.max_iter, "tol": args.tol,
             "eps": args.eps}
    method = ALIASES.get(args.method, args.method)
    if method not in METHODS:
        MergeOptions(method=method)  # says why: unknown, or which method to use instead
    takes = METHODS[method].settings
    for name, value in given.items():
        if value is not None and name not in takes:
            raise BehaviorError(f"--{_flag(name)} has no effect on `{method}`",
                                hint=f"`{method}` takes "
                                     + (", ".join(f"--{_flag(n)}" for n in takes)
                                        or "no settings"))
    for _, own in parsed:
        for name in own:
            if name not in takes:
                raise BehaviorError(f"--add ...,{name}=: `{method}` takes no {name}")
    if any(own for _, own in parsed):
        given["terms"] = tuple(TermSettings(**own) for _, own in parsed)
    options = MergeOptions(
        method=method, groups=tuple(g for g in args.groups.split(",") if g),
        **{("lambda_" if name == "lambda" else name): value
           for name, value in given.items() if value is not None})
    if ignores_weights(options.method, [term.weight for term in terms]):
        print(f"warning: `{options.method}` takes no weights: each term counts once, as in "
              "mergekit", file=sys.stderr)
    expression = " ".join(f"{'-' if t.weight < 0 else '+'} {t.label} * {abs(t.weight):g}"
                          for t in terms).removeprefix("+ ")
    record = compose(Composition(args.base, terms, options, expression=expression), args.out,
                     max_shard_bytes=_parse_size(args.max_shard_size),
                     overwrite=args.overwrite)
    print(f"wrote {args.out}: {record['parameters_merged']} parameters merged, "
          f"{record['shards']} shard(s)")
    return 0


def _flag(setting: str) -> str:
    return setting.replace("_", "-")


def run_taskvector(args: argparse.Namespace) -> int:
    from behaviorc.compose.taskvector import extract_task_vector

    meta = extract_task_vector(args.base, args.finetuned, args.out,
                               source=args.finetuned.name, overwrite=args.overwrite)
    print(f"wrote {args.out}: {meta['tensors']} tensors differ (sha256 {meta['sha256'][:16]})")
    return 0


def _parse_term(text: str):
    """A term and its own settings from PATH=WEIGHT[,density=D][,epsilon=E][,gamma=G]."""
    from behaviorc.compose.composition import Term
    from behaviorc.core.merge_methods import PER_TERM

    own: dict[str, float] = {}
    rest = text
    while True:
        head, comma, setting = rest.rpartition(",")
        name, equals, value = setting.partition("=")
        if not comma or not equals or name not in PER_TERM:
            break
        try:
            own[name] = float(value)
        except ValueError:
            raise BehaviorError(f"--add {text}: {name} `{value}` is not a number") from None
        rest = head
    path, sep, weight = rest.rpartition("=")
    try:
        number = float(weight)
    except ValueError:
        number = None
    if not sep or not path or number is None:
        raise BehaviorError(f"--add {text}: expected PATH=WEIGHT, e.g. listen.safetensors=0.5, "
                            "or PATH=WEIGHT,density=0.3")
    label = Path(path).name.removesuffix(".safetensors") or path
    return Term(label=label, path=Path(path), weight=number), own


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
