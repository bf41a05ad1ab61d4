"""i-BAU (implicit backdoor adversarial unlearning, Zeng et al., ICLR 2022), as a BackdoorBench defense script (otbr-plugin's implementation).

Copy into a BackdoorBench checkout with `otbr-bench backdoorbench install-dropin BB_ROOT`; needs the
otbr-plugin package installed (`pip install otbr-plugin`). From the BackdoorBench root:

    python ./defense/otbr_ibau.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr_ibau/cifar10.yaml --dataset cifar10

Reads record/<result_file>/attack_result.pt (safely: no arbitrary unpickling) and writes
record/<result_file>/defense/otbr_ibau/: defense_result.pt, otbr_ibau_df_summary.csv, record.json, log/.
Uses a clean subset of the training split (--ratio, default 0.05), never test data. Named otbr_ibau so that
BackdoorBench's own defense/i-bau.py and its results stay untouched.
`python ./defense/otbr_ibau.py --help` lists every argument; command-line values override the YAML.
--setting backdoorbench runs BackdoorBench's i-BAU settings (Adam lr 1e-4, batch 256, training augmentation).
"""

import sys

DEFENSE = "ibau"  # the registered defense that runs
SAVE_NAME = "otbr_ibau"  # output folder record/<result_file>/defense/<SAVE_NAME>/ and config/defense/<SAVE_NAME>/

if __name__ == "__main__":
    try:
        from benchmark_adapters.backdoorbench.face import main
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import otbr-plugin ({err}); install it with: pip install otbr-plugin")
    sys.exit(main(DEFENSE, save_name=SAVE_NAME))
