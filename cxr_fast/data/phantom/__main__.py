from cxr_fast.data.phantom.drawing import main
from cxr_fast.errors import run_cli

run_cli(main)
