from cxr_fast.bench.data import main
from cxr_fast.errors import run_cli

run_cli(main)
