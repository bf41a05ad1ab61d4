"""ANP (adversarial neuron pruning), as a BackdoorBench defense script (otbr-plugin's implementation).

Copy into a BackdoorBench checkout with `otbr-bench backdoorbench install-dropin BB_ROOT`; needs the
otbr-plugin package installed (`pip install otbr-plugin`). From the BackdoorBench root:

    python ./defense/otbr_anp.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr_anp/cifar10.yaml --dataset cifar10

Reads record/<result_file>/attack_result.pt (safely: no arbitrary unpickling) and writes
record/<result_file>/defense/otbr_anp/: defense_result.pt, otbr_anp_df_summary.csv, record.json, log/.
Uses a clean subset of the training split (--ratio, default 0.05). Named otbr_anp so that BackdoorBench's own
defense/anp.py and its results stay untouched.
`python ./defense/otbr_anp.py --help` lists every argument; command-line values override the YAML.
BackdoorBench's own flags and YAML for the same defense work too (e.g. --yaml_path ./config/defense/anp/cifar10.yaml);
its infrastructure keys (amp, checkpoint_load, ...) are reported as ignored. --setting backdoorbench runs BackdoorBench's ANP
(--oracle true: its threshold chosen on the test set, written apart to defense/otbr_anp_oracle/).
"""

import sys

DEFENSE = "anp"  # the registered defense that runs
SAVE_NAME = "otbr_anp"  # output folder record/<result_file>/defense/<SAVE_NAME>/ and config/defense/<SAVE_NAME>/

if __name__ == "__main__":
    try:
        from benchmark_adapters.backdoorbench.face import main
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import otbr-plugin ({err}); install it with: pip install otbr-plugin")
    sys.exit(main(DEFENSE, save_name=SAVE_NAME))
