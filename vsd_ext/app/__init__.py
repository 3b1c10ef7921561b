"""The `vsd` command line: `cli.py` (the entry point and parser) and one module per command
(`demo.py`, `verify_demo.py`, `generate.py`, `evaluate.py`, `train.py`, `calibrate.py`);
`options.py` holds the options several commands share."""
