"""The BackdoorBench crosscheck (scripts/backdoorbench_crosscheck.py).

The end-to-end test is opt-in: it needs a real BackdoorBench checkout (``BACKDOORBENCH_ROOT``) and the Python of
an environment that holds BackdoorBench's requirements and otbr-plugin (``BACKDOORBENCH_PYTHON``, default: the
Python running the tests). It runs the crosscheck on its smallest setting (200 train / 100 test images on the
zero-padded layout, ``badnet@pad``, one BadNets epoch, one seed, a few FP/ANP steps). Like the script, it reuses
the record and the defense outputs that already exist in the checkout (``record/otbrx_fmnist200_100_badnet/``); from scratch it takes about 30 minutes on
one thread of a loaded 2-core machine (its last run here, with the attack and FP/ANP outputs present: 14.4
minutes). CI does not need BackdoorBench.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "backdoorbench_crosscheck.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("backdoorbench_crosscheck", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_refuses_a_folder_that_is_not_a_backdoorbench_checkout(tmp_path):
    mod = _load_script()
    with pytest.raises(SystemExit, match="is not a BackdoorBench checkout"):
        mod.main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_stratified_subsample_is_balanced_fixed_and_distinct():
    mod = _load_script()
    labels = np.repeat(np.arange(10), 50)
    a = mod._stratified_take(labels, 103, seed=0)
    assert len(a) == len(set(a.tolist())) == 103
    counts = np.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(a, mod._stratified_take(labels, 103, seed=0))
    assert not np.array_equal(a, mod._stratified_take(labels, 103, seed=1))


def test_summary_csv_reads_the_last_row_of_a_backdoorbench_summary(tmp_path):
    mod = _load_script()
    p = tmp_path / "finetune_df_summary.csv"
    p.write_text(",test_acc,test_asr,test_ra\nlast,0.8,0.1,0.7\nvalid_max,0.9,0.95,0.75\nexist_nan_value,False,False,False\n")
    assert mod._read_summary(p) == {"acc": 0.8, "asr": 0.1, "ra": 0.7}
    q = tmp_path / "clp_df_summary.csv"
    q.write_text(",u,test_acc,test_asr,test_ra\n0,3.0,0.5,0.25,0.125\n")
    assert mod._read_summary(q) == {"acc": 0.5, "asr": 0.25, "ra": 0.125}


def test_layouts_map_28_to_32_as_named():
    mod = _load_script()
    img = np.zeros((28, 28), dtype=np.uint8)
    img[-1, -1] = 255  # the bottom-right pixel, where BackdoorBench's BadNets patch goes
    pad = mod.to_rgb32(img, "pad")
    rs = mod.to_rgb32(img, "resize")
    for out in (pad, rs):
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    # pad: the image sits 2 pixels in, the border stays 0 (BadNets' pixels 29-31 are mostly border)
    assert pad[29, 29, 0] == 255 and pad[30:, :, 0].sum() == 0 and pad[:, 30:, 0].sum() == 0
    # resize: the corner pixel reaches the 32x32 image's corner, content fills the whole frame
    assert rs[31, 31, 0] > 0 and rs[30:, 30:, 0].sum() > 0
    full = np.full((28, 28), 200, dtype=np.uint8)
    assert (mod.to_rgb32(full, "resize") == 200).all()
    assert mod.to_rgb32(full, "pad")[0, 0, 0] == 0
    with pytest.raises(ValueError, match="layout 'crop'"):
        mod.to_rgb32(img, "crop")
    with pytest.raises(ValueError, match="28x28 uint8"):
        mod.to_rgb32(np.zeros((32, 32), dtype=np.uint8), "pad")


def test_attack_specs_name_epochs_and_layout():
    mod = _load_script()
    assert mod.split_attack("badnet", 3) == ("badnet", 3, "", "resize")
    assert mod.split_attack("badnet:15", 3) == ("badnet", 15, "_e15", "resize")
    assert mod.split_attack("blended@pad", 3) == ("blended", 3, "", "pad")
    assert mod.split_attack("badnet:8@pad", 3, "resize") == ("badnet", 8, "_e8", "pad")
    assert mod.split_attack("badnet", 3, "pad")[3] == "pad"
    # pad records keep the names they had before layouts existed; the others name their layout
    assert mod.record_name("blended@pad", 1000, 250) == "otbrx_fmnist1000_250_blended"
    assert mod.record_name("badnet:15", 1000, 250) == "otbrx_fmnist1000_250_resize_badnet_e15"
    assert mod.data_dir_name(1000, 250, 0, "pad") == "otbr_crosscheck_fmnist_1000_250_s0"
    assert mod.data_dir_name(1000, 250, 0, "resize") == "otbr_crosscheck_fmnist_1000_250_s0_resize"
    assert mod.split_attack("badnet:6@resize%0.3", 3) == ("badnet", 6, "_e6_p0.3", "resize")
    assert mod.record_name("badnet:6%0.3", 1000, 250) == "otbrx_fmnist1000_250_resize_badnet_e6_p0.3"
    assert mod.attack_pratio("badnet:6%0.3") == ("badnet:6", 0.3) and mod.attack_pratio("badnet") == ("badnet", None)
    for bad in ("badnet@crop", "badnet:0", "badnet:x", ":3", "badnet%0", "badnet%x", "badnet:3%1.5"):
        with pytest.raises(SystemExit, match="--attacks"):
            mod.split_attack(bad, 3)


def test_runs_of_another_cpu_budget_are_other_runs(tmp_path):
    mod = _load_script()
    a = mod.parse_args([str(tmp_path), "--out", str(tmp_path / "o"), "--fp-epochs", "10", "--fp-ratio", "0.2",
                        "--anp-iters", "40", "--anp-batch", "16", "--anp-lr", "0.2"])
    assert a.layout == "resize"

    def settings(**kw):
        base = dict(bb_root=tmp_path, bb_python="python", out=tmp_path, work=tmp_path,
                    dataset_paths={"resize": "./data/x_resize", "pad": "./data/x"}, layout="resize",
                    attacks=["blended@pad", "badnet:15"], attack_epochs=3, attack_batch=32, n_train=1000, n_test=250,
                    seeds=[0, 1, 2], seeds_blended=[0], threads=1, fp_epochs=a.fp_epochs,
                    fp_once_prune_ratio=a.fp_once_prune_ratio, fp_ratio=a.fp_ratio, anp_iters=a.anp_iters,
                    anp_batch=a.anp_batch, anp_pruning_step=a.anp_pruning_step, anp_lr=a.anp_lr, clp_u=3.0,
                    defenses=["fp", "anp"], plugin_seeds=2)
        base.update(kw)
        return mod.Settings(**base)

    s = settings()
    assert mod.budget_tag(s, "fp") == "e10-r0.2-p0.01" and mod.budget_tag(s, "anp") == "i40-b16-ps0.05-lr0.2"
    runs = mod.defense_runs(s, "blended@pad")
    bb_anp = [r for r in runs if r.name == "anp" and r.impl == "BackdoorBench"]
    assert [r.seed for r in bb_anp] == [0, 1, 2]
    assert all("__i40-b16-ps0.05-lr0.2__" in r.kept and "./data/x" in r.args for r in bb_anp)
    assert all(r.args[r.args.index("--lr") + 1] == "0.2" for r in bb_anp)
    ours = [r for r in runs if r.impl == "plug-in"]
    # --plugin-seeds 2: BackdoorBench's setting at seeds 0 and 1, the plug-in's own setting at seed 0
    assert sorted(r.seed for r in ours if r.variant == mod.BB_SETTING) == [0, 0, 1, 1]
    assert sorted(r.seed for r in ours if not r.variant) == [0, 0]
    default_anp = [r for r in ours if r.name == "anp" and not r.variant]
    assert all(r.args[r.args.index("--mask_lr") + 1] == "0.2" for r in default_anp)
    fp = [r for r in runs if r.name == "fp"]
    assert all(r.args[r.args.index("--ratio") + 1] == "0.2" for r in fp)
    other = {r.kept for r in mod.defense_runs(settings(fp_epochs=2), "blended@pad") if r.name == "fp"}
    assert other.isdisjoint({r.kept for r in fp})
    # --fp-bb-tmax: BackdoorBench's own fp.py again, with a YAML copy whose cos_t_max is the fine-tuning epochs
    (tmp_path / "config" / "defense" / "fp").mkdir(parents=True)
    (tmp_path / "config" / "defense" / "fp" / "gtsrb.yaml").write_text("epochs: 100\nlr: 0.01\n")
    tmax = [r for r in mod.defense_runs(settings(fp_bb_tmax=True), "blended@pad") if r.variant == mod.TMAX_VARIANT]
    assert [r.seed for r in tmax] == [0, 1, 2] and all(r.script == "./defense/fp.py" for r in tmax)
    copy = Path(tmax[0].args[tmax[0].args.index("--yaml_path") + 1])
    assert "cos_t_max: 10" in copy.read_text() and "lr: 0.01" in copy.read_text()
    assert len({r.kept for r in tmax} | {r.kept for r in fp}) == len(tmax) + len(fp)
    badnet = mod.defense_runs(s, "badnet:15")
    assert all(r.record == "otbrx_fmnist1000_250_resize_badnet_e15" and "./data/x_resize" in r.args for r in badnet)
    assert {r.seed for r in badnet if r.impl == "BackdoorBench"} == {0}  # --seeds-other


def test_paired_subsets_are_other_runs_of_the_dropins(tmp_path):
    mod = _load_script()
    a = mod.parse_args([str(tmp_path), "--out", str(tmp_path / "o"), "--paired-subsets"])
    assert a.paired_subsets and not mod.parse_args([str(tmp_path), "--out", str(tmp_path / "o")]).paired_subsets
    s = mod.Settings(bb_root=tmp_path, bb_python="python", out=tmp_path, work=tmp_path,
                     dataset_paths={"resize": "./data/x_resize"}, layout="resize", attacks=["badnet"], attack_epochs=3,
                     attack_batch=32, n_train=1000, n_test=250, seeds=[0, 1, 2], seeds_blended=[0], threads=1,
                     fp_epochs=2, fp_once_prune_ratio=0.1, fp_ratio=0.05, anp_iters=24, anp_batch=16,
                     anp_pruning_step=0.3, anp_lr=0.2, clp_u=3.0, defenses=["fp", "anp"], plugin_seeds=2,
                     paired_subsets=True)
    runs = mod.defense_runs(s, "badnet")
    paired = [r for r in runs if r.variant == mod.PAIRED_SETTING]
    unpaired = [r for r in runs if r.variant == mod.BB_SETTING]
    assert sorted((r.name, r.seed) for r in paired) == [("anp", 0), ("anp", 1), ("fp", 0), ("fp", 1)]
    for r in paired:  # BackdoorBench's setting and flags, plus BackdoorBench's own subset, in folders of their own
        twin = next(u for u in unpaired if (u.name, u.seed) == (r.name, r.seed))
        assert r.args[:-2] == [*twin.args[:-2], "--subset_sampling", "backdoorbench_stream"]
        assert r.args[-2:] == twin.args[-2:] == ["--random_seed", str(r.seed)] and r.kept != twin.kept
    # FP with BackdoorBench's schedule: the same run without the drop-in's cos_t_max 0, in folders of its own
    bb_sched = [r for r in runs if r.variant == mod.PAIRED_BB_SCHEDULE]
    assert sorted((r.name, r.seed) for r in bb_sched) == [("fp", 0), ("fp", 1)]
    for r in bb_sched:
        twin = next(p for p in paired if (p.name, p.seed) == (r.name, r.seed))
        i = twin.args.index("--cos_t_max")
        assert twin.args[i:i + 2] == ["--cos_t_max", "0"] and "--cos_t_max" not in r.args
        assert r.args == twin.args[:i] + twin.args[i + 2:]
        assert r.kept not in {x.kept for x in runs if x is not r} and "cos_t_max-100" in r.kept
    assert all(r.args[r.args.index("--cos_t_max") + 1] == "0" for r in unpaired if r.name == "fp")
    # ANP with BackdoorBench's random stream as well: the paired run plus --random_stream backdoorbench
    streamed = [r for r in runs if r.variant == mod.PAIRED_BB_STREAM]
    assert sorted((r.name, r.seed) for r in streamed) == [("anp", 0), ("anp", 1)]
    for r in streamed:
        twin = next(p for p in paired if (p.name, p.seed) == (r.name, r.seed))
        assert r.args == [*twin.args[:-2], "--random_stream", "backdoorbench", *twin.args[-2:]]
        assert r.kept not in {x.kept for x in runs if x is not r} and "random_stream-backdoorbench" in r.kept
    assert not [r for r in runs if "--random_stream" in r.args and r.variant != mod.PAIRED_BB_STREAM]
    s.paired_subsets = False
    assert not [r for r in mod.defense_runs(s, "badnet") if r.variant in (mod.PAIRED_SETTING, mod.PAIRED_BB_SCHEDULE,
                                                                            mod.PAIRED_BB_STREAM)]
    env = mod.run_env(s, paired[0])  # the drop-ins import this checkout's otbr-plugin
    assert env["PYTHONPATH"] == str(mod.REPO)


def test_pruned_units_are_read_from_the_weights(tmp_path):
    torch = pytest.importorskip("torch")
    mod = _load_script()
    before = {"layer1.bn1.weight": torch.tensor([1.0, 0.5, 0.0, 2.0]), "layer1.bn1.running_mean": torch.zeros(4),
              "conv.weight": torch.ones(4), "linear.weight": torch.ones(3, 5)}
    anp = dict(before, **{"layer1.bn1.weight": torch.tensor([0.0, 0.5, 0.0, 0.0]), "conv.weight": torch.zeros(4)})
    # two channels zeroed; the one that was 0 already and the non-BN tensor do not count
    assert mod.pruned_units(anp, before, "anp") == 2
    mask = torch.ones(3, 5)
    mask[:, [1, 3]] = 0
    fp_bb = {"linear.weight_orig": torch.ones(3, 5), "linear.weight_mask": mask}  # BackdoorBench's reparametrisation
    fp_ours = {"linear.weight": torch.ones(3, 5) * mask}
    assert mod.pruned_units(fp_bb, before, "fp") == mod.pruned_units(fp_ours, before, "fp") == 2
    assert mod.pruned_units(before, before, "fp") == 0 and mod.pruned_units(before, before, "clp") is None
    bb = tmp_path / "bb" / "checkpoint"
    bb.mkdir(parents=True)
    (bb / "mask_values.txt").write_text("No \t Layer Name \t Neuron Idx \t Mask Score \n"
                                        "0 \t layer1.0.bn1 \t 0 \t 0.8123 \n1 \t layer1.0.bn1 \t 1 \t 0.0512 \n")
    assert mod.min_anp_mask(tmp_path / "bb") == 0.0512
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "masks.csv").write_text("layer,channel,mask,pruned\nl,0,0.25,True\nl,1,0.75,False\n")
    assert mod.min_anp_mask(tmp_path / "ours") == 0.25
    assert mod.min_anp_mask(tmp_path) is None


def _tuning_settings(mod, tmp_path, **kw):
    base = dict(bb_root=tmp_path, bb_python="python", out=tmp_path, work=tmp_path / "work",
                dataset_paths={"resize": "./data/x_resize", "pad": "./data/x"}, layout="resize",
                attacks=["blended@pad", "badnet:6%0.3"], attack_epochs=3, attack_batch=32, n_train=1000, n_test=250,
                seeds=[0, 1, 2], seeds_blended=[0], threads=1, fp_epochs=2, fp_once_prune_ratio=0.1, fp_ratio=0.05,
                anp_iters=24, anp_batch=16, anp_pruning_step=0.3, anp_lr=0.2, clp_u=3.0,
                defenses=["ft", "nad", "ep"], ft_epochs=20, ft_batch=16, nad_epochs=4, nad_batch=8, clean_ratio=0.1,
                ep_u=2.5, ep_batch=64)
    base.update(kw)
    return mod.Settings(**base)


def test_ft_nad_ep_run_both_sides_on_one_command_line(tmp_path):
    mod = _load_script()
    a = mod.parse_args([str(tmp_path), "--out", "o", "--defenses", "ft", "nad", "ep", "--ft-epochs", "20",
                        "--nad-epochs", "4", "--clean-ratio", "0.1", "--ep-u", "2.5"])
    assert (a.defenses, a.ft_epochs, a.ft_batch, a.nad_epochs, a.nad_batch, a.clean_ratio, a.ep_u, a.ep_batch) == \
        (["ft", "nad", "ep"], 20, 256, 4, 256, 0.1, 2.5, 256)  # BackdoorBench's batch 256 unless given
    with pytest.raises(SystemExit):
        mod.parse_args([str(tmp_path), "--out", "o", "--defenses", "sau"])  # not in the crosscheck
    (tmp_path / "config" / "defense" / "ep").mkdir(parents=True)
    (tmp_path / "config" / "defense" / "ep" / "gtsrb.yaml").write_text("u: 3\nu_min: 0\nu_max: 10\nu_num: 21\nlr: 0.01\n")
    s = _tuning_settings(mod, tmp_path)
    runs = mod.defense_runs(s, "blended@pad")
    assert {r.name for r in runs} == {"ft", "nad", "ep"}
    for name in ("ft", "nad", "ep"):
        bb = [r for r in runs if r.name == name and r.impl == "BackdoorBench"]
        ours = [r for r in runs if r.name == name and r.impl == "plug-in"]
        assert [r.seed for r in bb] == [0, 1, 2] and [r.seed for r in ours] == [0]  # plugin_seeds 1
        assert bb[0].script == f"./defense/{name}.py" and ours[0].script == f"./defense/otbr_{name}.py"
        assert ours[0].args == bb[0].args and ours[0].variant == mod.BB_FLAGS  # the same command line
        assert f"__{mod.budget_tag(s, name)}__s0" in bb[0].kept and ours[0].kept != bb[0].kept
        assert "./data/x" in bb[0].args and bb[0].args[bb[0].args.index("--device") + 1] == "cpu"

    def flag(name, key):
        args = next(r.args for r in runs if r.name == name)
        return args[args.index(key) + 1]

    assert (flag("ft", "--epochs"), flag("ft", "--batch_size"), flag("ft", "--ratio")) == ("20", "16", "0.1")
    assert flag("ft", "--yaml_path") == "./config/defense/ft/gtsrb.yaml"
    # NAD: te_epochs is BackdoorBench's teacher AND student epochs; --epochs sets the drop-in's student
    assert (flag("nad", "--te_epochs"), flag("nad", "--epochs"), flag("nad", "--batch_size")) == ("4", "4", "8")
    # EP: BackdoorBench's YAML with its u sweep narrowed to u (a copy), and its one poisoned batch
    assert (flag("ep", "--u"), flag("ep", "--batch_size")) == ("2.5", "64")
    import yaml

    copy = yaml.safe_load(Path(flag("ep", "--yaml_path")).read_text())
    assert (copy["u"], copy["u_min"], copy["u_max"], copy["u_num"], copy["lr"]) == (2.5, 2.5, 2.5, 1, 0.01)
    assert mod.budget_tag(s, "ft") == "e20-b16-r0.1" and mod.budget_tag(s, "nad") == "te4-b8-r0.1"
    assert mod.budget_tag(s, "ep") == "u2.5-b64"
    other = {r.kept for r in mod.defense_runs(_tuning_settings(mod, tmp_path, ft_epochs=5), "blended@pad")
             if r.name == "ft"}
    assert other.isdisjoint({r.kept for r in runs if r.name == "ft"})  # another budget, other runs
    assert not [r for r in mod.defense_runs(_tuning_settings(mod, tmp_path, defenses=["otbr"]), "blended@pad")
                if r.name in mod.TUNING]
    # --nad-bb-layers: the drop-in's NAD once more, on the layers BackdoorBench's nad.py distils
    layered = [r for r in mod.defense_runs(_tuning_settings(mod, tmp_path, nad_bb_layers=True), "blended@pad")
               if r.variant == mod.NAD_LAYERS_VARIANT]
    assert [r.seed for r in layered] == [0] and layered[0].args[-6:-2] == ["--attention_layers", "layer3", "layer4",
                                                                            "avgpool"]
    assert layered[0].kept not in {r.kept for r in runs}
    settings = mod.cpu_settings(s)
    assert settings["FT epochs"] == "20 [100]" and settings["NAD te_epochs (teacher and student)"] == "4 [10]"
    assert "FT epochs" not in mod.cpu_settings(_tuning_settings(mod, tmp_path, defenses=["fp"]))
    # BackdoorBench's first seed and the drop-in's come before BackdoorBench's further seeds
    order = [(r.name, r.impl, r.seed) for r in mod.schedule(s) if r.kind == "defense" and r.record.endswith("blended")]
    assert order.index(("ep", "plug-in", 0)) < order.index(("ft", "BackdoorBench", 1))


def test_summaries_of_ft_nad_ep_and_the_drop_ins_environment(tmp_path):
    mod = _load_script()
    s = _tuning_settings(mod, tmp_path)
    assert {mod.SUMMARY_FILE[k] for k in ("ft", "nad", "ep")} == {"ft_df_summary.csv", "nad_df_summary.csv",
                                                                  "ep_df_summary.csv"}
    run = mod.Run("defense", "rec", "ep", "BackdoorBench", "./defense/ep.py", [], 0, "", "record/rec/defense/ep",
                  "record/rec/defense/crosscheck/ep__s0")
    out = tmp_path / run.kept
    out.mkdir(parents=True)
    # BackdoorBench's ep.py writes one row (the model of --u), indexed 0, no "last" row
    (out / "ep_df_summary.csv").write_text(",u,clean_test_loss_avg_over_batch,bd_test_loss_avg_over_batch,test_acc,"
                                           "test_asr,test_ra\n0,3.0,1.2,0.1,0.64,0.96,0.02\n")
    assert mod.run_metrics(s, run) == {"acc": 0.64, "asr": 0.96, "ra": 0.02}
    ours = mod.Run("defense", "rec", "nad", "plug-in", "./defense/otbr_nad.py", [], 0, mod.BB_FLAGS,
                   "record/rec/defense/otbr_nad", "record/rec/defense/crosscheck/otbr_nad__s0")
    assert mod.SUMMARY_FILE[Path(ours.output).name] == "otbr_nad_df_summary.csv"
    # the drop-ins import this checkout's otbr-plugin; BackdoorBench's scripts get only its compat folder
    env = mod.run_env(s, ours)
    assert env["PYTHONPATH"] == str(mod.REPO) and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in env
    assert mod.run_env(s, run)["PYTHONPATH"] == str(mod.COMPAT_DIR)


def test_ep_channels_are_compared_by_the_weights():
    torch = pytest.importorskip("torch")
    mod = _load_script()
    before = {"a.bn.weight": torch.tensor([1.0, 1.0, 0.0, 1.0]), "a.bn.running_mean": torch.zeros(4),
              "b.bn.weight": torch.ones(3), "b.bn.running_mean": torch.zeros(3), "fc.weight": torch.ones(2)}
    bb = dict(before, **{"a.bn.weight": torch.tensor([0.0, 1.0, 0.0, 0.0]), "b.bn.weight": torch.tensor([1.0, 0.0, 1.0])})
    ours = dict(before, **{"a.bn.weight": torch.tensor([0.0, 1.0, 0.0, 1.0]), "fc.weight": torch.zeros(2)})
    assert mod.pruned_bn_channels(bb, before) == ["a.bn:0", "a.bn:3", "b.bn:1"]
    assert mod.pruned_bn_channels(ours, before) == ["a.bn:0"]  # a channel 0 before, and a non-BN tensor, do not count
    assert mod.pruned_units(bb, before, "ep") == 3
    rows = mod.ep_overlap({("r", "BackdoorBench", 0): mod.pruned_bn_channels(bb, before),
                           ("r", "BackdoorBench", 1): [], ("r", "plug-in", 0): mod.pruned_bn_channels(ours, before),
                           ("other", "plug-in", 0): ["a.bn:3"]})
    assert [(r["bb_seed"], r["plugin_seed"], r["bb_pruned"], r["plugin_pruned"], r["common"]) for r in rows] == \
        [(0, 0, 3, 1, 1), (1, 0, 0, 1, 0)]


def test_compat_lets_backdoorbench_import_its_dde_models(tmp_path):
    """BackdoorBench f02e353's dde_model package imports ``defense.dde``, which its tree lacks (ep.py fails at
    import); the compat folder's stand-in resolves it to the package itself. Checked on a tree of that shape."""
    import subprocess

    mod = _load_script()
    pkg = tmp_path / "utils" / "defense_utils" / "dde" / "dde_model"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "utils", tmp_path / "utils" / "defense_utils", tmp_path / "utils" / "defense_utils" / "dde"):
        (d / "__init__.py").write_text("")
    (tmp_path / "defense").mkdir()
    (tmp_path / "defense" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .layers import *\nfrom .conv import *\n")
    (pkg / "layers.py").write_text("class LayerNorm_DDE:\n    pass\n")
    (pkg / "conv.py").write_text("from defense.dde import dde_model\n\ndef norm():\n    return dde_model.LayerNorm_DDE\n")
    code = ("import sys; sys.path.insert(0, '.'); import numpy as np; "
            "import utils.defense_utils.dde.dde_model as m; assert m.norm() is m.LayerNorm_DDE; "
            "assert np.infty == np.inf; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "No module named 'defense.dde'" in plain.stderr  # the failure the stand-in is for
    env["PYTHONPATH"] = str(mod.COMPAT_DIR)
    fixed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert fixed.returncode == 0 and fixed.stdout.strip() == "ok", fixed.stderr


BB_ROOT = os.environ.get("BACKDOORBENCH_ROOT")
BB_PYTHON = os.environ.get("BACKDOORBENCH_PYTHON", sys.executable)


@pytest.mark.skipif(not BB_ROOT, reason="opt-in: set BACKDOORBENCH_ROOT to a BackdoorBench checkout (and "
                                        "BACKDOORBENCH_PYTHON to its environment's python, with otbr-plugin installed)")
def test_crosscheck_smallest_setting(tmp_path):
    import subprocess

    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), BB_ROOT, "--bb-python", BB_PYTHON, "--out", str(out),
           "--work", str(tmp_path / "work"), "--n-train", "200", "--n-test", "100", "--attacks", "badnet@pad",
           "--attack-epochs", "1", "--attack-batch", "128", "--seeds", "0", "--fp-epochs", "1",
           "--fp-once-prune-ratio", "0.2", "--anp-iters", "2", "--anp-batch", "32", "--anp-pruning-step", "0.3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUBSAMPLED to 200 train / 100 test" in done.stdout
    with open(out / "crosscheck_runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen = {(r["defense"], r["impl"]) for r in rows}
    for name in ("clp", "fp", "anp"):
        assert (name, "BackdoorBench") in seen and (name, "plug-in") in seen, seen
    assert ("otbr", "plug-in") in seen
    for r in rows:
        for k in ("acc", "asr", "ra", "der"):
            assert 0.0 <= float(r[k]) <= 1.0, r
        assert float(r["seconds"]) > 0
        if r["defense"] in ("fp", "anp"):  # units pruned, read from the saved weights
            assert int(r["pruned"]) >= 0 and r["budget"], r
    result = json.loads((out / "crosscheck.json").read_text())
    clp = {c["variant"]: c for c in result["clp_weights"]}
    # BackdoorBench's CLP and the plug-in's with BackdoorBench's conv/BN pairing prune the same weights
    assert clp["pairing=backdoorbench"]["max_abs_dw"] == 0.0, clp
    assert result["versions"]["BackdoorBench commit"] != "unknown"
    table = (out / "crosscheck.md").read_text()
    assert "| BackdoorBench |" in table and "| plug-in" in table


def test_nad_paired_subset_and_bn_reestimate_runs(tmp_path):
    """--paired-subsets gives the drop-in's NAD BackdoorBench's own subset (--index FILE of the first choose_index
    draw); --nad-bn-reestimate adds each NAD drop-in run once more with --bn_stats reestimate; --only-variant."""
    import random

    mod = _load_script()
    a = mod.parse_args([str(tmp_path), "--out", "o", "--defenses", "nad", "--nad-bn-reestimate",
                        "--only-variant", "bn_stats=reestimate"])
    assert a.nad_bn_reestimate is True and a.only_variant == "bn_stats=reestimate"
    assert mod.parse_args([str(tmp_path), "--out", "o"]).nad_bn_reestimate is False
    plain = [r for r in mod.defense_runs(_tuning_settings(mod, tmp_path, defenses=["nad"]), "blended@pad")
             if r.impl == "plug-in"]
    assert [r.variant for r in plain] == [mod.BB_FLAGS]  # neither flag: the one drop-in run as before
    s = _tuning_settings(mod, tmp_path, defenses=["nad"], nad_bn_reestimate=True, plugin_seeds=2)
    s.paired_subsets = True
    runs = [r for r in mod.defense_runs(s, "blended@pad") if r.impl == "plug-in"]
    by = {(r.variant, r.seed): r for r in runs}
    paired, reest = mod.NAD_PAIRED_VARIANT, mod.BB_FLAGS + mod.NAD_BN_VARIANT
    assert set(by) == {(v, seed) for v in (mod.BB_FLAGS, reest, paired, paired + mod.NAD_BN_VARIANT)
                       for seed in (0, 1)}
    base = by[(mod.BB_FLAGS, 1)].args
    assert by[(reest, 1)].args == [*base[:-2], "--bn_stats", "reestimate", *base[-2:]]  # seed flag last
    idx_args = by[(paired + mod.NAD_BN_VARIANT, 1)].args
    assert idx_args[idx_args.index("--bn_stats") + 1] == "reestimate"
    index = Path(idx_args[idx_args.index("--index") + 1])
    assert index.is_absolute() and "--index" not in by[(reest, 1)].args
    # BackdoorBench's nad.py: fix_random(seed), then random.sample(range(n), int(n * ratio)) once
    random.seed(1)
    assert [int(t) for t in index.read_text().split()] == random.sample(range(1000), 100)
    assert len({r.kept for r in runs}) == len(runs)  # every variant its own folder
    assert set(mod.NAD_VARIANTS) == {reest, paired, paired + mod.NAD_BN_VARIANT}


def test_anp_masks_are_read_from_both_sides_and_compared(tmp_path):
    mod = _load_script()
    bb, ours = tmp_path / "bb", tmp_path / "ours"
    (bb / "checkpoint").mkdir(parents=True)
    ours.mkdir()
    (bb / "checkpoint" / "mask_values.txt").write_text(
        "No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t layer1.0.bn1 \t 0 \t 0.9359 \n"
        "1 \t layer1.0.bn1 \t 1 \t 1.0000 \n")
    (ours / "masks.csv").write_text("layer,channel,mask,pruned\nlayer1.0.bn1,0,0.9361,False\nlayer1.0.bn1,1,1.0,False\n")
    a, b = mod.anp_masks(bb), mod.anp_masks(ours)
    assert a == {("layer1.0.bn1", 0): 0.9359, ("layer1.0.bn1", 1): 1.0} and mod.min_anp_mask(bb) == 0.9359
    worst, differ = mod.mask_max_diff(a, b)
    assert abs(worst - 0.0002) < 1e-12 and differ == 1
    assert mod.mask_max_diff(a, a) == (0.0, 0)
    with pytest.raises(ValueError, match="different BN neurons"):
        mod.mask_max_diff(a, {("layer1.0.bn1", 0): 0.9})
    assert mod.anp_masks(tmp_path) is None
