"""SAU (shared adversarial unlearning, Wei et al., NeurIPS 2023), as a BackdoorBench defense script (otbr-plugin's implementation).

Copy into a BackdoorBench checkout with `otbr-bench backdoorbench install-dropin BB_ROOT`; needs the
otbr-plugin package installed (`pip install otbr-plugin`). From the BackdoorBench root:

    python ./defense/otbr_sau.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr_sau/cifar10.yaml --dataset cifar10

Reads record/<result_file>/attack_result.pt (safely: no arbitrary unpickling) and writes
record/<result_file>/defense/otbr_sau/: defense_result.pt, otbr_sau_df_summary.csv, record.json, log/.
Uses a clean subset of the training split (--ratio, default 0.05), never test data. Named otbr_sau so that
BackdoorBench's own defense/sau.py and its results stay untouched.
`python ./defense/otbr_sau.py --help` lists every argument; command-line values override the YAML.
Defaults are BackdoorBench's sau.py / config (100 rounds, Adam lr 1e-4, PGD L_inf 0.2, 5 steps).
"""

import sys

DEFENSE = "sau"  # the registered defense that runs
SAVE_NAME = "otbr_sau"  # output folder record/<result_file>/defense/<SAVE_NAME>/ and config/defense/<SAVE_NAME>/

if __name__ == "__main__":
    try:
        from benchmark_adapters.backdoorbench.face import main
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import otbr-plugin ({err}); install it with: pip install otbr-plugin")
    sys.exit(main(DEFENSE, save_name=SAVE_NAME))
