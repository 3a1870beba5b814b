"""Task vectors and streaming composition on the built-in tiny-gdn, loaded back by
transformers; bad inputs fail clearly and leave nothing behind."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from behaviorc.cli import main
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.compose.composition import Composition, Term, compose
from behaviorc.compose.merge import MergeOptions, merged_delta
from behaviorc.core.merge_methods import METHODS
from behaviorc.core.files import sha256_file
from behaviorc.formats.safetensors_io import content_sha256
from behaviorc.compose.taskvector import check_task_vector, extract_task_vector


def perturbed_copy(base: Path, out: Path, seed: int, touch=lambda name: True) -> Path:
    """A 'fine-tuned' copy of a model folder: its weights plus seeded noise."""
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "behaviorc.json"))
    generator = torch.Generator().manual_seed(seed)
    weights = {name: (value + 0.01 * torch.randn(value.shape, generator=generator)
                      if touch(name) else value)
               for name, value in load_file(base / "model.safetensors").items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_gdn):
    root = tmp_path_factory.mktemp("vectors")
    tuned_a = perturbed_copy(tiny_gdn, root / "tuned_a", seed=1)
    tuned_b = perturbed_copy(tiny_gdn, root / "tuned_b", seed=2,
                             touch=lambda name: "linear_attn" in name or "experts" in name)
    extract_task_vector(tiny_gdn, tuned_a, root / "a.safetensors", source="a")
    extract_task_vector(tiny_gdn, tuned_b, root / "b.safetensors", source="b")
    return root


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) model folder."""
    found: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        found.update(load_file(shard))
    return found


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_task_vector_holds_exactly_the_changed_parameters(workspace, tiny_gdn):
    base = load_file(tiny_gdn / "model.safetensors")
    tuned = load_file(workspace / "tuned_b" / "model.safetensors")
    tau = load_file(workspace / "b.safetensors")
    assert set(tau) == {name for name in base if not torch.equal(base[name], tuned[name])}
    assert all("linear_attn" in name or "experts" in name for name in tau)
    for name, delta in tau.items():
        assert torch.equal(delta, tuned[name] - base[name])
    from safetensors import safe_open
    with safe_open(workspace / "b.safetensors", "pt") as handle:
        meta = handle.metadata()
    assert meta["source"] == "b" and meta["method"] == "difference"
    assert meta["base_fingerprint"] == content_sha256(tiny_gdn)
    assert meta["finetuned_sha256"] == content_sha256(workspace / "tuned_b")


