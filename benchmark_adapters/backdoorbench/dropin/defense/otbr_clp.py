"""CLP (channel Lipschitzness-based pruning), as a BackdoorBench defense script (otbr-plugin's implementation).

Copy into a BackdoorBench checkout with `otbr-bench backdoorbench install-dropin BB_ROOT`; needs the
otbr-plugin package installed (`pip install otbr-plugin`). From the BackdoorBench root:

    python ./defense/otbr_clp.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr_clp/cifar10.yaml --dataset cifar10

Reads record/<result_file>/attack_result.pt (safely: no arbitrary unpickling) and writes
record/<result_file>/defense/otbr_clp/: defense_result.pt, otbr_clp_df_summary.csv, record.json, log/.
CLP uses no data: only the backdoored weights. Named otbr_clp so that BackdoorBench's own defense/clp.py
and its results stay untouched.
`python ./defense/otbr_clp.py --help` lists every argument; command-line values override the YAML.
BackdoorBench's own flags and YAML for the same defense work too (e.g. --yaml_path ./config/defense/clp/cifar10.yaml);
its infrastructure keys (amp, checkpoint_load, ...) are reported as ignored. --pairing backdoorbench runs BackdoorBench's CLP; --u_min/--u_max/--u_num
write its u table (u_step_df.csv, scored on the test set: an oracle diagnostic).
"""

import sys

DEFENSE = "clp"  # the registered defense that runs
SAVE_NAME = "otbr_clp"  # output folder record/<result_file>/defense/<SAVE_NAME>/ and config/defense/<SAVE_NAME>/

if __name__ == "__main__":
    try:
        from benchmark_adapters.backdoorbench.face import main
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import otbr-plugin ({err}); install it with: pip install otbr-plugin")
    sys.exit(main(DEFENSE, save_name=SAVE_NAME))
