"""Run the OtterScale benchmark: ``python bench/run.py [--smoke] [--help]`` (or ``nox -s bench``).

Needs the dev packages (``otterscale-hub``, ``otterscale-agent``, ``otterscale-testing``),
psutil, matplotlib and py-spy, and the cached tools (``nox -s tools``): chisel, etcd,
kube-apiserver, kube-controller-manager.
"""

import sys

from otterscale_bench._run import main

if __name__ == "__main__":
    sys.exit(main())