def test_composed_tiny_gdn_loads_in_transformers_with_the_expected_weights(workspace, tiny_gdn,
                                                                          tmp_path):
    out = tmp_path / "persona"
    record = compose(Composition(
        tiny_gdn, (Term("a", workspace / "a.safetensors", 1.0),
                   Term("b", workspace / "b.safetensors", -0.5)),
        MergeOptions(method="task_arithmetic"), name="persona", expression="a - b * 0.5"),
        out, max_shard_bytes=400_000)
    # Sharded, with an index; config and tokenizer come from the base.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny_gdn / name).read_bytes()

    base = load_file(tiny_gdn / "model.safetensors")
    tau_a, tau_b = load_file(workspace / "a.safetensors"), load_file(workspace / "b.safetensors")
    expected = {}
    for name, value in base.items():
        mixed = tau_a[name] * 1.0
        if name in tau_b:
            mixed = mixed + tau_b[name] * -0.5
        expected[name] = value + mixed
    reference = tmp_path / "reference"
    shutil.copytree(out, reference, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(expected, reference / "model.safetensors", metadata={"format": "pt"})
    composed, wanted = load_model(out).state_dict(), load_model(reference).state_dict()
    assert composed.keys() == wanted.keys()
    for name in composed:
        assert torch.equal(composed[name], wanted[name]), name

    written = json.loads((out / "behaviorc.json").read_text())
    assert written == record
    assert written["expression"] == "a - b * 0.5"
    assert [(t["behavior"], t["weight"]) for t in written["terms"]] == [("a", 1.0), ("b", -0.5)]
    assert written["terms"][0]["sha256"] == sha256_file(workspace / "a.safetensors")
    assert written["base"]["fingerprint"] == content_sha256(tiny_gdn)


def test_negating_a_vector_and_adding_it_back_returns_the_base_exactly(workspace, tiny_gdn,
                                                                      tmp_path):
    vector = workspace / "a.safetensors"
    compose(Composition(tiny_gdn, (Term("a", vector, -1.0), Term("a", vector, 1.0)),
                        MergeOptions()), tmp_path / "same")
    base, same = load_file(tiny_gdn / "model.safetensors"), weights_of(tmp_path / "same")
    assert base.keys() == same.keys()
    assert all(torch.equal(base[name], same[name]) for name in base)


def test_ties_from_folders_and_from_vectors_agree_with_the_in_memory_merge(workspace, tiny_gdn,
                                                                          tmp_path):
    options = MergeOptions(method="ties", density=0.3, lambda_=0.8)
    weights = (1.0, -0.6)
    from_vectors = compose(Composition(tiny_gdn, (
        Term("a", workspace / "a.safetensors", weights[0]),
        Term("b", workspace / "b.safetensors", weights[1])), options), tmp_path / "v")
    compose(Composition(tiny_gdn, (Term("a", workspace / "tuned_a", weights[0]),
                                   Term("b", workspace / "tuned_b", weights[1])), options),
            tmp_path / "f")
    assert from_vectors["merge"] == {"method": "ties", "lambda": 0.8, "density": 0.3,
                                     "normalize": True, "rescale": False}
    base = load_file(tiny_gdn / "model.safetensors")
    tuned = [load_file(workspace / f"tuned_{x}" / "model.safetensors") for x in "ab"]
    vectors_out, folders_out = weights_of(tmp_path / "v"), weights_of(tmp_path / "f")
    for name, value in base.items():
        deltas = [(t[name] - value).numpy() for t in tuned]
        present = [i for i, d in enumerate(deltas) if d.any()]
        expected = value + torch.from_numpy(merged_delta(
            name, [deltas[i] for i in present], [weights[i] for i in present], present, options))
        assert torch.equal(vectors_out[name], expected), name
        assert torch.equal(folders_out[name], expected), name


BLOCKED = {"ties": dict(density=0.25, rescale=True), "task_arithmetic": {},
           "breadcrumbs_ties": dict(density=0.25), "slerp": dict(t=0.3),
           "nuslerp": dict(flatten=False), "nuslerp_columns": dict(flatten=False, row_wise=True),
           "model_stock": dict(filter_wise=True), "karcher": {}, "multislerp": {},
           "linear": dict(normalize=False)}


@pytest.mark.parametrize("case", sorted(BLOCKED))
def test_merging_in_blocks_of_rows_changes_nothing(workspace, tiny_gdn, tmp_path, monkeypatch,
                                                   case):
    import behaviorc.formats.safetensors_io as io

    method = case.removesuffix("_columns")
    weights = (0.7, -1.2) if METHODS[method].weighted else (1.0, 1.0)
    composition = Composition(tiny_gdn, (Term("a", workspace / "a.safetensors", weights[0]),
                                         Term("b", workspace / "tuned_b", weights[1])),
                              MergeOptions(method=method, **BLOCKED[case]))
    compose(composition, tmp_path / "whole")
    extract_task_vector(tiny_gdn, workspace / "tuned_b", tmp_path / "b_whole.safetensors")
    monkeypatch.setattr(io, "BLOCK_ENTRIES", 3000)  # embeddings: dozens of blocks
    compose(composition, tmp_path / "blocks")
    extract_task_vector(tiny_gdn, workspace / "tuned_b", tmp_path / "b_blocks.safetensors")
    whole, blocks = weights_of(tmp_path / "whole"), weights_of(tmp_path / "blocks")
    assert all(torch.equal(whole[name], blocks[name]) for name in whole)
    whole, blocks = (load_file(tmp_path / f"b_{x}.safetensors") for x in ("whole", "blocks"))
    assert whole.keys() == blocks.keys()
    assert all(torch.equal(whole[name], blocks[name]) for name in whole)


def test_linear_without_normalize_scales_every_parameter_as_mergekit(workspace, tiny_gdn,
                                                                     tmp_path):
    # linear mixes models: 2 x (base + tau_b) is twice the fine-tuned model, including
    # the parameters tau_b leaves alone (mergekit scales every tensor).
    compose(Composition(tiny_gdn, (Term("b", workspace / "b.safetensors", 2.0),),
                        MergeOptions(method="linear", normalize=False)), tmp_path / "twice")
    tuned, out = load_file(workspace / "tuned_b" / "model.safetensors"), weights_of(tmp_path / "twice")
    untouched = [name for name in tuned if "linear_attn" not in name and "experts" not in name]
    assert untouched and all(torch.allclose(out[name], 2 * tuned[name], rtol=1e-6, atol=1e-7)
                             for name in tuned if tuned[name].is_floating_point())


def test_groups_merge_only_their_parameters(workspace, tiny_gdn, tmp_path):
    record = compose(Composition(tiny_gdn, (Term("a", workspace / "a.safetensors", 1.0),),
                                 MergeOptions(groups=("gdn.gates",))), tmp_path / "gates")
    base, out = load_file(tiny_gdn / "model.safetensors"), weights_of(tmp_path / "gates")
    changed = {name for name in base if not torch.equal(base[name], out[name])}
    assert changed and all(name.endswith(("A_log", "dt_bias")) for name in changed)
    assert record["parameters_merged"] == len(changed)
    assert "groups" in (tmp_path / "gates" / "mergekit.yaml").read_text()


def _broken_vector(workspace: Path, tmp_path: Path, how: str) -> Path:
    tensors = load_file(workspace / "a.safetensors")
    name = "model.layers.0.linear_attn.A_log"
    if how == "shape":
        tensors[name] = torch.zeros(tensors[name].numel() + 1)
    elif how == "name":
        tensors["model.layers.0.linear_attn.A_logg"] = tensors.pop(name)
    elif how == "nan":
        tensors[name][1] = float("nan")
    elif how == "dtype":
        tensors[name] = tensors[name].to(torch.int32)
    path = tmp_path / f"{how}.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("how, message", [
    ("shape", "has shape [5], the base model's has [4]"),
    ("name", "`model.layers.0.linear_attn.A_logg` is not a parameter of the base model"),
    ("nan", "`model.layers.0.linear_attn.A_log` holds NaN or infinite values"),
    ("dtype", "has dtype I32"),
    ("missing", "no such task vector or model folder"),
])
def test_bad_vectors_fail_clearly_and_write_nothing(workspace, tiny_gdn, tmp_path, how, message):
    bad = tmp_path / "gone.safetensors" if how == "missing" else _broken_vector(workspace, tmp_path, how)
    target = tmp_path / "out" / "model"
    target.parent.mkdir()
    with pytest.raises(BehaviorError) as failed:
        compose(Composition(tiny_gdn, (Term("a", workspace / "a.safetensors", 1.0),
                                       Term("bad", bad, 1.0)), MergeOptions()), target)
    rendered = failed.value.render()
    assert message in rendered and str(bad) in rendered
    if how == "name":
        assert "did you mean `model.layers.0.linear_attn.A_log`" in rendered
    assert list(target.parent.iterdir()) == []  # no folder, no leftover staging


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_nan_is_found_by_every_method(workspace, tiny_gdn, tmp_path, method):
    # Merges check their result, not each delta: a NaN must reach the result whatever
    # the method does with it (ties trims it, elects over it and clamps it; model_stock
    # takes cosines with it).
    bad = _broken_vector(workspace, tmp_path, "nan")
    weighted = METHODS[method].weighted
    with pytest.raises(BehaviorError, match="`model.layers.0.linear_attn.A_log` holds NaN"):
        compose(Composition(tiny_gdn, (Term("a", workspace / "a.safetensors", 1.0),
                                       Term("bad", bad, 0.0 if weighted else 1.0)),
                            MergeOptions(method=method, density=0.5 if weighted else 1.0,
                                         t=0.5 if method == "slerp" else None)),
                tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", sorted(m for m, traits in METHODS.items()
                                           if traits.task_arithmetic or m == "nuslerp"))
