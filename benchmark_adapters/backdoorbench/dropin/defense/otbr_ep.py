"""EP (pre-activation distribution pruning, data-free variant), as a BackdoorBench defense script (otbr-plugin's implementation).

Copy into a BackdoorBench checkout with `otbr-bench backdoorbench install-dropin BB_ROOT`; needs the
otbr-plugin package installed (`pip install otbr-plugin`). From the BackdoorBench root:

    python ./defense/otbr_ep.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr_ep/cifar10.yaml --dataset cifar10

Reads record/<result_file>/attack_result.pt (safely: no arbitrary unpickling) and writes
record/<result_file>/defense/otbr_ep/: defense_result.pt, otbr_ep_df_summary.csv, record.json, log/.
EP's data-free variant uses no data: only the BN statistics of the backdoored model. Named otbr_ep so that BackdoorBench's own defense/ep.py
and its results stay untouched.
`python ./defense/otbr_ep.py --help` lists every argument; command-line values override the YAML.
BackdoorBench's own flags and YAML for the same defense work too (e.g. --yaml_path ./config/defense/ep/cifar10.yaml);
its infrastructure keys (amp, checkpoint_load, ...) are reported as ignored.
BackdoorBench's own ep.py reads a batch of the poisoned training set; this one does not (docs/baselines.md).
--u_min/--u_max/--u_num write its u table (u_step_df.csv, scored on the test set: an oracle diagnostic).
"""

import sys

DEFENSE = "ep"  # the registered defense that runs
SAVE_NAME = "otbr_ep"  # output folder record/<result_file>/defense/<SAVE_NAME>/ and config/defense/<SAVE_NAME>/

if __name__ == "__main__":
    try:
        from benchmark_adapters.backdoorbench.face import main
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import otbr-plugin ({err}); install it with: pip install otbr-plugin")
    sys.exit(main(DEFENSE, save_name=SAVE_NAME))
