"""OTBR (data-free backdoor removal: random unlearning, NWC pruning, OT fusion), as a BackdoorBench defense script (otbr-plugin).

Copy into a BackdoorBench checkout with `otbr-bench backdoorbench install-dropin BB_ROOT`; needs the
otbr-plugin package installed (`pip install otbr-plugin`). From the BackdoorBench root:

    python ./defense/otbr.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr/cifar10.yaml --dataset cifar10

Reads record/<result_file>/attack_result.pt (safely: no arbitrary unpickling) and writes
record/<result_file>/defense/otbr/: defense_result.pt, otbr_df_summary.csv, record.json, log/.
OTBR uses no data: only the backdoored weights.
`python ./defense/otbr.py --help` lists every argument; command-line values override the YAML.
"""

import sys

DEFENSE = "otbr"  # the registered defense that runs
SAVE_NAME = "otbr"  # output folder record/<result_file>/defense/<SAVE_NAME>/ and config/defense/<SAVE_NAME>/

if __name__ == "__main__":
    try:
        from benchmark_adapters.backdoorbench.face import main
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import otbr-plugin ({err}); install it with: pip install otbr-plugin")
    sys.exit(main(DEFENSE, save_name=SAVE_NAME))
