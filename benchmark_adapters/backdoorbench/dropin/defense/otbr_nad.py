"""NAD (neural attention distillation), as a BackdoorBench defense script (otbr-plugin's implementation).

Copy into a BackdoorBench checkout with `otbr-bench backdoorbench install-dropin BB_ROOT`; needs the
otbr-plugin package installed (`pip install otbr-plugin`). From the BackdoorBench root:

    python ./defense/otbr_nad.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr_nad/cifar10.yaml --dataset cifar10

Reads record/<result_file>/attack_result.pt (safely: no arbitrary unpickling) and writes
record/<result_file>/defense/otbr_nad/: defense_result.pt, otbr_nad_df_summary.csv, record.json, log/.
Uses a clean subset of the training split (--ratio, default 0.05). Named otbr_nad so that BackdoorBench's own defense/nad.py
and its results stay untouched.
`python ./defense/otbr_nad.py --help` lists every argument; command-line values override the YAML.
BackdoorBench's own flags and YAML for the same defense work too (e.g. --yaml_path ./config/defense/nad/cifar10.yaml);
its infrastructure keys (amp, checkpoint_load, ...) are reported as ignored.
BackdoorBench's te_epochs / beta1..beta3 / p / weight_decay are accepted under their names.
"""

import sys

DEFENSE = "nad"  # the registered defense that runs
SAVE_NAME = "otbr_nad"  # output folder record/<result_file>/defense/<SAVE_NAME>/ and config/defense/<SAVE_NAME>/

if __name__ == "__main__":
    try:
        from benchmark_adapters.backdoorbench.face import main
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import otbr-plugin ({err}); install it with: pip install otbr-plugin")
    sys.exit(main(DEFENSE, save_name=SAVE_NAME))