def test_an_inf_is_refused_with_no_numpy_warning_first(workspace, tiny_gdn, tmp_path, method):
    # The same vector added and subtracted: +inf meets -inf in every method's sum, and
    # dare's drop multiplies infs by 0. numpy would warn on the terminal before the error
    # says which vector holds them.
    tensors = load_file(workspace / "a.safetensors")
    tensors["model.norm.weight"][:] = float("inf")
    save_file(tensors, tmp_path / "inf.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(BehaviorError, match="`model.norm.weight` holds NaN or infinite"):
            compose(Composition(tiny_gdn, (Term("up", tmp_path / "inf.safetensors", 1.0),
                                           Term("down", tmp_path / "inf.safetensors", -1.0)),
                                MergeOptions(method=method, density=0.5)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bfloat16_vector_with_an_inf_is_refused(workspace, tiny_gdn, tmp_path):
    tensors = {name: value.to(torch.bfloat16)
               for name, value in load_file(workspace / "a.safetensors").items()}
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, tmp_path / "bf16.safetensors")
    with pytest.raises(BehaviorError, match="`model.norm.weight` holds NaN or infinite"):
        check_task_vector(tmp_path / "bf16.safetensors", tiny_gdn)


def test_a_mismatched_finetuned_folder_is_refused(workspace, tiny_gdn, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(workspace / "tuned_a", folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(BehaviorError, match="`lm_head.weight` of the base model is missing"):
        extract_task_vector(tiny_gdn, folder, tmp_path / "tv.safetensors")
    with pytest.raises(BehaviorError, match="`lm_head.weight` of the base model is missing"):
        compose(Composition(tiny_gdn, (Term("x", folder, 1.0),), MergeOptions()), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_extraction_refuses_a_diverged_finetune(workspace, tiny_gdn, tmp_path):
    folder = tmp_path / "diverged"
    shutil.copytree(workspace / "tuned_a", folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(BehaviorError, match="`model.norm.weight` holds NaN or infinite"):
        extract_task_vector(tiny_gdn, folder, tmp_path / "tv.safetensors")
    assert not (tmp_path / "tv.safetensors").exists()


def test_show_and_the_mergekit_export(workspace, tiny_gdn, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_gdn), str(out), "--add", f"{workspace / 'a.safetensors'}=1",
                 "--add", f"{workspace / 'tuned_b'}=-0.8", "--method", "ties",
                 "--density", "0.2"]) == 0
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "a * 1 - tuned_b * 0.8" in shown and "density 0.2" in shown
    assert "task_vector" in shown and "model" in shown
    assert main(["show", "--mergekit", str(out)]) == 0
    exported = capsys.readouterr().out
    assert exported == (out / "mergekit.yaml").read_text()
    assert "merge_method: ties" in exported and "density: 0.2" in exported
    assert "normalize: true" in exported and "weight: -0.8" in exported
    # The vector's fine-tuned folder is named, since mergekit merges folders.
    assert f'model: "{(workspace / "tuned_a").resolve()}"' in exported
    assert main(["show", str(workspace / "a.safetensors")]) == 0
    described = capsys.readouterr().out
    assert "task vector" in described and "gdn.proj" in described


def test_a_task_vector_of_an_older_build_still_shows_its_base(workspace, tiny_gdn, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(workspace / "a.safetensors", "pt") as handle:
        header = handle.metadata()
    fingerprint = header.pop("base_fingerprint")
    old = tmp_path / "old.safetensors"
    save_file(load_file(workspace / "a.safetensors"), old, metadata={**header, "base_sha256": fingerprint})
    assert check_task_vector(old, tiny_gdn)["base_fingerprint"] == fingerprint
    assert main(["show", str(old)]) == 0
    assert f"base_fingerprint: {fingerprint}" in capsys.readouterr().out


def test_cli_errors_are_diagnostics(tiny_gdn, tmp_path, capsys):
    assert main(["merge", str(tiny_gdn), str(tmp_path / "m"), "--add", "nonsense"]) == 1
    assert "expected PATH=WEIGHT" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 1
    assert "no such model folder" in capsys.readouterr().err
    assert main(["show", "--mergekit", str(tiny_gdn)]) == 1
    assert "not a composed model" in capsys.readouterr().err


def test_the_merge_command_takes_each_method_and_only_its_settings(workspace, tiny_gdn,
                                                                   tmp_path, capsys):
    terms = ["--add", f"{workspace / 'a.safetensors'}=1", "--add", f"{workspace / 'tuned_b'}=1"]
    assert main(["merge", str(tiny_gdn), str(tmp_path / "d"), *terms, "--method", "della",
                 "--density", "0.4", "--epsilon", "0.1", "--no-rescale"]) == 0
    record = json.loads((tmp_path / "d" / "behaviorc.json").read_text())
    assert record["merge"] == {"method": "della", "lambda": 1.0, "normalize": True,
                               "density": 0.4, "rescale": False, "seed": 0, "epsilon": 0.1}
    assert main(["merge", str(tiny_gdn), str(tmp_path / "s"), *terms,
                 "--method", "model_stock"]) == 0
    capsys.readouterr()
    assert main(["merge", str(tiny_gdn), str(tmp_path / "t"), *terms, "--method", "ties",
                 "--epsilon", "0.1"]) == 1
    assert "--epsilon has no effect on `ties`" in capsys.readouterr().err
    assert main(["merge", str(tiny_gdn), str(tmp_path / "t"), *terms, "--method", "dare_tie"]) == 1
    assert "did you mean `dare_ties`" in capsys.readouterr().err
    assert main(["merge", str(tiny_gdn), str(tmp_path / "t"), *terms, "--method", "sce"]) == 1
    assert "`merge ties` or `merge dare_ties`" in capsys.readouterr().err
    assert main(["merge", str(tiny_gdn), str(tmp_path / "t"), *terms, "--method", "slerp"]) == 1
    assert "slerp needs `t`" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    # rescale on ties, a term's own density, and slerp's t.
    own = ["--add", f"{workspace / 'a.safetensors'}=1,density=0.5", terms[2], terms[3]]
    assert main(["merge", str(tiny_gdn), str(tmp_path / "r"), *own, "--method", "ties",
                 "--density", "0.2", "--rescale"]) == 0
    record = json.loads((tmp_path / "r" / "behaviorc.json").read_text())
    assert record["merge"]["rescale"] is True
    assert [term.get("density") for term in record["terms"]] == [0.5, None]
    assert "density: 0.5" in (tmp_path / "r" / "mergekit.yaml").read_text()
    assert main(["merge", str(tiny_gdn), str(tmp_path / "l"), *terms, "--method", "slerp",
                 "--t", "0.3"]) == 0
    assert json.loads((tmp_path / "l" / "behaviorc.json").read_text())["merge"] == {
        "method": "slerp", "t": 0.3}


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib

    import behaviorc.core.files as files

    monkeypatch.setenv("BEHAVIORC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(files, "_FILE_HASHES", files._RememberedHashes())
    data = tmp_path / "weights.bin"
    data.write_bytes(b"one")
    assert files.remembered_sha256(data) == hashlib.sha256(b"one").hexdigest()
    store = tmp_path / "home" / "file-hashes.json"
    remembered = json.loads(store.read_text())
    assert list(remembered.values()) == [hashlib.sha256(b"one").hexdigest()]
    # Another process reads the store: a planted value shows that it is used.
    store.write_text(json.dumps({key: "planted" for key in remembered}))
    monkeypatch.setattr(files, "_FILE_HASHES", files._RememberedHashes())
    assert files.remembered_sha256(data) == "planted"
    data.write_bytes(b"two!")  # rewritten: another size and modification time
    assert files.remembered_sha256(data) == hashlib.sha256(b"two!").hexdigest()
