"""The `vsd` command line: `cli.py` (entry point and parser), one module per larger command
(`demo.py`, `verify_demo.py`, `train.py`)."""
